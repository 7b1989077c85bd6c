"""Prompt sources and their split into per-iteration partitions and a held-out eval split.

`builtin` generates instruction prompts with verifiable constraints from a seed. Eval
topics are drawn first and never appear in training, so the held-out pass rate measures
constraint following on unseen subjects. Training prompts are shuffled once and cut into
disjoint partitions, one per iteration (fresh prompts each iteration, as in DNO).
`builtin:gold` is a shipped set of 160 general instructions with a gold answer each
(128 train, 32 eval), for recipes that need gold answers offline (SPIN, DNO's teacher).
"""

from __future__ import annotations

import itertools
import random
from pathlib import Path

from pydantic import ValidationError

from nash import constraints
from nash.errors import UserError
from nash.records import Prompt, read_lines

GOLD = Path(__file__).parent / "data" / "gold.jsonl"

TOPICS = [
    "the ocean", "volcanoes", "honeybees", "public libraries", "bicycles", "coffee",
    "the moon", "rain forests", "chess", "bread baking", "trains", "recycling",
    "friendship", "solar power", "museums", "mountains", "jazz music", "penguins",
    "gardening", "the internet", "clocks", "deserts", "photography", "tea",
    "bridges", "snow", "dinosaurs", "sailing", "city parks", "robots", "maps",
    "owls", "football", "rivers", "kites", "lighthouses", "cooking pasta",
    "the human heart", "electric cars", "birthdays", "painting", "the post office",
    "hiking", "submarines", "apples", "thunderstorms", "board games", "airports",
    "whales", "farming", "libraries of seeds", "the alphabet", "camping",
    "fireflies", "rainbows", "marathons", "bakeries", "glaciers", "puppets", "space travel",
]

# Topics that only the held-out split uses, so that it is large enough for the head-to-head gate
# to see a 5-point change in the real pass rate (README "Promotion"). Generated after the others
# from a separate stream: the training prompts and the first held-out ones are as before.
EVAL_ONLY_TOPICS = [
    "volleyball", "umbrellas", "the violin", "coral reefs", "lemons", "skyscrapers", "ants", "pottery",
    "the printing press", "wind turbines", "caves", "the piano", "sunflowers", "ferries", "origami",
    "hot air balloons", "telescopes", "squirrels", "picnics", "knitting", "waterfalls", "the zoo",
    "pancakes", "canoes", "libraries of music", "radio", "the desert fox", "bees' wax candles", "castles",
    "the rainy season", "crossword puzzles", "lanterns", "swimming", "the compass", "strawberries",
    "tortoises", "the harbor", "yoga", "bookshops", "the night sky",
]

TASKS = [
    "Write a short paragraph about {topic}.",
    "Explain {topic} to a ten-year-old.",
    "Give some advice to someone who is curious about {topic}.",
    "Describe the main benefits of {topic}.",
    "Share a few interesting facts about {topic}.",
    "Write a short poem about {topic}.",
    "Summarize why people care about {topic}.",
    "Tell a very short story involving {topic}.",
]

_CHOICES: dict[str, list[dict]] = {
    "lowercase": [{}],
    "uppercase": [{}],
    "max_words": [{"n": n} for n in (15, 25, 40)],
    "bullets": [{"n": n} for n in (2, 3, 4)],
    "keyword": [{"word": w} for w in ("remarkable", "balance", "journey", "simple", "future", "energy")],
    "no_commas": [{}],
    "end_phrase": [{"phrase": p} for p in ("Is there anything else I can help with?", "That is all.", "Thank you for reading.")],
    "start_word": [{"word": w} for w in ("Yes", "Today", "Imagine", "Certainly")],
    "quotes": [{}],
}

# Pairs that cannot both hold (case rules against capitalised phrases, layouts that clash).
_CONFLICTS = {
    frozenset(p)
    for p in [
        ("lowercase", "uppercase"), ("lowercase", "start_word"), ("lowercase", "end_phrase"),
        ("uppercase", "start_word"), ("uppercase", "end_phrase"), ("uppercase", "keyword"),
        ("bullets", "quotes"), ("bullets", "start_word"), ("bullets", "end_phrase"),
        ("quotes", "end_phrase"), ("quotes", "start_word"), ("bullets", "max_words"),
    ]
}


class PromptError(UserError, ValueError):
    pass


def builtin_prompts(seed: int = 0, per_topic: int = 7, eval_topics: int = 12) -> list[Prompt]:
    """420 prompts on 60 topics (12 held out), then 320 held-out prompts on 40 topics of their own."""
    rng = random.Random(seed)
    topics = TOPICS[:]
    rng.shuffle(topics)
    held_out = set(topics[:eval_topics])
    prompts = _generate(rng, sorted(TOPICS), per_topic, held_out)
    extra = random.Random(f"{seed}-eval-only")
    return prompts + _generate(extra, EVAL_ONLY_TOPICS, len(TASKS), set(EVAL_ONLY_TOPICS))


def _generate(rng: random.Random, topics: list[str], per_topic: int, held_out: set[str]) -> list[Prompt]:
    kinds = list(_CHOICES)
    prompts = []
    for topic in topics:
        for j, task in enumerate(rng.sample(TASKS, per_topic)):
            while True:
                chosen = rng.sample(kinds, 1 if rng.random() < 0.3 else 2)
                if not any(frozenset(p) in _CONFLICTS for p in itertools.combinations(chosen, 2)):
                    break
            cons = [{"kind": k, **rng.choice(_CHOICES[k])} for k in chosen]
            text = " ".join([task.format(topic=topic)] + [constraints.describe(c) for c in cons])
            prompts.append(
                Prompt(
                    id=f"{topic.replace(' ', '-')}-{j}",
                    text=text,
                    constraints=cons,
                    topic=topic,
                    split="eval" if topic in held_out else "train",
                )
            )
    return prompts


def load_prompts(source: str, seed: int = 0, field: str = "prompt", eval_fraction: float = 0.2,
                 reference_field: str = "reference") -> list[Prompt]:
    """Load every prompt of a source, each marked train or eval."""
    if source == "builtin":
        return builtin_prompts(seed)
    if source == "builtin:gold":
        return load_prompts(str(GOLD), seed, "prompt", eval_fraction, "reference")
    if source.startswith("hf:"):
        rows = [(f"{source}: row {i + 1}", row) for i, row in enumerate(_load_hf(source[3:]))]
        return _from_rows(rows, field, seed, eval_fraction, reference_field)
    path = Path(source).expanduser()
    if not path.is_file():
        raise PromptError(f"prompts.source: file not found: {source}")
    if path.suffix != ".jsonl":
        raise PromptError(
            f"prompts.source: expected 'builtin', 'builtin:gold', 'hf:<dataset>' or a .jsonl file, got {source}"
        )
    import json

    rows = []
    for where, line in read_lines(path, "prompts.source"):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise PromptError(f"{where}: invalid JSON: {e.msg}") from None
        if not isinstance(row, dict) or field not in row:
            raise PromptError(f"{where}: missing field {field!r} (prompts.field)")
        rows.append((where, row))
    return _from_rows(rows, field, seed, eval_fraction, reference_field)


def _load_hf(spec: str) -> list[dict]:
    import datasets

    name, _, split = spec.partition(":")
    try:
        return list(datasets.load_dataset(name, split=split or "train"))
    except Exception as e:  # offline, unknown id, bad split: all the user's to fix
        raise PromptError(f"prompts.source: cannot load dataset {name!r} (split {split or 'train'!r}): {e}") from None


def _from_rows(rows: list[tuple[str, dict]], field: str, seed: int, eval_fraction: float,
               reference_field: str = "reference") -> list[Prompt]:
    """Prompts from (where, row) pairs; `where` ('FILE:LINE') names the row in every error."""
    prompts, first_seen = [], {}
    for i, (where, row) in enumerate(rows):
        cons = row.get("constraints") or []
        for c in cons:
            try:
                constraints.validate(c)
            except constraints.ConstraintError as e:
                raise PromptError(f"{where}: {e}") from None
        text = row[field]
        if not isinstance(text, str):
            raise PromptError(f"{where}: {field!r} is {type(text).__name__}, not text (prompts.field)")
        if not text.strip():
            raise PromptError(f"{where}: {field!r} is empty: every prompt needs text (prompts.field)")
        pid = str(row.get("id", i))
        if pid in first_seen:
            raise PromptError(f"{where}: prompt id {pid!r} is already used at {first_seen[pid]}: samples and "
                              "judgments are keyed by prompt id, so ids must be unique")
        first_seen[pid] = where
        try:
            prompt = Prompt(id=pid, text=text, constraints=cons, topic=row.get("topic"),
                            split=row.get("split", "train"), reference=row.get(reference_field))
        except ValidationError as e:
            err = e.errors()[0]
            raise PromptError(f"{where}: {'.'.join(map(str, err['loc']))}: {err['msg']}") from None
        prompt._where = where
        prompts.append(prompt)
    if not prompts:
        raise PromptError(f"prompts.source: {rows and rows[0][0] or 'the source'} has no prompts")
    if not any(p.split == "eval" for p in prompts):
        # No split given: hold out a seeded share for evaluation.
        order = list(range(len(prompts)))
        random.Random(seed).shuffle(order)
        for i in order[: max(1, int(len(prompts) * eval_fraction))]:
            prompts[i].split = "eval"
    return prompts


def name_prompts(prompts: list[Prompt], why, shown: int = 3) -> str:
    """The first few prompts of an error, each with where it was read and `why(prompt)`."""
    named = "; ".join(f"{p._where or 'prompt'} (id {p.id!r}): {why(p)}" for p in prompts[:shown])
    return named + (f"; and {len(prompts) - shown} more" if len(prompts) > shown else "")


def partition(prompts: list[Prompt], iteration: int, size: int, seed: int = 0) -> list[Prompt]:
    """The training prompts of `iteration` (1-based): disjoint from every other iteration's."""
    train = [p for p in prompts if p.split == "train"]
    random.Random(seed).shuffle(train)
    start = (iteration - 1) * size
    if start + size > len(train):
        raise PromptError(
            f"prompts.partition_size: {len(train)} training prompts give only "
            f"{len(train) // size} fresh partitions of {size}; iteration {iteration} needs more"
        )
    return train[start : start + size]


def eval_split(prompts: list[Prompt], n: int) -> list[Prompt]:
    held_out = [p for p in prompts if p.split == "eval"]
    return held_out[:n] if n else held_out


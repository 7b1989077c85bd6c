"""Did it forget? General knowledge scored without generation, for π_t beside π_0.

Each item is a question with a few short options. The question is the user turn of the policy's
chat template and each option is scored as the assistant's reply: the sum of its tokens'
log-probabilities (lm-evaluation-harness's `acc`). The highest-scoring option is the policy's
answer. No sampling and no judge, so the figure moves only when the weights do, and a
self-improvement loop that narrows the policy cannot game it.

Sources: `builtin` (nash/data/retention.jsonl: 240 items on subjects far from the training
prompts), a .jsonl path, or `hf:<dataset>[:split]`, each row with `question`, `choices`, `answer`
(the correct choice's index) and optionally `id` and `subject`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from nash.errors import UserError
from nash.models import chat_text, load_causal_lm, load_tokenizer
from nash.precision import default_device
from nash.records import read_lines

BUILTIN = Path(__file__).parent / "data" / "retention.jsonl"
KEY = "eval.retention.source"


class RetentionError(UserError, ValueError):
    pass


class Item(BaseModel):
    id: str
    question: str = Field(min_length=1)
    choices: list[str] = Field(min_length=2)
    answer: int
    subject: str | None = None

    @field_validator("choices")
    @classmethod
    def _choices(cls, v):
        if any(not isinstance(c, str) or not c.strip() for c in v):
            raise ValueError("every choice must be non-empty text")
        if len(set(v)) != len(v):
            raise ValueError("choices must be distinct")
        return v

    @model_validator(mode="after")
    def _answer(self):
        if not 0 <= self.answer < len(self.choices):
            raise ValueError(f"answer {self.answer} is not the index of one of the {len(self.choices)} choices")
        return self


def load_items(source: str = "builtin", n: int = 0) -> list[Item]:
    """The probe's items (the first `n`; 0: all); an error names the file, the line and the key."""
    if source.startswith("hf:"):
        import datasets

        name, _, split = source[3:].partition(":")
        try:
            rows = [(f"{source}: row {i + 1}", dict(r))
                    for i, r in enumerate(datasets.load_dataset(name, split=split or "test"))]
        except Exception as e:  # offline, unknown id, bad split: all the user's to fix
            raise RetentionError(f"{KEY}: cannot load dataset {name!r} (split {split or 'test'!r}): {e}") from None
    else:
        path = BUILTIN if source == "builtin" else Path(source).expanduser()
        if not path.is_file():
            raise RetentionError(f"{KEY}: file not found: {source}")
        rows = []
        for where, line in read_lines(path, KEY):
            if line.strip():
                try:
                    rows.append((where, json.loads(line)))
                except json.JSONDecodeError as e:
                    raise RetentionError(f"{where}: invalid JSON: {e.msg} ({KEY})") from None
    items, seen = [], set()
    for i, (where, row) in enumerate(rows):
        if not isinstance(row, dict):
            raise RetentionError(f"{where}: expected an object with question, choices, answer ({KEY})")
        try:
            item = Item(id=str(row.get("id", i)), **{k: row.get(k) for k in ("question", "choices", "answer")},
                        subject=row.get("subject"))
        except ValidationError as e:
            err = e.errors()[0]
            field = ".".join(map(str, err["loc"])) or "row"
            raise RetentionError(f"{where}: {field}: {err['msg'].removeprefix('Value error, ')} ({KEY})") from None
        if item.id in seen:
            raise RetentionError(f"{where}: id {item.id!r} is used twice ({KEY})")
        seen.add(item.id)
        items.append(item)
    if not items:
        raise RetentionError(f"{KEY}: {source} has no items")
    return items[:n] if n else items


def option_logprobs(model_path: str, items: list[Item], dtype: str = "float32") -> list[list[float]]:
    """For each item, the summed log-probability of each choice as the reply to its question.

    The question is read once per item and its cache shared by the options, which are a few tokens
    each: on the embedded model that scored 40 items in 10.4 s against 15.2 s for every option
    read from the start, with the same scores to 3e-5.
    """
    import torch

    from nash.drift import _pad

    device = default_device()
    tok = load_tokenizer(model_path)
    model = load_causal_lm(model_path, dtype, device)
    out = []
    for item in items:
        head = tok(chat_text(tok, item.question), add_special_tokens=False)["input_ids"]
        conts = [tok(c, add_special_tokens=False)["input_ids"] for c in item.choices]
        with torch.inference_mode():
            first = model(input_ids=torch.tensor([head], device=device), use_cache=True, logits_to_keep=1)
            lead = torch.log_softmax(first.logits[0, -1].float(), -1)  # predicts each option's first token
            cache = getattr(first, "cache", None)
            shared = {"cache": cache} if cache is not None else {"past_key_values": first.past_key_values}
            next(iter(shared.values())).batch_repeat_interleave(len(conts))
            ids, attn = _pad(conts, tok.pad_token_id, device)  # right-padded: pads follow every real token
            mask = torch.cat([torch.ones(len(conts), len(head), dtype=attn.dtype, device=device), attn], 1)
            logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask, **shared).logits.float(), -1)
        out.append([float(lead[c[0]]) + sum(float(logp[j, k - 1, c[k]]) for k in range(1, len(c)))
                    for j, c in enumerate(conts)])
    return out


def score(model_path: str, items: list[Item], dtype: str = "float32") -> dict:
    """Each item's chosen option and whether it is right; accuracy and its standard error."""
    scores = option_logprobs(model_path, items, dtype)
    per_item = {}
    for item, s in zip(items, scores):
        chosen = max(range(len(s)), key=s.__getitem__)
        per_item[item.id] = {"chosen": chosen, "correct": chosen == item.answer, "logprobs": [round(x, 4) for x in s]}
    acc = sum(r["correct"] for r in per_item.values()) / len(items)
    return {"items": len(items), "accuracy": acc, "stderr": math.sqrt(acc * (1 - acc) / len(items)),
            "per_item": per_item}


def compare(new: dict, old: dict, items: list[Item]) -> dict:
    """π_t against π_0 on the same items: the change in accuracy with its paired standard error,
    the items forgotten and learned, and the change by subject."""
    diffs = [int(new["per_item"][i.id]["correct"]) - int(old["per_item"][i.id]["correct"]) for i in items]
    n = len(diffs)
    mean = sum(diffs) / n
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1)) if n > 1 else 0.0
    subjects: dict[str, list[int]] = {}
    for item, d in zip(items, diffs):
        subjects.setdefault(item.subject or "-", []).append(d)
    forgotten = [i.id for i, d in zip(items, diffs) if d < 0]
    return {"items": n, "accuracy": new["accuracy"], "stderr": new["stderr"],
            "initial_accuracy": old["accuracy"], "initial_stderr": old["stderr"],
            "change": mean, "change_stderr": sd / math.sqrt(n), "drop": -mean,
            "forgotten": len(forgotten), "learned": sum(1 for d in diffs if d > 0),
            "forgotten_items": forgotten[:20],
            "by_subject": {s: round(sum(ds) / len(ds), 4) for s, ds in sorted(subjects.items())}}

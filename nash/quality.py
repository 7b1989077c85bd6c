"""Is an answer a real answer? Text measures of degeneration, with no model.

These feed two places: the `quality` judge's gates (judges/quality.py, which adds an
embedding-based topic check) and every evaluation's degeneration report, where "off topic"
is lexical (the answer never names its topic), a signal the training judge does not use.
"""

from __future__ import annotations

import re

WORD = re.compile(r"[A-Za-z0-9]+(?:'[A-Za-z]+)?")
STOP = {"the", "a", "an", "of", "and", "to", "in", "on", "for", "with", "about", "human"}

# Defaults of both the judge and the evaluation: "at least a sentence".
MIN_WORDS = 6
MIN_DISTINCT_2 = 0.5
MAX_REPEATED_3 = 0.3


def words(text: str) -> list[str]:
    return WORD.findall(text.lower())


def ngrams(ws: list[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(ws[i:i + n]) for i in range(len(ws) - n + 1)]


def distinct_n(text: str, n: int = 2) -> float | None:
    """Unique n-grams over all n-grams (None for fewer than n words)."""
    grams = ngrams(words(text), n)
    return len(set(grams)) / len(grams) if grams else None


def repeated_ngram_share(text: str, n: int = 3) -> float | None:
    """Share of n-gram occurrences that repeat an earlier one (None for fewer than n words)."""
    grams = ngrams(words(text), n)
    return 1 - len(set(grams)) / len(grams) if grams else None


def _stem(w: str) -> str:
    """Singular of a plural: libraries, boxes, bees -> library, box, bee."""
    if len(w) < 4:
        return w
    if w.endswith("ies"):
        return w[:-3] + "y"
    if w.endswith(("sses", "xes", "ches", "shes")):
        return w[:-2]
    if w.endswith("s") and not w.endswith("ss"):
        return w[:-1]
    return w


def names_topic(text: str, topic: str | None) -> bool | None:
    """Whether the answer names a content word of its topic (plural or singular); None without a topic."""
    if not topic:
        return None
    keys = {_stem(w) for w in words(topic) if w not in STOP}
    found = {_stem(w) for w in words(text)}
    # Compound topics ("honeybees", "lighthouses") also count when a part is named ("bees").
    return any(k in found or any(len(f) >= 3 and k.endswith(f) and len(k) - len(f) <= 5 for f in found)
               for k in keys)


def is_repetitive(d2: float | None, r3: float | None, min_distinct_2: float = MIN_DISTINCT_2,
                  max_repeated_3: float = MAX_REPEATED_3) -> bool:
    """From an answer's distinct-2 and repeated-trigram share (None: too few words to tell)."""
    return (d2 is not None and d2 < min_distinct_2) or (r3 is not None and r3 > max_repeated_3)


def degeneration(text: str, topic: str | None, min_words: int = MIN_WORDS) -> dict:
    """The flags of one answer; `substantive` is a sentence or more, not repetitive, on its topic."""
    n = len(words(text))
    on_topic = names_topic(text, topic)
    d2 = distinct_n(text, 2)
    flags = {
        "words": n,
        "distinct_2": d2,
        "empty": n == 0,
        "short": n < min_words,
        "repetitive": is_repetitive(d2, repeated_ngram_share(text, 3)),
        "off_topic": on_topic is False and n >= min_words,  # a short answer counts as short only
    }
    flags["substantive"] = not (flags["short"] or flags["repetitive"] or flags["off_topic"])
    return flags


def share(flags: list[dict], key: str) -> float | None:
    return sum(bool(f[key]) for f in flags) / len(flags) if flags else None


def report(texts: list[str], topics: list[str | None], min_words: int = MIN_WORDS) -> dict:
    """Shares of empty, short, repetitive, off-topic and substantive answers, distinct-2, mean words."""
    flags = [degeneration(t, tp, min_words) for t, tp in zip(texts, topics)]
    d2 = [f["distinct_2"] for f in flags if f["distinct_2"] is not None]
    return {
        "n": len(flags),
        "empty": share(flags, "empty"),
        "short": share(flags, "short"),
        "repetitive": share(flags, "repetitive"),
        "off_topic": share(flags, "off_topic") if any(t for t in topics) else None,
        "substantive": share(flags, "substantive"),
        "distinct_2": sum(d2) / len(d2) if d2 else None,
        "mean_words": sum(f["words"] for f in flags) / len(flags) if flags else None,
        "flags": flags,
    }

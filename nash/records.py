"""One record type per JSONL file of an iteration directory, and the JSONL I/O for them.

Files are written atomically (temp file then rename) or appended line by line, so a
reader never sees half a record, and a crash keeps every line already written.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError


class Record(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Prompt(Record):
    id: str
    text: str
    constraints: list[dict[str, Any]] = []
    topic: str | None = None
    split: Literal["train", "eval"] = "train"
    reference: str | None = None  # a gold / teacher answer, e.g. GPT-4-Turbo's
    generator: str | None = None  # who wrote the reference (AlpacaEval's `generator`)


class Sample(Record):
    """One candidate response to one prompt (samples.jsonl)."""

    prompt_id: str
    candidate: int
    prompt: str
    response: str
    num_tokens: int
    policy: str


class Judgment(Record):
    """One judge result (judgments.jsonl, append-only).

    Pointwise: `candidate` is `scored` with a `score`, or `failed`. Pairwise: `candidate`
    against `other` ends `preferred` (with `winner`), `tie`, or `failed`. A failure keeps
    the judge's raw reply and the error, and is never turned into a preference.
    """

    prompt_id: str
    candidate: int
    judge: str
    outcome: Literal["scored", "preferred", "tie", "failed"]
    score: float | None = None
    other: int | None = None
    winner: int | None = None
    details: dict[str, Any] = {}
    raw: str | None = None
    error: str | None = None
    requests: int = 0
    cached: int = 0
    tokens_in: int = 0
    tokens_out: int = 0
    cost_usd: float = 0.0


# What a judgment spent; sums of these give the spend of a stage, an iteration and a run.
USAGE = ("requests", "cached", "tokens_in", "tokens_out", "cost_usd")


class Pair(Record):
    """A preference pair for the contrastive update (pairs.jsonl)."""

    prompt_id: str
    prompt: str
    chosen: str
    rejected: str
    chosen_candidate: int
    rejected_candidate: int
    chosen_score: float | None = None  # None: no judge ranked the pair (SPIN)
    rejected_score: float | None = None
    margin: float | None = None
    chosen_tokens: int | None = None
    rejected_tokens: int | None = None
    chosen_policy: str | None = None  # who wrote it: iter_NNN (the sampling policy) or reference
    rejected_policy: str | None = None
    iteration: int | None = None  # the iteration whose candidates made the pair (replay: an earlier one)


R = TypeVar("R", bound=Record)


class RecordError(ValueError):
    pass


def read_jsonl(path: str | os.PathLike, record: type[R]) -> list[R]:
    out = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                out.append(record.model_validate_json(line))
            except ValidationError as e:
                err = e.errors()[0]
                loc = ".".join(str(p) for p in err["loc"]) or "<line>"
                raise RecordError(f"{path}:{lineno}: {loc}: {err['msg']}") from None
    return out


def write_jsonl(path: str | os.PathLike, records: Iterable[Record]) -> Path:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(r.model_dump_json() + "\n")
    os.replace(tmp, path)
    return path


def append_jsonl(path: str | os.PathLike, records: Iterable[Record]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        for r in records:
            f.write(r.model_dump_json() + "\n")
            f.flush()


def write_json(path: str | os.PathLike, data: Any) -> Path:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path

"""One record type per JSONL file of an iteration directory, and the JSONL I/O for them.

Files are written atomically (temp file, fsync, rename, fsync of the directory) or appended
a whole group of lines per write, so a reader never sees half a record, and a crash keeps
every line already written. A kill in the middle of an append can still leave the last line
cut short: `repair_jsonl` drops it (with a warning) before the file is read or appended to.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, PrivateAttr, ValidationError, field_validator

from nash.errors import UserError

log = logging.getLogger("nash")


class Record(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Prompt(Record):
    id: str
    text: str
    # Where the prompt was read ('FILE:LINE', or 'SOURCE: row N'), for error messages; not written out.
    _where: str | None = PrivateAttr(default=None)
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

    @field_validator("score")
    @classmethod
    def _finite(cls, v):
        # json reads NaN and Infinity; a non-finite score would sort and average silently wrong
        if v is not None and not math.isfinite(v):
            raise ValueError(f"score {v} is not a finite number")
        return v
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


class RecordError(UserError, ValueError):
    pass


def read_lines(path: str | os.PathLike, key: str | None = None) -> Iterator[tuple[str, str]]:
    """('FILE:LINE', text) for each line of a UTF-8 text file, read as a stream.

    A line that is not UTF-8 is an error naming the file, the line and `key` (the config key
    that names the file), not a UnicodeDecodeError from deep inside a stage.
    """
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise RecordError(f"{path}:{lineno}: not UTF-8 ({e.reason} at byte {e.start} of the line: "
                                  f"{raw[max(0, e.start - 10) : e.start + 10]!r}){f' ({key})' if key else ''}; "
                                  "save the file as UTF-8") from None
            yield f"{path}:{lineno}", text.removeprefix("\ufeff") if lineno == 1 else text


def read_jsonl(path: str | os.PathLike, record: type[R]) -> list[R]:
    return list(iter_jsonl(path, record))


def iter_jsonl(path: str | os.PathLike, record: type[R]) -> Iterator[R]:
    """The records of a JSONL file, one at a time: memory does not grow with the file."""
    for where, line in read_lines(path):
        if not line.strip():
            continue
        try:
            yield record.model_validate_json(line)
        except ValidationError as e:
            err = e.errors()[0]
            loc = ".".join(str(p) for p in err["loc"]) or "<line>"
            raise RecordError(f"{where}: {loc}: {err['msg']}") from None


def lines_at(path: str | os.PathLike) -> Iterator[tuple[int, bytes]]:
    """(byte offset, raw line) for each line of a file, as a stream."""
    with open(path, "rb") as f:
        offset = 0
        for raw in f:
            yield offset, raw
            offset += len(raw)


def prompt_blocks(path: str | os.PathLike) -> dict[str, tuple[int, int]]:
    """Where each prompt's records lie in a JSONL file written prompt by prompt: {prompt id: (start,
    end)} byte offsets, read in one pass that keeps only the offsets."""
    blocks: dict[str, tuple[int, int]] = {}
    pid, start, end = None, 0, 0
    for pos, line in lines_at(path):
        end = pos + len(line)
        if line.strip():
            this = json.loads(line)["prompt_id"]
            if this != pid:
                if pid is not None:
                    blocks[pid] = (start, pos)
                if this in blocks:
                    raise RecordError(f"{path}: the records of prompt {this!r} are not contiguous")
                pid, start = this, pos
    if pid is not None:
        blocks[pid] = (start, end)
    return blocks


def read_block(path: str | os.PathLike, span: tuple[int, int], record: type[R]) -> list[R]:
    with open(path, "rb") as f:
        f.seek(span[0])
        data = f.read(span[1] - span[0])
    return [record.model_validate_json(line) for line in data.splitlines() if line.strip()]


def grouped(records: Iterable[R], path: str | os.PathLike = "<records>") -> Iterator[tuple[str, list[R]]]:
    """(prompt_id, its records) for records that come prompt by prompt, as nash writes samples and
    judgments; a prompt whose records are not contiguous is an error, not a silent split."""
    seen: set[str] = set()
    pid, group = None, []
    for r in records:
        if r.prompt_id != pid:
            if group:
                yield pid, group
            if r.prompt_id in seen:
                raise RecordError(f"{path}: the records of prompt {r.prompt_id!r} are not contiguous")
            seen.add(r.prompt_id)
            pid, group = r.prompt_id, []
        group.append(r)
    if group:
        yield pid, group


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename or a new file in directory `path` survive a power cut."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temporary_name(path: Path) -> Path:
    """A temporary file next to `path`, unique to this host and process: two machines that write one
    file of a run on shared disk never write the same temporary file."""
    return path.with_name(f"{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")


def replace_durably(tmp: Path, path: Path) -> None:
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def write_jsonl(path: str | os.PathLike, records: Iterable[Record]) -> Path:
    path = Path(path)
    tmp = temporary_name(path)
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(r.model_dump_json() + "\n")
    replace_durably(tmp, path)
    return path


def append_jsonl(path: str | os.PathLike, records: Iterable[Record]) -> None:
    """Append the records in one write: a kill leaves all of them, none, or a last line cut short."""
    block = "".join(r.model_dump_json() + "\n" for r in records)
    with open(path, "a", encoding="utf-8") as f:
        f.write(block)
        f.flush()
        os.fsync(f.fileno())


def repair_jsonl(path: str | os.PathLike, record: type[Record] | None = None) -> int:
    """Drop a last line cut short by a kill (no newline, or not a valid record); return bytes dropped.

    Only the last line: a bad line followed by good ones is not a crash's doing and stays an error.
    """
    path = Path(path)
    if not path.is_file():
        return 0
    size = path.stat().st_size
    if not size:
        return 0
    # Only the tail is read: the file may hold hundreds of megabytes of judgments.
    tail = 1 << 16
    while True:
        with open(path, "rb") as f:
            f.seek(max(0, size - tail))
            data = f.read()
        base = size - len(data)
        inner = data[:-1] if data.endswith(b"\n") else data
        if b"\n" in inner or base == 0:
            break
        tail *= 4
    if not data.endswith(b"\n"):
        keep = base + data.rfind(b"\n") + 1
    else:
        start = data.rfind(b"\n", 0, len(data) - 1) + 1
        line = data[start:].decode("utf-8", errors="replace")
        keep = size
        try:
            record.model_validate_json(line) if record else json.loads(line)
        except (ValidationError, ValueError):
            keep = base + start
    if keep == size:
        return 0
    with open(path, "rb+") as f:
        f.truncate(keep)
        os.fsync(f.fileno())
    lineno = 1
    with open(path, "rb") as f:  # counted in blocks, never read whole
        while block := f.read(min(1 << 20, keep - f.tell())):
            lineno += block.count(b"\n")
    log.warning("%s: line %d was cut short by an interrupted write (%d bytes); dropped it", path, lineno,
                size - keep)
    return size - keep


def write_json(path: str | os.PathLike, data: Any) -> Path:
    path = Path(path)
    tmp = temporary_name(path)
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    replace_durably(tmp, path)
    return path

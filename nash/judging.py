"""Judging: run a judge over sampled candidates, appending each prompt's results as they arrive.

`judgments.jsonl` is append-only, one write per prompt (per chunk, below). A prompt whose
candidates all have a record is not judged again, so a crash or a re-run never pays for the
same judgment twice; a last line cut short by a kill is dropped on resume, and that prompt is
judged again (its replies that reached the judge's cache are not paid again). Prompts are
judged `judge.concurrency` at a time.

A judge that computes on this machine (a local LM, the quality embedder, a reward model, or a
composite of them with rules) has `score_batch`: it is handed chunks of prompts that hold about
`batch_requests` requests (at least one prompt), so one forward pass batches the requests of
several prompts, and each chunk is appended in one write when it completes. A kill loses at
most the unfinished chunk: local compute, never a paid request. Remote judges (openai, the
`self` judge on a served policy) keep judging prompt by prompt, `concurrency` at a time.

When the judge's budget runs out, judging stops cleanly: what was judged is kept and the
prompts left are counted, not recorded (for a chunked judge, the chunk it ran out in too).

The judge stage reads samples.jsonl as a stream, prompt by prompt, holds only the prompts in
flight, and counts the judgments it writes instead of keeping them: its memory does not grow
with the candidates (600k of them at 100k prompts; benchmarks/scale.py).
"""

from __future__ import annotations

import json
import threading
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from itertools import islice
from pathlib import Path

from tqdm.auto import tqdm

from nash.judges.base import BudgetExhausted, Judge
from nash.records import (
    USAGE,
    Judgment,
    Prompt,
    Sample,
    append_jsonl,
    grouped,
    iter_jsonl,
    read_lines,
    repair_jsonl,
    replace_durably,
    temporary_name,
)
from nash.supervisor import Progress

OUTCOMES = ("scored", "preferred", "tie", "failed")  # the outcomes of Judgment records, counted


class Tally:
    """Outcome counts, usage and the first error of judgments, added up as they pass."""

    def __init__(self):
        self.counts = dict.fromkeys(OUTCOMES, 0) | dict.fromkeys(USAGE, 0)
        self.records, self.first_error = 0, None

    def add(self, judgments: Iterable[Judgment]) -> None:
        for j in judgments:
            self.records += 1
            self.counts[j.outcome] += 1
            for key in USAGE:
                self.counts[key] += getattr(j, key)
            if self.first_error is None and j.error:
                self.first_error = j.error

    def summary(self) -> dict:
        return {**self.counts, "cost_usd": round(self.counts["cost_usd"], 6)}


def judge_samples(
    judge: Judge,
    prompts: dict[str, Prompt],
    samples: list[Sample] | Path,
    out_path: Path,
    progress: Progress | None = None,
    keep: bool = True,
) -> tuple[list[Judgment], dict]:
    """Judge every prompt without a complete record; return the judgments (all of them, with `keep`)
    and stage info: `counts` (every record's outcomes and usage), `records`, `first_error`,
    `unjudged_prompts`, `budget_stop`.

    `samples`: a list, or the path of a samples file, which is read as a stream, prompt by
    prompt; with `keep=False` too, nothing held grows with the number of candidates.
    """
    if isinstance(samples, Path):
        expected, source = _expected(samples), samples

        def stream():
            return iter_jsonl(source, Sample)
    else:
        expected, rows = defaultdict(set), samples
        for s in rows:
            expected[s.prompt_id].add(s.candidate)

        def stream():
            return iter(rows)
    judged, tally, done = _judged(out_path, expected, keep)
    lock = threading.Lock()
    todo = sum(1 for pid, c in expected.items() if not c <= judged.get(pid, set()))
    bar = tqdm(total=todo, desc="judging", unit="prompt", leave=False)
    groups: dict[str, list[Sample]] = {}

    def pending() -> Iterator[str]:
        for pid, group in grouped(stream(), samples if isinstance(samples, Path) else "samples"):
            if expected[pid] <= judged.get(pid, set()):
                continue
            if pid not in prompts:
                raise KeyError(f"{out_path}: sample for unknown prompt id {pid!r}")
            groups[pid] = sorted(group, key=lambda s: s.candidate)
            yield pid

    def record(chunk: list[str], per_prompt: list[list[Judgment]]) -> None:
        results = []
        for pid, js in zip(chunk, per_prompt):
            for j, s in zip(js, groups[pid]):
                j.candidate = s.candidate
            results += js
        with lock:
            append_jsonl(out_path, results)
            tally.add(results)
            if keep:
                done.extend(results)
            for pid in chunk:
                judged[pid] = {s.candidate for s in groups.pop(pid)}
            bar.update(len(chunk))
            if progress:
                progress(bar.n, todo)

    def items(chunk: list[str]) -> list[tuple[Prompt, list[str]]]:
        return [(prompts[pid], [s.response for s in groups[pid]]) for pid in chunk]

    stopped = None
    limits = batch_limits(judge)
    queue = pending()
    if limits:  # one chunk at a time, each batched in the judge
        for chunk in chunks(((pid, len(groups[pid])) for pid in queue), limits):
            try:
                record(chunk, judge.score_batch(items(chunk)))
            except BudgetExhausted as e:
                stopped = str(e)
                break
    else:  # prompt by prompt, `concurrency` at a time; only the prompts in flight are held
        def judge_one(pid: str) -> None:
            ((prompt, candidates),) = items([pid])
            record([pid], [judge.score(prompt, candidates)])

        workers = max(1, getattr(judge, "concurrency", 1))
        with ThreadPoolExecutor(workers) as pool:
            running = {pool.submit(judge_one, pid) for pid in islice(queue, workers)}
            while running:
                finished, running = wait(running, return_when=FIRST_COMPLETED)
                for f in finished:
                    try:
                        f.result()
                    except BudgetExhausted as e:
                        stopped = str(e)
                if stopped is None:
                    running |= {pool.submit(judge_one, pid) for pid in islice(queue, len(finished))}
    bar.close()
    unjudged = sum(1 for pid, c in expected.items() if not c <= judged.get(pid, set()))
    info = {"unjudged_prompts": unjudged, "budget_stop": stopped, "counts": tally.summary(),
            "records": tally.records, "first_error": tally.first_error}
    return done, info


def _expected(path: Path) -> dict[str, set[int]]:
    """Each prompt's candidate numbers in a samples file, read lightly (two fields a line)."""
    out: dict[str, set[int]] = defaultdict(set)
    for _, line in read_lines(path):
        if line.strip():
            row = json.loads(line)
            out[row["prompt_id"]].add(row["candidate"])
    return out


def _judged(out_path: Path, expected: dict[str, set[int]],
            keep: bool) -> tuple[dict[str, set[int]], Tally, list[Judgment]]:
    """The candidates already judged, per prompt, from the records on disk (read as a stream, once
    unless the file must be rewritten), with their tally and, with `keep`, the records.

    The first record of each (prompt, candidate) counts; a prompt not judged in full (a kill
    in the middle of its block of lines) is judged again, and the file is rewritten without
    its records (and without duplicates, which nash never writes).
    """
    if not out_path.is_file():
        return {}, Tally(), []
    repair_jsonl(out_path, Judgment)
    have: dict[str, set[int]] = defaultdict(set)
    extra = 0
    tally, kept = Tally(), []
    for j in iter_jsonl(out_path, Judgment):
        if j.candidate in have[j.prompt_id]:
            extra += 1
        have[j.prompt_id].add(j.candidate)
        tally.add([j])
        if keep:
            kept.append(j)
    whole = {pid for pid, got in have.items() if expected.get(pid, set()) <= got}
    if extra or len(whole) != len(have):
        tmp = temporary_name(out_path)
        seen: set[tuple[str, int]] = set()
        tally, kept = Tally(), []  # the records that stay
        with open(tmp, "w", encoding="utf-8") as f:
            for j in iter_jsonl(out_path, Judgment):
                if j.prompt_id in whole and (j.prompt_id, j.candidate) not in seen:
                    seen.add((j.prompt_id, j.candidate))
                    f.write(j.model_dump_json() + "\n")
                    tally.add([j])
                    if keep:
                        kept.append(j)
        replace_durably(tmp, out_path)
    return {pid: have[pid] for pid in whole}, tally, kept


def batch_limits(judge) -> list[tuple[int, Callable[[int], int]]]:
    """(requests batched in one pass, requests of a prompt of k candidates) of each part of `judge`
    that batches across prompts; [] where it is judged prompt by prompt.

    A judge batches when it has `score_batch` and is judged one prompt at a time (concurrency 1:
    remote judges, alone or in a composite, keep their concurrency); its parts (a composite's
    components) that give `batch_requests` size the chunks, or the judge itself where it gives them
    (a cascade); rules give none.
    """
    if not hasattr(judge, "score_batch") or getattr(judge, "concurrency", 1) > 1:
        return []

    def parts(j):
        if getattr(j, "batch_requests", None) and hasattr(j, "prompt_requests"):
            yield j  # sizes its own chunks (a cascade: the student's candidates)
            return
        for c in getattr(j, "components", None) or []:
            yield from parts(c)

    return [(p.batch_requests, p.prompt_requests) for p in parts(judge)
            if getattr(p, "batch_requests", None) and hasattr(p, "prompt_requests")]


def chunks(pids: Iterable[tuple[str, int]], limits: list[tuple[int, Callable[[int], int]]]) -> Iterator[list[str]]:
    """(prompt id, candidates) in order, in chunks of at least one prompt that hold at most each limit's
    requests. `limits`: as `batch_limits` gives them."""
    chunk, used = [], [0] * len(limits)
    for pid, k in pids:
        need = [f(k) for _, f in limits]
        if chunk and any(u + n > cap for u, n, (cap, _) in zip(used, need, limits)):
            yield chunk
            chunk, used = [], [0] * len(limits)
        chunk.append(pid)
        used = [u + n for u, n in zip(used, need)]
    if chunk:
        yield chunk


def outcome_counts(judgments: list[Judgment]) -> dict:
    tally = Tally()
    tally.add(judgments)
    return tally.summary()

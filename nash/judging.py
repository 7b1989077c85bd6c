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
"""

from __future__ import annotations

import threading
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from itertools import islice
from pathlib import Path

from tqdm.auto import tqdm

from nash.judges.base import BudgetExhausted, Judge
from nash.records import USAGE, Judgment, Prompt, Sample, append_jsonl, read_jsonl, repair_jsonl, write_jsonl
from nash.supervisor import Progress

OUTCOMES = ("scored", "preferred", "tie", "failed")  # the outcomes of Judgment records, counted


def judge_samples(
    judge: Judge,
    prompts: dict[str, Prompt],
    samples: list[Sample],
    out_path: Path,
    progress: Progress | None = None,
) -> tuple[list[Judgment], dict]:
    """Judge every prompt without a complete record; return all judgments and stage info."""
    by_prompt: dict[str, list[Sample]] = defaultdict(list)
    for s in samples:
        by_prompt[s.prompt_id].append(s)
    done = _complete_groups(out_path, by_prompt)
    seen = Counter(j.prompt_id for j in done)
    todo = [pid for pid, group in by_prompt.items() if seen[pid] < len(group)]
    for pid in todo:
        if pid not in prompts:
            raise KeyError(f"{out_path}: sample for unknown prompt id {pid!r}")
    lock = threading.Lock()
    bar = tqdm(total=len(todo), desc="judging", unit="prompt", leave=False)
    groups = {pid: sorted(by_prompt[pid], key=lambda s: s.candidate) for pid in todo}

    def record(chunk: list[str], per_prompt: list[list[Judgment]]) -> None:
        results = []
        for pid, js in zip(chunk, per_prompt):
            for j, s in zip(js, groups[pid]):
                j.candidate = s.candidate
            results += js
        with lock:
            append_jsonl(out_path, results)
            done.extend(results)
            bar.update(len(chunk))
            if progress:
                progress(bar.n, len(todo))

    def items(chunk: list[str]) -> list[tuple[Prompt, list[str]]]:
        return [(prompts[pid], [s.response for s in groups[pid]]) for pid in chunk]

    stopped = None
    limits = batch_limits(judge)
    if limits:  # one chunk at a time, each batched in the judge
        for chunk in chunks(todo, [len(groups[pid]) for pid in todo], limits):
            try:
                record(chunk, judge.score_batch(items(chunk)))
            except BudgetExhausted as e:
                stopped = str(e)
                break
    else:  # prompt by prompt, `concurrency` at a time
        def judge_one(pid: str) -> None:
            ((prompt, candidates),) = items([pid])
            record([pid], [judge.score(prompt, candidates)])

        queue = iter(todo)
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
    judged = {j.prompt_id for j in done}
    info = {"unjudged_prompts": sum(pid not in judged for pid in by_prompt), "budget_stop": stopped}
    return done, info


def batch_limits(judge) -> list[tuple[int, Callable[[int], int]]]:
    """(requests batched in one pass, requests of a prompt of k candidates) of each part of `judge`
    that batches across prompts; [] where it is judged prompt by prompt.

    A judge batches when it has `score_batch` and is judged one prompt at a time (concurrency 1:
    remote judges, alone or in a composite, keep their concurrency); its parts (a composite's
    components) that give `batch_requests` size the chunks; rules give none.
    """
    if not hasattr(judge, "score_batch") or getattr(judge, "concurrency", 1) > 1:
        return []

    def parts(j):
        for c in getattr(j, "components", None) or [j]:
            if c is j:
                yield c
            else:
                yield from parts(c)

    return [(p.batch_requests, p.prompt_requests) for p in parts(judge)
            if getattr(p, "batch_requests", None) and hasattr(p, "prompt_requests")]


def chunks(pids: list[str], sizes: list[int], limits: list[tuple[int, Callable[[int], int]]]) -> Iterator[list[str]]:
    """`pids` in order, in chunks of at least one prompt that hold at most each limit's requests.

    `sizes`: candidates per prompt; `limits`: as `batch_limits` gives them.
    """
    chunk, used = [], [0] * len(limits)
    for pid, k in zip(pids, sizes):
        need = [f(k) for _, f in limits]
        if chunk and any(u + n > cap for u, n, (cap, _) in zip(used, need, limits)):
            yield chunk
            chunk, used = [], [0] * len(limits)
        chunk.append(pid)
        used = [u + n for u, n in zip(used, need)]
    if chunk:
        yield chunk


def _complete_groups(out_path: Path, by_prompt: dict[str, list[Sample]]) -> list[Judgment]:
    """The records of prompts judged in full, once each; the file is rewritten if it held anything else."""
    if not out_path.is_file():
        return []
    repair_jsonl(out_path, Judgment)
    records = read_jsonl(out_path, Judgment)
    first: dict[tuple[str, int | None], Judgment] = {}
    for j in records:
        first.setdefault((j.prompt_id, j.candidate), j)
    have: dict[str, set] = defaultdict(set)
    for pid, candidate in first:
        have[pid].add(candidate)
    whole = {pid for pid, got in have.items() if {s.candidate for s in by_prompt.get(pid, [])} <= got}
    keep = [j for j in first.values() if j.prompt_id in whole]
    if len(keep) != len(records):
        write_jsonl(out_path, keep)
    return keep


def outcome_counts(judgments: list[Judgment]) -> dict:
    counts = Counter(j.outcome for j in judgments)
    out = {k: counts.get(k, 0) for k in OUTCOMES}
    for key in USAGE:
        out[key] = sum(getattr(j, key) for j in judgments)
    out["cost_usd"] = round(out["cost_usd"], 6)
    return out

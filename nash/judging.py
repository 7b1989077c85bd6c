"""Judging: run a judge over sampled candidates, appending each prompt's results as they arrive.

`judgments.jsonl` is append-only, one write per prompt. A prompt whose candidates all have a
record is not judged again, so a crash or a re-run never pays for the same judgment twice; a
last line cut short by a kill is dropped on resume, and that prompt is judged again (its
replies that reached the judge's cache are not paid again). Prompts are
judged `judge.concurrency` at a time. When the judge's budget runs out, judging stops
cleanly: what was judged is kept and the prompts left are counted, not recorded.
"""

from __future__ import annotations

import threading
from collections import Counter, defaultdict
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from itertools import islice
from pathlib import Path

from tqdm.auto import tqdm

from nash.judges.base import BudgetExhausted, Judge
from nash.records import USAGE, Judgment, Prompt, Sample, append_jsonl, read_jsonl, repair_jsonl, write_jsonl
from nash.supervisor import Progress


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

    def judge_one(pid: str) -> None:
        group = sorted(by_prompt[pid], key=lambda s: s.candidate)
        results = judge.score(prompts[pid], [s.response for s in group])
        for j, s in zip(results, group):
            j.candidate = s.candidate
        with lock:
            append_jsonl(out_path, results)
            done.extend(results)
            bar.update(1)
            if progress:
                progress(bar.n, len(todo))

    stopped = None
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
    out = {k: counts.get(k, 0) for k in ("scored", "preferred", "tie", "failed")}
    for key in USAGE:
        out[key] = sum(getattr(j, key) for j in judgments)
    out["cost_usd"] = round(out["cost_usd"], 6)
    return out

"""Judging: run a judge over sampled candidates, appending each prompt's results as they arrive.

`judgments.jsonl` is append-only. A prompt whose candidates all have a record is not
judged again, so a crash or a re-run never pays for the same judgment twice. Prompts are
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

from judges.base import BudgetExhausted, Judge
from nash.records import USAGE, Judgment, Prompt, Sample, append_jsonl, read_jsonl
from nash.sampling import Progress


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
    done = read_jsonl(out_path, Judgment) if out_path.is_file() else []
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


def outcome_counts(judgments: list[Judgment]) -> dict:
    counts = Counter(j.outcome for j in judgments)
    out = {k: counts.get(k, 0) for k in ("scored", "preferred", "tie", "failed")}
    for key in USAGE:
        out[key] = sum(getattr(j, key) for j in judgments)
    out["cost_usd"] = round(out["cost_usd"], 6)
    return out

"""Judging: run a judge over sampled candidates, appending each prompt's results as they arrive.

`judgments.jsonl` is append-only. A prompt whose candidates all have a record is not
judged again, so a crash or a re-run never pays for the same judgment twice.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path

from tqdm.auto import tqdm

from judges.base import Judge
from nash.records import Judgment, Prompt, Sample, append_jsonl, read_jsonl
from nash.sampling import Progress


def judge_samples(
    judge: Judge,
    prompts: dict[str, Prompt],
    samples: list[Sample],
    out_path: Path,
    progress: Progress | None = None,
) -> list[Judgment]:
    by_prompt: dict[str, list[Sample]] = defaultdict(list)
    for s in samples:
        by_prompt[s.prompt_id].append(s)
    done = read_jsonl(out_path, Judgment) if out_path.is_file() else []
    seen = Counter(j.prompt_id for j in done)
    todo = [pid for pid, group in by_prompt.items() if seen[pid] < len(group)]
    for n, pid in enumerate(tqdm(todo, desc="judging", unit="prompt", leave=False), 1):
        if pid not in prompts:
            raise KeyError(f"{out_path}: sample for unknown prompt id {pid!r}")
        group = sorted(by_prompt[pid], key=lambda s: s.candidate)
        results = judge.score(prompts[pid], [s.response for s in group])
        for j, s in zip(results, group):
            j.candidate = s.candidate
        append_jsonl(out_path, results)
        done.extend(results)
        if progress:
            progress(n, len(todo))
    return done


def outcome_counts(judgments: list[Judgment]) -> dict[str, int]:
    counts = Counter(j.outcome for j in judgments)
    return {"scored": counts.get("scored", 0), "failed": counts.get("failed", 0)}

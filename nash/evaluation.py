"""Evaluation on the held-out split: constraint pass rate and win rate against π_0.

Each policy answers every held-out prompt once, greedily, so two policies are compared
on the same prompts without sampling noise. The win rate counts a tie as half and
leaves out (and counts) any prompt either side failed to get judged on.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from judges.base import Judge
from nash.judging import judge_samples
from nash.records import Judgment, Prompt, Sample, read_jsonl, write_jsonl
from nash.sampling import Progress, SamplingParams, build_sampler


def answer_and_judge(
    policy_path: str,
    prompts: list[Prompt],
    cfg,
    judge: Judge,
    out_dir: Path,
    policy_label: str,
    progress: Progress | None = None,
) -> list[Judgment]:
    """Greedy answers of one policy to `prompts`, judged; files kept in `out_dir` and reused."""
    out_dir.mkdir(parents=True, exist_ok=True)
    samples_path = out_dir / "samples.jsonl"
    if samples_path.is_file():
        samples = read_jsonl(samples_path, Sample)
    else:
        sampler = build_sampler(cfg.sampling.backend, policy_path, cfg.policy.dtype, cfg.sampling.batch_size)
        params = SamplingParams(n=1, temperature=0.0, max_new_tokens=cfg.eval.max_new_tokens, seed=cfg.run.seed)
        completions = sampler.generate([p.text for p in prompts], params, progress)
        samples = [
            Sample(prompt_id=p.id, candidate=0, prompt=p.text, response=c[0].text,
                   num_tokens=c[0].num_tokens, policy=policy_label)
            for p, c in zip(prompts, completions)
        ]
        write_jsonl(samples_path, samples)
    judgments, _ = judge_samples(judge, {p.id: p for p in prompts}, samples, out_dir / "judgments.jsonl")
    return judgments


def summarize(judgments: list[Judgment], samples_path: Path | None = None) -> dict:
    scored = [j for j in judgments if j.outcome == "scored"]
    checked = [j for j in scored if j.details.get("passed")]
    per_constraint: dict[str, list[bool]] = defaultdict(list)
    for j in scored:
        for name, ok in j.details.get("passed", {}).items():
            per_constraint[name.split("(")[0]].append(ok)
    checks = [ok for oks in per_constraint.values() for ok in oks]
    out = {
        "n": len(scored),
        "failed": len(judgments) - len(scored),
        "mean_score": sum(j.score for j in scored) / len(scored) if scored else None,
        # Pass rates exist only for judges that check constraints (rules, or rules in a composite).
        "pass_rate": sum(all(j.details["passed"].values()) for j in checked) / len(checked) if checked else None,
        "constraint_pass_rate": sum(checks) / len(checks) if checks else None,
        "per_constraint": {k: round(sum(v) / len(v), 4) for k, v in sorted(per_constraint.items())},
    }
    if samples_path and samples_path.is_file():
        samples = read_jsonl(samples_path, Sample)
        out["mean_tokens"] = sum(s.num_tokens for s in samples) / max(1, len(samples))
    return out


def win_rate(new: list[Judgment], base: list[Judgment]) -> dict:
    """Per-prompt comparison of pointwise scores; ties count half."""
    base_by = {j.prompt_id: j for j in base}
    wins = ties = losses = unjudged = 0
    for j in new:
        b = base_by.get(j.prompt_id)
        if j.outcome != "scored" or b is None or b.outcome != "scored":
            unjudged += 1
        elif j.score > b.score:
            wins += 1
        elif j.score == b.score:
            ties += 1
        else:
            losses += 1
    n = wins + ties + losses
    return {
        "win_rate": (wins + 0.5 * ties) / n if n else None,
        "wins": wins,
        "ties": ties,
        "losses": losses,
        "n": n,
        "unjudged": unjudged,
    }

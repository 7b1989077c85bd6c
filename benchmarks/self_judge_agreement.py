"""Do the two backends of the self judge agree on a real iteration?

    python benchmarks/self_judge_agreement.py RUN_DIR/iter_NNN [--precision auto]

Takes an iteration judged by `judge.kind: self` on `sampling.backend: vllm` (judgments.jsonl),
judges the same candidates again with the transformers backend (the same policy π_t, the same
template, weighted scores) and compares: mean and largest absolute score difference, the share
of candidates within 0.05, and whether the pair rule (highest against lowest) picks the same
chosen and rejected candidate for each prompt. Writes results/self_judge_agreement.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.machine import Interval, describe  # noqa: E402
from nash.judges import build_judge  # noqa: E402
from nash.precision import resolve  # noqa: E402
from nash.records import Judgment, Prompt, Sample, read_jsonl  # noqa: E402
from nash.registry import IterationDir  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("iteration")
    ap.add_argument("--precision", default=None, help="default: the iteration's own")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "self_judge_agreement.json"))
    args = ap.parse_args()
    it = IterationDir.from_path(args.iteration)
    cfg = it.run.config()
    if cfg.judge.kind != "self":
        raise SystemExit(f"{args.iteration}: judge.kind is {cfg.judge.kind!r}, not self")
    precision = resolve(args.precision) if args.precision else it.precision()
    served = {(j.prompt_id, j.candidate): j for j in read_jsonl(it.judgments, Judgment)}
    prompts = {p.id: p for p in read_jsonl(it.path / "prompts.jsonl", Prompt)}
    by_prompt = defaultdict(list)
    for s in read_jsonl(it.samples, Sample):
        by_prompt[s.prompt_id].append(s)
    judge = build_judge(cfg.judge.model_copy(update={"cache": False}), it.manifest()["parent_policy"]["path"],
                        precision)  # no sampling section: the transformers backend
    diffs, same_pair, pairs = [], 0, 0
    with Interval() as span:
        for pid, group in by_prompt.items():
            group.sort(key=lambda s: s.candidate)
            local = judge.score(prompts[pid], [s.response for s in group])
            a = [served[(pid, s.candidate)].score for s in group]
            b = [j.score for j in local]
            diffs += [abs(x - y) for x, y in zip(a, b)]
            pairs += 1
            same_pair += (a.index(max(a)), a.index(min(a))) == (b.index(max(b)), b.index(min(b)))
    result = {"machine": describe(), "iteration": str(it.path), "precision": precision.describe(),
              "served_backend": cfg.sampling.backend, "candidates": len(diffs), "prompts": pairs,
              "mean_abs_difference": round(sum(diffs) / len(diffs), 4), "max_abs_difference": round(max(diffs), 4),
              "share_within_0.05": round(sum(d <= 0.05 for d in diffs) / len(diffs), 3),
              "same_chosen_and_rejected_share": round(same_pair / pairs, 3),
              "transformers_judging": span.record()}
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

"""Substantive pass rate and degeneration on training prompts no iteration has used.

    python benchmarks/train_split_check.py RUN_DIR [--partition 5] [--out FILE]

Settings of the embedded default (β, the NLL term, the judge's gates) are chosen on this
measurement, never on the held-out split: the prompts are one training partition that the run's
iterations did not reach, answered greedily by π_0 and by every complete iteration's policy.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nash import evaluation  # noqa: E402
from nash import prompts as prompt_sources  # noqa: E402
from nash.policy import resolve_policy  # noqa: E402
from nash.registry import RunDir  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir")
    ap.add_argument("--partition", type=int, default=5, help="a training partition the run has not used")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    run = RunDir(args.run_dir)
    cfg = run.config()
    used = {it.index for it in run.iterations()}
    if args.partition in used:
        raise SystemExit(f"partition {args.partition} was trained on by iteration {args.partition}")
    p = cfg.prompts
    prompts = prompt_sources.partition(prompt_sources.load_prompts(p.source, p.seed, p.field), args.partition,
                                       p.partition_size, p.seed)
    policies = {"iter_000": resolve_policy(cfg.policy.model)}
    policies.update({it.path.name: str(it.policy) for it in run.iterations() if it.complete})
    work = Path(tempfile.mkdtemp(prefix="nash-train-split-"))
    out = {}
    for name, path in policies.items():
        answers = evaluation.answer(path, prompts, cfg, work / name, name)
        rep = evaluation.answer_report(prompts, answers, cfg.eval.min_words)
        out[name] = {k: v for k, v in rep.items()}
        print(f"{name}: real pass rate {rep['substantive_pass_rate']:.3f}, pass rate {rep['pass_rate']:.3f}, "
              f"degenerate {rep['degenerate']:.3f} (short {rep['short']:.3f}, repetitive {rep['repetitive']:.3f}, "
              f"off topic {rep['off_topic']:.3f}), mean tokens {rep['mean_tokens']:.1f}", flush=True)
    result = {"run": str(run.path), "partition": args.partition, "prompts": len(prompts), "policies": out}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

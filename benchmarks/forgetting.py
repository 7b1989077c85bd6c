"""DPO against SFT on the best samples: the real pass rate each gains and the knowledge each loses.

    python benchmarks/forgetting.py [--iterations 2] [--set key=value ...] [--out FILE]

Two runs of the embedded default (configs/default.yaml) that differ only in `train.loss`: `dpo`
(chosen against rejected, π_t as reference) and `sft` (TRL's SFTTrainer on the kept pairs'
chosen answers: rejection-sampling fine-tuning). Both train from their own last iteration
(`train.parent: last`), so each arm is two consecutive updates whatever the gates decide.
Sampling and the rules-and-quality judge are seeded and deterministic, so the first iteration
of both arms samples and judges the same candidates; the script checks that (sha256 of
samples.jsonl, the judgments' scores) before comparing anything.

Per iteration: the real pass rate (held-out answers that meet their constraints and are real
answers) beside π_0's, the win rate against π_0, retention of general knowledge (the built-in
probe) beside π_0's with its paired standard error, the token-rank shift and KL to π_0, and
whether the gates promoted it. Writes results/forgetting.json and prints the README table.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.machine import Interval, describe  # noqa: E402
from nash.records import Judgment, iter_jsonl  # noqa: E402
from nash.registry import IterationDir, RunDir  # noqa: E402


def run_arm(loss: str, runs_dir: Path, iterations: int, extra: list[str]) -> tuple[RunDir, dict]:
    cmd = [sys.executable, "-m", "nash.flows.cli", "run", str(ROOT / "configs" / "default.yaml"),
           "--runs-dir", str(runs_dir), "--set", f"run.name={loss}", "--set", f"run.iterations={iterations}",
           "--set", f"train.loss={loss}", "--set", "train.parent=last"]
    for s in extra:
        cmd += ["--set", s]
    with Interval() as span:
        subprocess.run(cmd, check=True, cwd=ROOT)
    return RunDir(runs_dir / loss), span.record()


def rows(run: RunDir) -> list[dict]:
    out = []
    for it in run.iterations():
        m = json.loads(it.metrics.read_text())
        h, kept, drift = m["headline"], m.get("retention") or {}, m.get("drift") or {}
        out.append({
            "iteration": it.index, "pairs": m["pairs"].get("pairs"), "train_steps": m["train"].get("steps"),
            "train_loss": m["train"].get("train_loss"),
            "real_pass_rate": h.get("substantive_pass_rate"), "initial_real_pass_rate": h.get("initial_substantive_pass_rate"),
            "pass_rate": h.get("pass_rate"), "degenerate": h.get("degenerate"),
            "win_rate_vs_initial": h.get("win_rate"), "win_rate_se": h.get("win_rate_se"),
            "mean_tokens": h.get("mean_length"),
            "retention": kept.get("accuracy"), "initial_retention": kept.get("initial_accuracy"),
            "retention_change": kept.get("change"), "retention_change_se": kept.get("change_stderr"),
            "forgotten": kept.get("forgotten"), "learned": kept.get("learned"), "by_subject": kept.get("by_subject"),
            "rank_shift": (drift.get("rank_shift") or {}).get("not_first_share"),
            "mean_log_rank": (drift.get("rank_shift") or {}).get("mean_log_rank"),
            "moved_tokens": [t["token"] for t in (drift.get("rank_shift") or {}).get("moved", [])[:6]],
            "kl_from_initial": h.get("kl_from_initial"), "perplexity": h.get("perplexity"),
            "promoted": h.get("promoted"), "reason": h.get("promotion_reason"), "warnings": m.get("warnings", []),
        })
    return out


def first_iteration_identity(a: RunDir, b: RunDir) -> dict:
    """Whether both arms' first iteration sampled and judged the same candidates."""
    def digest(path: Path) -> str:
        return hashlib.sha256(path.read_bytes()).hexdigest()

    def scores(run: RunDir) -> list:
        return [(j.prompt_id, j.candidate, j.score) for j in iter_jsonl(IterationDir(run, 1).judgments, Judgment)]

    ia, ib = IterationDir(a, 1), IterationDir(b, 1)
    return {"samples_identical": digest(ia.samples) == digest(ib.samples), "scores_identical": scores(a) == scores(b),
            "pairs_identical": digest(ia.pairs) == digest(ib.pairs)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iterations", type=int, default=2)
    ap.add_argument("--runs-dir", default=None)
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "forgetting.json"))
    args = ap.parse_args()
    runs_dir = Path(args.runs_dir or tempfile.mkdtemp(prefix="nash-forgetting-"))
    arms, spans = {}, {}
    for loss in ("dpo", "sft"):
        arms[loss], spans[loss] = run_arm(loss, runs_dir, args.iterations, args.set)
    same = first_iteration_identity(arms["dpo"], arms["sft"])
    result = {"machine": describe(), "config": "configs/default.yaml", "overrides": args.set, "runs_dir": str(runs_dir),
              "first_iteration": same, "arms": {k: {"rows": rows(r), **spans[k]} for k, r in arms.items()}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")

    f = lambda x, d=3: "-" if x is None else f"{x:.{d}f}"  # noqa: E731
    print(f"\nmachine: {result['machine']}; first iteration identical in both arms: {same}\n")
    print("| update | iteration | pairs | real pass rate (π_0) | win rate vs π_0 ± SE | retention (π_0) | change ± SE "
          "| forgotten / learned | rank shift | KL to π_0 | promoted |")
    print("|---" * 11 + "|")
    for loss, arm in result["arms"].items():
        for r in arm["rows"]:
            print(f"| {loss} | {r['iteration']} | {r['pairs']} | {f(r['real_pass_rate'])} ({f(r['initial_real_pass_rate'])}) "
                  f"| {f(r['win_rate_vs_initial'])} ± {f(r['win_rate_se'])} | {f(r['retention'])} "
                  f"({f(r['initial_retention'])}) | {r['retention_change']:+.3f} ± {f(r['retention_change_se'])} "
                  f"| {r['forgotten']} / {r['learned']} | {f(r['rank_shift'])} | {f(r['kl_from_initial'], 4)} "
                  f"| {'yes' if r['promoted'] else 'no'} |")


if __name__ == "__main__":
    main()

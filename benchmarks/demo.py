"""Time the demo end to end and per stage, and report held-out pass rates.

    python benchmarks/demo.py [--runs-dir DIR] [--set key=value ...]

Runs `nash run configs/default.yaml` in a fresh runs directory (Prefect ephemeral mode),
then reads every iteration's manifest. Prints a markdown table for the README and
writes the figures as JSON next to this script.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.machine import Interval, describe  # noqa: E402
from nash.iteration import STAGES  # noqa: E402
from nash.registry import RunDir  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs-dir", default=None)
    ap.add_argument("--config", default=str(ROOT / "configs" / "default.yaml"))
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "demo.json"))
    args = ap.parse_args()
    runs_dir = Path(args.runs_dir or tempfile.mkdtemp(prefix="nash-bench-"))

    cmd = [sys.executable, "-m", "nash.flows.cli", "run", args.config, "--runs-dir", str(runs_dir)]
    for s in args.set:
        cmd += ["--set", s]
    with Interval() as span:
        subprocess.run(cmd, check=True, cwd=ROOT)
    wall = span.wall

    run = next(RunDir(p.parent) for p in runs_dir.glob("*/run.json"))
    rows = []
    for it in run.iterations():
        m = it.manifest()
        metrics = json.loads(it.metrics.read_text())
        wr, head = metrics["win_rate"], metrics["headline"]
        rows.append({
            "iteration": it.index,
            "seconds": {s: m["timings"][s] for s in STAGES},
            "pairs": m["pairs"]["pairs"],
            "chosen_mean_tokens": m["pairs"]["chosen_mean_tokens"],
            "rejected_mean_tokens": m["pairs"]["rejected_mean_tokens"],
            "pass_rate": wr["pass_rate"],
            "constraint_pass_rate": wr["constraint_pass_rate"],
            "initial_pass_rate": wr["reference_pass_rate"],
            "win_rate_vs_initial": head["win_rate"],
            "win_rate_se": head["win_rate_se"],
            "lc_win_rate": head["lc_win_rate"],
            "mean_tokens": head["mean_length"],
            "kl_from_initial": head["kl_from_initial"],
            "perplexity": head["perplexity"],
            "initial_perplexity": metrics["drift"].get("initial_perplexity"),
            "eval_n": head["n"],
            "train": metrics["train"],
            "substantive_pass_rate": head.get("substantive_pass_rate"),
            "initial_substantive_pass_rate": head.get("initial_substantive_pass_rate"),
            "degenerate": head.get("degenerate"),
            "initial_degenerate": head.get("initial_degenerate"),
            "degeneration": {k: {m: v for m, v in d.items()} for k, d in metrics.get("degeneration", {}).items()},
            "length_ratio": head.get("length_ratio"),
            "promoted": head.get("promoted"),
            "warnings": metrics.get("warnings", []),
            "precision": {k: m.get("precision", {}).get(k) for k in ("compute", "weights", "drift", "reason")},
        })
    result = {
        "machine": describe(),
        "config": str(Path(args.config).relative_to(ROOT)) if Path(args.config).is_relative_to(ROOT) else args.config,
        "overrides": args.set,
        **span.record(),
        "iterations": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")

    steal = "" if span.steal is None else f", {span.steal:.0%} of the CPU taken by the hypervisor (steal)"
    print(f"\nmachine: {result['machine']}; whole demo: {wall / 60:.1f} min wall{steal}; "
          f"precision {rows[0]['precision']['compute'] if rows else '?'}\n")
    print("| iteration | " + " | ".join(STAGES) + " | pairs | real pass rate (π_0) | degenerate (π_0) | pass rate (π_0) "
          "| win rate vs π_0 ± SE | LC win rate | mean tokens | KL to π_0 | perplexity (π_0) | promoted |")
    print("|---" * (len(STAGES) + 11) + "|")
    f = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
    for r in rows:
        secs = " | ".join(f"{r['seconds'][s]:.0f} s" for s in STAGES)
        print(f"| {r['iteration']} | {secs} | {r['pairs']} | {f(r['substantive_pass_rate'])} "
              f"({f(r['initial_substantive_pass_rate'])}) | {f(r['degenerate'])} ({f(r['initial_degenerate'])}) | "
              f"{f(r['pass_rate'])} ({f(r['initial_pass_rate'])}) | {f(r['win_rate_vs_initial'])} ± "
              f"{f(r['win_rate_se'])} | {f(r['lc_win_rate'])} | {r['mean_tokens']:.0f} | {f(r['kl_from_initial'])} | "
              f"{r['perplexity']:.2f} ({r['initial_perplexity']:.2f}) | {'yes' if r['promoted'] else 'no'} |")
    for r in rows:
        for w in r["warnings"]:
            print(f"warning: {w}")


if __name__ == "__main__":
    main()

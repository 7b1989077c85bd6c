"""Time the demo end to end and per stage, and report held-out pass rates.

    python benchmarks/demo.py [--runs-dir DIR] [--set key=value ...]

Runs `nash run configs/default.yaml` in a fresh runs directory (Prefect ephemeral mode),
then reads every iteration's manifest. Prints a markdown table for the README and
writes the figures as JSON next to this script.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

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

    cmd = [sys.executable, "-m", "flows.cli", "run", args.config, "--runs-dir", str(runs_dir)]
    for s in args.set:
        cmd += ["--set", s]
    start = time.time()
    subprocess.run(cmd, check=True, cwd=ROOT)
    wall = time.time() - start

    run = next(RunDir(p.parent) for p in runs_dir.glob("*/run.json"))
    rows = []
    for it in run.iterations():
        m = it.manifest()
        metrics = json.loads(it.metrics.read_text())
        rows.append({
            "iteration": it.index,
            "seconds": {s: m["timings"][s] for s in STAGES},
            "pairs": m["pairs"]["pairs"],
            "pass_rate": metrics["eval"]["pass_rate"],
            "constraint_pass_rate": metrics["eval"]["constraint_pass_rate"],
            "initial_pass_rate": metrics["initial"]["pass_rate"],
            "initial_constraint_pass_rate": metrics["initial"]["constraint_pass_rate"],
            "win_rate_vs_initial": metrics["win_rate_vs_initial"]["win_rate"],
            "eval_n": metrics["eval"]["n"],
            "train": metrics["train"],
        })
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
        "config": args.config,
        "overrides": args.set,
        "wall_seconds": round(wall, 1),
        "iterations": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")

    print(f"\nmachine: {result['machine']}; whole demo: {wall / 60:.1f} min wall\n")
    print("| iteration | " + " | ".join(STAGES) + " | pairs | pass rate (π_0) | constraint pass rate (π_0) | win rate vs π_0 |")
    print("|---" * (len(STAGES) + 5) + "|")
    for r in rows:
        secs = " | ".join(f"{r['seconds'][s]:.0f} s" for s in STAGES)
        print(f"| {r['iteration']} | {secs} | {r['pairs']} | {r['pass_rate']:.3f} ({r['initial_pass_rate']:.3f}) | "
              f"{r['constraint_pass_rate']:.3f} ({r['initial_constraint_pass_rate']:.3f}) | {r['win_rate_vs_initial']:.3f} |")


if __name__ == "__main__":
    main()

"""How fast `nash run` refuses what cannot finish, and what its checks cost at scale.

    python benchmarks/preflight.py [--prompts 100000] [--partition 10000]

1. A second `nash run` on a locked run, on an empty cache: wall time, and whether anything was
   converted or loaded (the cache stays empty).
2. A missing judge key (`judge.kind=openai`, an unset `judge.api_key_env`): wall time to the error.
3. The whole preflight of the embedded default (warm cache): seconds in-process.
4. The preflight of a JSONL prompt file of `--prompts` rows with partitions of `--partition`
   (every prompt read and validated, the partitions of both iterations tokenised): seconds and
   peak memory.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.machine import Interval, describe  # noqa: E402

CLI = [sys.executable, "-m", "nash.flows.cli"]


def timed(cmd, env=None) -> tuple[float, subprocess.CompletedProcess]:
    t0 = time.perf_counter()
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    return time.perf_counter() - t0, out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=100_000)
    ap.add_argument("--partition", type=int, default=10_000)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="nash-preflight-"))
    rows = []
    interval = Interval().__enter__()

    from nash.config import load_config
    from nash.preflight import preflight
    from nash.registry import RunDir
    from nash.runlock import run_lock

    runs = tmp / "runs"
    empty = tmp / "empty-cache"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from nash.runlock import run_lock\n"
                               "with run_lock(sys.argv[1], 'nash run'):\n    print('held', flush=True); time.sleep(600)",
                               str(runs / "demo")], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        holder.stdout.readline()
        s, out = timed([*CLI, "run", "configs/default.yaml", "--runs-dir", str(runs)],
                       {**os.environ, "NASH_CACHE": str(empty)})
    finally:
        holder.kill()
        holder.wait()
    rows.append(("locked run refused (empty cache)", s, f"exit {out.returncode}; cache "
                 f"{'untouched' if not empty.exists() else 'WRITTEN'}; {out.stderr.strip()[:60]}..."))

    env = {k: v for k, v in os.environ.items() if k != "NASH_UNSET_KEY"}
    s, out = timed([*CLI, "run", "configs/default.yaml", "--runs-dir", str(runs), "--set", "judge.kind=openai",
                    "--set", "judge.api_key_env=NASH_UNSET_KEY"], env)
    rows.append(("missing judge key refused", s, f"exit {out.returncode}; {out.stderr.strip()[:70]}..."))

    cfg = load_config(ROOT / "configs" / "default.yaml", [f"run.name=pre-{os.getpid()}"])
    from nash.policy import resolve_policy

    resolve_policy(cfg.policy.model)  # warm: the conversion is the first run's, not the check's
    t0 = time.perf_counter()
    preflight(cfg, RunDir(runs / cfg.run.name))
    rows.append(("preflight, embedded default (warm cache)", time.perf_counter() - t0, "all checks passed"))

    src = tmp / "prompts.jsonl"
    with open(src, "w", encoding="utf-8") as f:
        for i in range(args.prompts):
            f.write(json.dumps({"id": f"q{i}", "prompt": f"Write two sentences about subject number {i} and why "
                                f"it matters to people who work with it every day.",
                                "constraints": [{"kind": "no_commas"}, {"kind": "max_words", "n": 40}]}) + "\n")
    cfg = load_config(ROOT / "configs" / "default.yaml", [f"prompts.source={src}", f"prompts.partition_size={args.partition}",
                                                         "run.name=scale"])
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    with run_lock(runs / "scale", "benchmark"):
        preflight(cfg, RunDir(runs / "scale"))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rows.append((f"preflight, {args.prompts:,} prompts, 2 x {args.partition:,} tokenised", time.perf_counter() - t0,
                 f"peak RSS {peak / 1024:.0f} MiB (+{(peak - before) / 1024:.0f} MiB)"))

    interval.__exit__(None, None, None)
    steal = interval.record()["steal_share"]
    print(f"machine: {describe()}; steal {steal if steal is None else f'{steal:.0%}'}")
    print("| check | seconds | result |\n|---|---|---|")
    for name, s, note in rows:
        print(f"| {name} | {s:.2f} | {note} |")


if __name__ == "__main__":
    main()

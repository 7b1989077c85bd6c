"""Training throughput: nash's train stage against a plain TRL DPO script, same pairs and settings.

    python benchmarks/train_throughput.py [--prompts 32] [--set key=value ...]

Makes pairs once with nash on the embedded default (prepare, sample, judge, select), then
trains π_0 on them twice, each in a fresh process:
  nash:  the train stage (subprocess worker, reference log-probs precomputed once, KL measured)
  plain: benchmarks/plain_trl_dpo.py, DPOTrainer with its defaults
Reports pairs per second (pairs x epochs / seconds) over the whole process and over the
trainer's own train() call, and the ratio nash / plain. Writes results/train_throughput.json.
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

import torch  # noqa: E402

from nash import iteration  # noqa: E402
from nash.config import load_config  # noqa: E402
from nash.registry import RunDir  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=32, help="training prompts (pairs come from these)")
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "train_throughput.json"))
    args = ap.parse_args()
    runs = Path(tempfile.mkdtemp(prefix="nash-train-bench-"))
    cfg = load_config(ROOT / "configs" / "default.yaml",
                      [f"prompts.partition_size={args.prompts}", "run.name=bench", "pairs.per_prompt=all", *args.set])
    run = RunDir.create(runs, cfg)
    path = iteration.prepare(str(run.path))
    for stage in (iteration.sample, iteration.judge, iteration.select):
        stage(path)
    it = run.iterations()[0]
    n_pairs = it.manifest()["pairs"]["training_pairs"]
    t = cfg.train
    print(f"{n_pairs} pairs from {args.prompts} prompts; training {t.epochs} epochs, batch {t.batch_size}", flush=True)

    start = time.time()
    iteration.train(path)
    nash_wall = time.time() - start
    nash = json.loads((it.path / "train.json").read_text())

    plain_out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "plain_trl_dpo.py"), it.manifest()["parent_policy"]["path"],
         str(it.pairs), str(runs / "plain-policy"), "--beta", str(t.beta), "--lr", str(t.learning_rate),
         "--epochs", str(t.epochs), "--batch-size", str(t.batch_size), "--max-length", str(t.max_length),
         "--warmup", str(t.warmup_ratio), "--seed", str(cfg.run.seed * 1000 + it.index)],
        capture_output=True, text=True,
    )
    if plain_out.returncode != 0:
        sys.exit(f"plain TRL script failed:\n{plain_out.stderr[-3000:]}")
    plain = json.loads(plain_out.stdout.strip().splitlines()[-1])

    def rate(seconds):
        return round(n_pairs * t.epochs / seconds, 3)

    res = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {'GPU' if torch.cuda.is_available() else 'no GPU'}",
        "pairs": n_pairs, "epochs": t.epochs, "batch_size": t.batch_size, "max_length": t.max_length,
        "nash": {"wall_seconds": round(nash_wall, 1), "train_seconds": round(nash["train_seconds"], 1),
                 "steps": nash["steps"], "first_step_loss": nash["first_step_loss"],
                 "pairs_per_s_wall": rate(nash_wall), "pairs_per_s_train": rate(nash["train_seconds"])},
        "plain_trl": {"wall_seconds": round(plain["wall_seconds"], 1), "train_seconds": round(plain["train_seconds"], 1),
                      "steps": plain["steps"], "first_step_loss": plain["first_step_loss"],
                      "pairs_per_s_wall": rate(plain["wall_seconds"]),
                      "pairs_per_s_train": rate(plain["train_seconds"])},
    }
    res["ratio_wall"] = round(res["nash"]["pairs_per_s_wall"] / res["plain_trl"]["pairs_per_s_wall"], 2)
    res["ratio_train"] = round(res["nash"]["pairs_per_s_train"] / res["plain_trl"]["pairs_per_s_train"], 2)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()

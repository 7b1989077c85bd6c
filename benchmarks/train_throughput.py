"""Training throughput: nash's train stage in bf16 and float32 against a plain TRL DPO script.

    python benchmarks/train_throughput.py [--prompts 32] [--set key=value ...]

Makes pairs once with nash on the embedded default (prepare, sample, judge, select), then
trains π_0 on them three times, each in a fresh process:
  nash auto:  the train stage in the precision `auto` picks here (bf16 autocast on a CPU with
              avx512_bf16), float32 master weights; reference log-probs precomputed once, KL measured
  plain:      benchmarks/plain_trl_dpo.py, DPOTrainer with its defaults, float32 on a CPU
  nash fp32:  the train stage forced to float32
Reports pairs per second (pairs x epochs / seconds) over the whole process and over the
trainer's own train() call, the ratios to plain TRL, and the hypervisor's steal share of each
interval. Writes results/train_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.machine import Interval, describe  # noqa: E402
from nash import iteration  # noqa: E402
from nash.config import load_config  # noqa: E402
from nash.precision import resolve  # noqa: E402
from nash.registry import RunDir  # noqa: E402


def train_nash(it, path: str, setting: str) -> dict:
    """The train stage, again, on the same pairs, in `setting`."""
    shutil.rmtree(it.policy, ignore_errors=True)
    stages = {k: v for k, v in it.manifest()["stages"].items() if k != "train"}
    it.update_manifest(stages=stages, precision=resolve(setting).describe())
    with Interval() as span:
        iteration.train(path)
    t = json.loads((it.path / "train.json").read_text())
    return {**span.record(), "precision": t["precision"], "train_seconds": round(t["train_seconds"], 1),
            "steps": t["steps"], "first_step_loss": t["first_step_loss"], "last_step_loss": t["last_step_loss"],
            "kl_from_parent": t.get("kl_from_parent")}


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

    runs_ = {"nash_auto": train_nash(it, path, "auto")}
    with Interval() as span:
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
    runs_["plain_trl"] = {**span.record(), "precision": "fp32", "train_seconds": round(plain["train_seconds"], 1),
                          "steps": plain["steps"], "first_step_loss": plain["first_step_loss"]}
    runs_["nash_fp32"] = train_nash(it, path, "fp32")

    def rate(seconds):
        return round(n_pairs * t.epochs / seconds, 3)

    for r in runs_.values():
        r["pairs_per_s_wall"], r["pairs_per_s_train"] = rate(r["wall_seconds"]), rate(r["train_seconds"])
    base = runs_["plain_trl"]
    res = {"machine": describe(), "pairs": n_pairs, "epochs": t.epochs, "batch_size": t.batch_size,
           "max_length": t.max_length, "auto_precision": runs_["nash_auto"]["precision"], **runs_,
           "ratio_to_plain": {k: {"wall": round(r["pairs_per_s_wall"] / base["pairs_per_s_wall"], 2),
                                  "train": round(r["pairs_per_s_train"] / base["pairs_per_s_train"], 2)}
                              for k, r in runs_.items() if k != "plain_trl"}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()

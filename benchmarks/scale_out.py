"""What running stages on work pools costs: one iteration in one process against the same iteration
with sample (2 shards) and train on pool `gpu` and judge and evaluate on pool `cpu`.

    python benchmarks/scale_out.py [--worker-threads N] [--out NAME.json] [--set key=value ...]

Starts `prefect server start` on loopback and three `prefect worker start` process workers (two on
`gpu`, one on `cpu`, each in its own working directory), runs `nash deploy` and `nash run` on the
embedded default with small partitions, and reads back from the server when each child run was
created, started and ended. The overhead of a child is its flow run's wall time minus the seconds
the stage itself recorded in the manifest: the worker's poll, a fresh Python process with nash,
Prefect and torch imported, and the model loaded again. Writes benchmarks/results/scale_out.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.prefect_server import PrefectServer  # noqa: E402

CONFIG = str(ROOT / "configs" / "default.yaml")
SMALL = ["prompts.partition_size=16", "eval.num_prompts=16", "eval.drift_prompts=4", "train.kl_prompts=4",
         "sampling.max_new_tokens=48", "eval.max_new_tokens=48", "sampling.shards=2", "train.epochs=1"]
POOLS = ["stages.sample.work_pool=gpu", "stages.train.work_pool=gpu", "stages.judge.work_pool=cpu",
         "stages.evaluate.work_pool=cpu"]
STAGE_OF = {"sample-shard-0": "sample", "sample-shard-1": "sample", "judge": "judge", "train": "train",
            "evaluate": "evaluate"}


def _ts(s: str | None) -> float | None:
    return datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp() if s else None


def _sets(overrides):
    return [a for o in overrides for a in ("--set", o)]


def _nash(args, env, cwd):
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "nash.flows.cli", *args], env=env, cwd=cwd, capture_output=True,
                       text=True)
    if r.returncode:
        raise SystemExit(f"nash {args[0]} failed:\n{r.stderr[-3000:]}")
    return time.monotonic() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--worker-threads", type=int, help="OMP_NUM_THREADS of each worker (two sampling workers "
                    "share this machine's cores; default: torch's own choice)")
    ap.add_argument("--out", default="scale_out.json")
    args = ap.parse_args()
    threads = {"OMP_NUM_THREADS": str(args.worker_threads)} if args.worker_threads else {}
    base = SMALL + args.set
    out: dict = {"machine": {"platform": platform.platform(), "python": platform.python_version(),
                             "cpus": __import__("os").cpu_count()}, "overrides": base,
           "worker_threads": args.worker_threads}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        with PrefectServer(tmp / "prefect-local") as server:  # the in-process run, against its own server
            env = server.env()
            out["in_process_s"] = round(_nash(["run", CONFIG, "--iterations", "1", "--runs-dir", str(tmp / "one"),
                                               *_sets(base + ["run.name=bench"])], env, tmp), 1)
        local = json.loads((tmp / "one" / "bench" / "iter_001" / "manifest.json").read_text())
        with PrefectServer(tmp / "prefect") as server:
            for name, pool in (("gpu-1", "gpu"), ("gpu-2", "gpu"), ("cpu-1", "cpu")):
                (tmp / name).mkdir()
                server.start([sys.executable, "-m", "prefect", "worker", "start", "--pool", pool, "--type",
                              "process", "--name", name, "--limit", "1"], f"worker-{name}.log", cwd=tmp / name,
                             env={"PREFECT_WORKER_QUERY_SECONDS": "1", **threads})
            env = server.env()
            sets = _sets(base + POOLS + ["run.name=bench"])
            out["deploy_s"] = round(_nash(["deploy", CONFIG, "--runs-dir", str(tmp / "pools"), *sets], env, tmp), 1)
            out["pools_s"] = round(_nash(["run", CONFIG, "--iterations", "1", "--runs-dir", str(tmp / "pools"),
                                          *sets], env, tmp), 1)
            manifest = json.loads((tmp / "pools" / "bench" / "iter_001" / "manifest.json").read_text())
            children = []
            for r in server.flow_runs():
                suffix = r["name"].split("iter_001-", 1)[-1]
                if suffix not in STAGE_OF:
                    continue
                wall = _ts(r["end_time"]) - _ts(r["start_time"])
                lag = _ts(r["start_time"]) - _ts(r["created"])
                if suffix.startswith("sample-shard-"):  # a shard records its own seconds in its marker
                    k = int(suffix.rsplit("-", 1)[1])
                    marker = tmp / "pools" / "bench" / "iter_001" / "sampling" / f"samples-{k:03d}-of-002.jsonl.done"
                    stage_s = json.loads(marker.read_text())["seconds"]
                else:
                    stage_s = manifest["stages"][STAGE_OF[suffix]]["seconds"]
                children.append({"child": suffix, "pool": r["work_pool_name"], "state": r["state_type"],
                                 "created_to_start_s": round(lag, 1), "wall_s": round(wall, 1),
                                 "stage_s": stage_s,
                                 "overhead_s": round(wall - stage_s, 1)})
            out["children"] = sorted(children, key=lambda c: c["child"])
    out["stage_seconds"] = {"in_process": {k: v["seconds"] for k, v in local["stages"].items()},
                            "pools": {k: v["seconds"] for k, v in manifest["stages"].items()}}
    path = ROOT / "benchmarks" / "results" / args.out
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()

"""What happens when a scheduled round outlasts its cron interval.

    python benchmarks/schedule_overlap.py [--minutes 8] [--set key=value ...]

Starts `prefect server start` on loopback (scheduler loop 5 s), serves the embedded default with
`nash serve --cron "* * * * *" --iterations 1` on small partitions, so each round takes longer than
the one-minute interval, and watches the deployment's flow runs for `--minutes`. Then it stops the
served process and watches what is left on the server. Writes every flow run's state history and a
summary to benchmarks/results/schedule_overlap.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from collections import Counter
from datetime import datetime
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nash.registry import RunDir  # noqa: E402
from tests.prefect_server import PrefectServer, _stop  # noqa: E402

SMALL = ["prompts.partition_size=8", "eval.num_prompts=8", "eval.drift_prompts=4", "train.kl_prompts=4",
         "sampling.max_new_tokens=48", "eval.max_new_tokens=48"]


def _ts(s: str | None) -> float | None:
    return datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp() if s else None


def _history(server: PrefectServer, run_id: str) -> list[tuple[float, str]]:
    r = httpx.get(f"{server.url}/flow_run_states/", params={"flow_run_id": run_id}, timeout=10)
    r.raise_for_status()
    return sorted((_ts(s["timestamp"]), s["name"]) for s in r.json())


def _snapshot(server: PrefectServer, t0: float) -> list[dict]:
    out = []
    for r in server.flow_runs("overlap-round"):
        out.append({
            "name": r["name"],
            "expected_start_s": round(_ts(r["expected_start_time"]) - t0, 1),
            "start_s": round(_ts(r["start_time"]) - t0, 1) if r["start_time"] else None,
            "end_s": round(_ts(r["end_time"]) - t0, 1) if r["end_time"] else None,
            "state": r["state_name"],
            "history": [(round(t - t0, 1), name) for t, name in _history(server, r["id"])],
        })
    return out


def _max_running(runs: list[dict]) -> int:
    events = []
    for r in runs:
        if r["start_s"] is not None:
            events += [(r["start_s"], 1), (r["end_s"] if r["end_s"] is not None else 1e12, -1)]
    best = cur = 0
    for _, d in sorted(events, key=lambda e: (e[0], e[1])):
        cur += d
        best = max(best, cur)
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=8)
    ap.add_argument("--after-minutes", type=float, default=2, help="watch this long after the served process stops")
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "schedule_overlap.json"))
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="nash-overlap-"))
    runs = work / "runs"
    sets = [x for o in SMALL + ["run.name=overlap"] + args.set for x in ("--set", o)]

    with PrefectServer(work / "prefect") as server:
        t0 = time.time()
        served = server.start([sys.executable, "-m", "nash.flows.cli", "serve", str(ROOT / "configs" / "default.yaml"),
                               "--cron", "* * * * *", "--iterations", "1", "--runs-dir", str(runs), *sets],
                              "serve.log")
        while time.time() - t0 < args.minutes * 60:
            if served.poll() is not None:
                raise SystemExit(f"nash serve exited {served.returncode}:\n"
                                 f"{(server.home / 'serve.log').read_text()[-3000:]}")
            time.sleep(10)
            states = Counter(r["state_name"] for r in server.flow_runs("overlap-round")
                             if _ts(r["expected_start_time"]) <= time.time())
            print(f"{time.time() - t0:6.0f} s  due runs by state: {dict(states)}", flush=True)
        during = _snapshot(server, t0)
        stopped_at = time.time() - t0
        _stop(served)
        time.sleep(args.after_minutes * 60)
        after = _snapshot(server, t0)
        serve_log = (server.home / "serve.log").read_text(errors="replace")

    its = RunDir(runs / "overlap").iterations() if (runs / "overlap" / "run.json").exists() else []
    due = [r for r in during if r["expected_start_s"] <= stopped_at]
    completed = [r for r in due if r["state"] == "Completed"]
    durations = [r["end_s"] - r["start_s"] for r in completed]
    lags = [r["start_s"] - r["expected_start_s"] for r in due if r["start_s"] is not None]
    summary = {
        "observed_s": round(stopped_at),
        "slots_due": len(due),
        "states_of_due_runs": dict(Counter(r["state"] for r in due)),
        "states_ever_seen": sorted({name for r in due for _, name in r["history"]}),
        "runs_started": sum(r["start_s"] is not None for r in due),
        "max_running_at_once": _max_running(due),
        "round_seconds": [round(d) for d in durations],
        "start_lag_seconds": [round(x) for x in lags],
        "iterations_complete": sum(it.complete for it in its),
        "iterations_started": len(its),
        "after_serve_stopped": dict(Counter(r["state"] for r in after if r["expected_start_s"] <= stopped_at)),
        "serve_log_awaiting_lines": sum("AwaitingConcurrencySlot" in line for line in serve_log.splitlines()),
    }
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "command": "nash serve configs/default.yaml --cron '* * * * *' --iterations 1 " + " ".join(sets),
        "summary": summary,
        "runs": during,
        "runs_after_serve_stopped": after,
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()

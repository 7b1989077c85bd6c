"""Scheduled rounds, run for real: `prefect server start` (its scheduler service included), `nash serve`
with a one-minute cron, and a scheduled flow run that is created, picked up and completes."""

import sys
import time

from nash.registry import RunDir
from tests.prefect_server import ROOT, PrefectServer

# One cron slot (at most 60 s away), the runner's 10 s poll and a tiny-model iteration (about
# 2 minutes on 2 busy cores), with room for a slow machine.
DEADLINE_S = 480


def test_served_cron_round_is_scheduled_picked_up_and_completes(tmp_path, tiny_overrides):
    runs = tmp_path / "runs"
    # The tiny model writes no real answers, so the rules judge alone makes its pairs.
    sets = [x for o in tiny_overrides + ["run.name=cron", "judge={kind: rules}", "eval.drift_prompts=0",
                                        "train.kl_prompts=0"] for x in ("--set", o)]
    with PrefectServer(tmp_path / "prefect") as server:
        served = server.start([sys.executable, "-m", "flows.cli", "serve", str(ROOT / "configs" / "default.yaml"),
                               "--cron", "* * * * *", "--iterations", "1", "--runs-dir", str(runs), *sets],
                              "serve.log")
        deadline = time.monotonic() + DEADLINE_S
        done, seen = None, []
        while time.monotonic() < deadline and done is None:
            assert served.poll() is None, (server.home / "serve.log").read_text()[-3000:]
            seen = server.flow_runs("cron-round")
            if not seen and "prefect.server.services.scheduler - Unexpected error" in server.log_tail(200):
                break  # the scheduler is failing: no run will come
            done = next((r for r in seen if r["state_type"] in ("COMPLETED", "FAILED", "CRASHED")), None)
            time.sleep(2)
        diagnosis = (f"flow runs: {[(r['name'], r['state_name'], r['start_time'], r['end_time']) for r in seen[:3]]}\n"
                     f"--- server log ---\n{server.log_tail()}\n"
                     f"--- serve log ---\n{(server.home / 'serve.log').read_text()[-3000:]}")
        assert seen, f"the scheduler created no flow run in {DEADLINE_S} s\n{diagnosis}"
        assert done is not None, f"no scheduled run finished in {DEADLINE_S} s\n{diagnosis}"
        assert done["state_type"] == "COMPLETED", diagnosis
        # Created by the scheduler from the cron, not by hand.
        assert done["auto_scheduled"] is True and done["parameters"]["iterations"] == 1
        assert done["parameters"]["run_dir"] == str((runs / "cron").resolve())
        dep = server.deployment("nash-round", "cron-round")
        assert dep["schedules"][0]["schedule"]["cron"] == "* * * * *" and dep["global_concurrency_limit"]["limit"] == 1

    it = RunDir(runs / "cron").iterations()[0]
    assert it.complete and (it.policy / "model.safetensors").is_file()
    assert it.manifest()["status"] == "complete"

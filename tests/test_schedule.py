"""Scheduled rounds, run for real: `prefect server start` (its scheduler service included), `nash serve`
and flow runs that the scheduler creates and the served process picks up.

- a one-minute cron: a scheduled run is created, picked up and completes (the default selection);
- a round that outlasts its interval: the slots that come due meanwhile are cancelled, not queued;
- a round that fails in a stage: Failed in Prefect with the stage and the error in its log, and the
  next scheduled round resumes the same iteration.

The last two serve with `--interval` (seconds) so they need not wait for minute slots, and hold or
break a real loopback judge server (tests/openai_server.py) to make a round slow or fail.
"""

import sys
import threading
import time
from datetime import datetime
from pathlib import Path

import pytest

from nash.registry import RunDir
from tests.openai_server import OpenAIServer, default_reply
from tests.prefect_server import ROOT, PrefectServer

# One cron slot (at most 60 s away), the runner's 10 s poll and a tiny-model iteration (about
# 2 minutes on 2 busy cores), with room for a slow machine.
DEADLINE_S = 480
# The interval of the other two: shorter than a round of the tiny model (about a minute).
INTERVAL_S = 15


def _serve(server: PrefectServer, runs: Path, overrides: list[str], *schedule: str):
    sets = [x for o in overrides for x in ("--set", o)]
    return server.start([sys.executable, "-m", "nash.flows.cli", "serve", str(ROOT / "configs" / "default.yaml"),
                         *schedule, "--iterations", "1", "--runs-dir", str(runs), *sets], "serve.log")


def _diagnosis(server: PrefectServer, runs: list[dict]) -> str:
    return (f"flow runs: {[(r['name'], r['state_name'], r['expected_start_time'], r['start_time'], r['end_time']) for r in runs[:8]]}\n"
            f"--- server log ---\n{server.log_tail()}\n"
            f"--- serve log ---\n{(server.home / 'serve.log').read_text()[-4000:]}")


def _t(s: str | None) -> float | None:
    return datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp() if s else None


def _max_running(runs: list[dict]) -> int:
    """The most flow runs that were running at once, from their start and end times."""
    events = []
    for r in runs:
        if r["run_count"]:  # a cancelled run has a start time too, but never ran
            events += [(_t(r["start_time"]), 1), (_t(r["end_time"]) if r["end_time"] else float("inf"), -1)]
    best = cur = 0
    for _, d in sorted(events):
        cur += d
        best = max(best, cur)
    return best


def _openai_judge(url: str) -> list[str]:
    # Pairs from the loopback judge's deterministic 0..5 scores; the evaluation asks it pairwise.
    return ["judge.kind=openai", f"judge.base_url={url}", "judge.max_retries=0", "judge.timeout_s=600",
            "pairs.min_chosen_score=1", "pairs.min_margin=1", "eval.drift_prompts=0", "train.kl_prompts=0"]


def test_served_cron_round_is_scheduled_picked_up_and_completes(tmp_path, tiny_overrides):
    runs = tmp_path / "runs"
    # The tiny model writes no real answers, so the rules judge alone makes its pairs.
    overrides = tiny_overrides + ["run.name=cron", "judge={kind: rules}", "eval.drift_prompts=0", "train.kl_prompts=0"]
    with PrefectServer(tmp_path / "prefect") as server:
        served = _serve(server, runs, overrides, "--cron", "* * * * *")
        deadline = time.monotonic() + DEADLINE_S
        done, seen = None, []
        while time.monotonic() < deadline and done is None:
            assert served.poll() is None, (server.home / "serve.log").read_text()[-3000:]
            seen = server.flow_runs("cron-round")
            if not seen and "prefect.server.services.scheduler - Unexpected error" in server.log_tail(200):
                break  # the scheduler is failing: no run will come
            done = next((r for r in seen if r["state_type"] in ("COMPLETED", "FAILED", "CRASHED")), None)
            time.sleep(2)
        diagnosis = _diagnosis(server, seen)
        assert seen, f"the scheduler created no flow run in {DEADLINE_S} s\n{diagnosis}"
        assert done is not None, f"no scheduled run finished in {DEADLINE_S} s\n{diagnosis}"
        assert done["state_type"] == "COMPLETED", diagnosis
        # Created by the scheduler from the cron, not by hand.
        assert done["auto_scheduled"] is True and done["parameters"]["iterations"] == 1
        assert done["parameters"]["run_dir"] == str((runs / "cron").resolve())
        dep = server.deployment("nash-round", "cron-round")
        assert dep["schedules"][0]["schedule"]["cron"] == "* * * * *"
        # One round at a time; a slot that comes due meanwhile is cancelled, not queued.
        assert dep["global_concurrency_limit"]["limit"] == 1
        assert dep["concurrency_options"]["collision_strategy"] == "CANCEL_NEW"

    it = RunDir(runs / "cron").iterations()[0]
    assert it.complete and (it.policy / "model.safetensors").is_file()
    assert it.manifest()["status"] == "complete"


@pytest.mark.slow
def test_a_round_that_outlasts_its_interval_cancels_the_slots_that_come_due(tmp_path, tiny_overrides, monkeypatch):
    """The judge server holds its replies, so the first round stays in its judge stage over several
    intervals: every slot that comes due meanwhile ends Cancelled, none waits or runs beside it."""
    monkeypatch.setenv("NASH_CACHE", str(tmp_path / "cache"))
    release = threading.Event()

    def slow_judge(prompt: str) -> str:
        release.wait(DEADLINE_S)
        return default_reply(prompt)

    runs = tmp_path / "runs"
    with OpenAIServer(slow_judge) as judge, PrefectServer(tmp_path / "prefect") as server:
        try:
            served = _serve(server, runs, tiny_overrides + ["run.name=slow"] + _openai_judge(judge.url),
                            "--interval", str(INTERVAL_S))
            deadline = time.monotonic() + DEADLINE_S
            seen, cancelled = [], []
            # The first round is in its judge stage and two later slots have been cancelled.
            while time.monotonic() < deadline and not (judge.requests and len(cancelled) >= 2):
                assert served.poll() is None, (server.home / "serve.log").read_text()[-3000:]
                seen = server.flow_runs("slow-round")
                cancelled = [r for r in seen if r["state_type"] == "CANCELLED"]
                time.sleep(1)
            diagnosis = _diagnosis(server, seen)
            assert judge.requests and len(cancelled) >= 2, f"no collision in {DEADLINE_S} s\n{diagnosis}"
            running = [r for r in seen if r["state_type"] == "RUNNING"]
            assert len(running) == 1, diagnosis
            first = running[0]
            # While it runs, every other slot up to the last cancelled one is Cancelled, and none is
            # Pending, Late, Running or awaiting a slot.
            last = max(_t(r["expected_start_time"]) for r in cancelled)
            due = [r for r in seen if r["id"] != first["id"] and _t(r["expected_start_time"]) <= last]
            assert all(r["state_type"] == "CANCELLED" for r in due), diagnosis
            others = {r["state_name"] for r in seen if r["id"] != first["id"]}
            assert others <= {"Scheduled", "Cancelled"}, diagnosis
            # ... among them slots that came due after the first round had started: it outlasted its interval.
            assert any(_t(r["expected_start_time"]) > _t(first["start_time"]) for r in cancelled), diagnosis
            for r in cancelled:  # cancelled by the server's deployment concurrency rule, never run
                history = [s["name"] for s in server.states(r["id"])]
                assert history == ["Scheduled", "Cancelled"], (history, r)
                assert r["state"]["message"] == "Deployment concurrency limit reached." and r["run_count"] == 0, r
            # Only the first round's iteration was opened.
            assert [it.path.name for it in RunDir(runs / "slow").iterations()] == ["iter_001"]

            release.set()
            deadline, done = time.monotonic() + DEADLINE_S, None
            while time.monotonic() < deadline and done is None:
                done = next((r for r in server.flow_runs("slow-round") if r["id"] == first["id"]
                             and r["state_type"] in ("COMPLETED", "FAILED", "CRASHED")), None)
                time.sleep(2)
            seen = server.flow_runs("slow-round")
            diagnosis = _diagnosis(server, seen)
            assert done is not None and done["state_type"] == "COMPLETED", diagnosis
            assert _max_running(seen) == 1, diagnosis
            dep = server.deployment("nash-round", "slow-round")
            assert dep["schedules"][0]["schedule"]["interval"] == INTERVAL_S
            assert dep["global_concurrency_limit"]["limit"] == 1
            assert dep["concurrency_options"]["collision_strategy"] == "CANCEL_NEW"
        finally:
            release.set()  # whatever happened, the held replies go out

    its = RunDir(runs / "slow").iterations()
    assert its[0].complete
    # A round after the first (if one started before the server stopped) opened the next iteration.
    if len(its) > 1:
        assert its[1].manifest()["started_at"] >= its[0].manifest()["finished_at"]


@pytest.mark.slow
def test_a_failed_round_is_failed_in_prefect_and_the_next_round_resumes_it(tmp_path, tiny_overrides, monkeypatch):
    """The judge's server answers `nash serve`'s check but refuses every judging request of the first
    round (401): that round fails in its judge stage. Once the server accepts the key, the next
    scheduled round resumes the same iteration from the judge stage and completes."""
    monkeypatch.setenv("NASH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("OPENAI_API_KEY", "sk-scheduled-5e2a")
    runs = tmp_path / "runs"
    refusing = threading.Event()
    refusing.set()
    with OpenAIServer() as judge, PrefectServer(tmp_path / "prefect") as server:
        judge.fault = lambda _prompt: ("401",) if refusing.is_set() else None
        overrides = tiny_overrides + ["run.name=resume"] + _openai_judge(judge.url)
        served = _serve(server, runs, overrides, "--interval", str(INTERVAL_S))
        deadline = time.monotonic() + DEADLINE_S
        its = []
        while time.monotonic() < deadline and not (its and its[0].status == "failed"):
            assert served.poll() is None, (server.home / "serve.log").read_text()[-3000:]
            its = RunDir(runs / "resume").iterations() if (runs / "resume").is_dir() else []
            time.sleep(0.5)
        assert its and its[0].status == "failed", _diagnosis(server, server.flow_runs("resume-round"))
        refusing.clear()
        failed = its[0].manifest()
        assert failed["stages"]["judge"]["status"] == "failed"
        assert "judgments failed" in failed["stages"]["judge"]["error"]
        assert failed["stages"]["sample"]["status"] == "complete"
        samples_written = its[0].samples.stat().st_mtime_ns

        done, seen = None, []
        while time.monotonic() < deadline and done is None:
            assert served.poll() is None, (server.home / "serve.log").read_text()[-3000:]
            seen = server.flow_runs("resume-round")
            done = next((r for r in seen if r["state_type"] == "COMPLETED"), None)
            time.sleep(2)
        diagnosis = _diagnosis(server, seen)
        assert done is not None, f"no round completed in {DEADLINE_S} s\n{diagnosis}"
        ran = [r for r in seen if r["run_count"]]
        assert [r["state_type"] for r in ran[:2]] == ["FAILED", "COMPLETED"] and ran[1]["id"] == done["id"], diagnosis
        first = ran[0]
        # Failed in Prefect, with the exception in its state and one log line naming iteration, stage and error.
        assert "judgments failed" in first["state"]["message"]
        line = "iteration iter_001 failed in stage judge: RuntimeError: every one of"
        logs = []
        for _ in range(30):  # log records reach the server in batches
            logs = server.logs(first["id"])
            if any(line in x["message"] for x in logs):
                break
            time.sleep(1)
        assert [x["level"] for x in logs if line in x["message"]] == [40], [x["message"] for x in logs]
        # The next round resumed the same iteration: one iteration, opened by the first round.
        resumed = [x["message"] for x in server.logs(done["id"])]
        assert any(m.startswith(f"iteration iter_001: {its[0].path}") for m in resumed), resumed
        assert _max_running(seen) == 1, diagnosis

    it = RunDir(runs / "resume").iterations()[0]
    m = it.manifest()
    assert it.complete and m["error"] is None and m["started_at"] == failed["started_at"]
    assert m["judge_outcomes"]["failed"] == 0
    # Sampling was not redone: its record and its file are the first round's.
    assert m["stages"]["sample"] == failed["stages"]["sample"] and it.samples.stat().st_mtime_ns == samples_written
    assert m["stages"]["judge"]["status"] == "complete"

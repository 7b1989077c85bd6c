"""Stages on work pools, for real: `prefect server start` on loopback, `prefect worker start` process
workers in working directories of their own, `nash deploy` and `nash run` as a user types them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.openai_server import OpenAIServer
from tests.prefect_server import ROOT, PrefectServer

NASH = [sys.executable, "-m", "nash.flows.cli"]
DEFAULT = str(ROOT / "configs" / "default.yaml")
WORKER_ENV = {"PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_WORKER_HEARTBEAT_SECONDS": "5"}


def _sets(overrides):
    return [a for o in overrides for a in ("--set", o)]


def start_worker(server: PrefectServer, pool: str, name: str, cwd: Path, env: dict | None = None):
    cwd.mkdir(parents=True, exist_ok=True)
    return server.start([sys.executable, "-m", "prefect", "worker", "start", "--pool", pool, "--type", "process",
                         "--name", name, "--limit", "1"], f"worker-{name}.log", cwd=cwd,
                        env={**WORKER_ENV, **(env or {})})


def nash(server: PrefectServer, args: list[str], cwd: Path, timeout: float = 900, env: dict | None = None):
    cwd.mkdir(parents=True, exist_ok=True)
    return subprocess.run(NASH + args, cwd=cwd, env={**server.env(), **(env or {})}, capture_output=True, text=True,
                          timeout=timeout)


def stage_runs(server: PrefectServer) -> dict[str, list[dict]]:
    """The nash-stage flow runs by name, oldest first."""
    out: dict[str, list[dict]] = {}
    for r in server.flow_runs():
        if r.get("deployment_id") and ("-sample" in r["name"] or r["name"].rsplit("-", 1)[-1] in
                                       ("judge", "train", "evaluate")):
            out.setdefault(r["name"], []).append(r)
    return out


def _records(path: Path) -> list[dict]:
    volatile = ("seconds", "latency", "_at", "time")
    return [{k: v for k, v in json.loads(line).items() if not any(x in k for x in volatile)}
            for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_stages_on_two_pools_give_what_the_in_process_run_gives(tmp_path, tiny_overrides):
    from nash.config import load_config
    from nash.iteration import run_iteration
    from nash.registry import RunDir

    base = [*tiny_overrides, "sampling.shards=2", "run.name=pools"]
    ref = RunDir.create(tmp_path / "ref", load_config(DEFAULT, base))
    run_iteration(str(ref.path))

    pools = ["stages.sample.work_pool=gpu", "stages.train.work_pool=gpu",
             "stages.judge.work_pool=cpu", "stages.evaluate.work_pool=cpu"]
    runs = tmp_path / "shared" / "runs"
    with PrefectServer(tmp_path / "prefect") as server:
        start_worker(server, "gpu", "gpu-1", tmp_path / "machine-a")
        start_worker(server, "cpu", "cpu-1", tmp_path / "machine-b")
        r = nash(server, ["deploy", DEFAULT, "--runs-dir", str(runs), *_sets(base + pools)], tmp_path / "laptop")
        assert r.returncode == 0, r.stderr
        assert "deployment nash-stage/pools-judge on work pool cpu" in r.stderr
        r = nash(server, ["run", DEFAULT, "--iterations", "1", "--runs-dir", str(runs), *_sets(base + pools)],
                 tmp_path / "laptop")
        assert r.returncode == 0, r.stderr + "\n" + server.log_tail()
        children = stage_runs(server)
        gpu = server.deployment("nash-stage", "pools-sample")["work_pool_name"]
        cpu = server.deployment("nash-stage", "pools-judge")["work_pool_name"]
        assert (gpu, cpu) == ("gpu", "cpu")
        worker_logs = {p: (server.home / f"worker-{p}-1.log").read_text() for p in ("gpu", "cpu")}

    names = sorted(children)
    assert names == sorted(f"pools-iter_001-{s}" for s in
                           ("sample-shard-0", "sample-shard-1", "judge", "train", "evaluate")), names
    assert all(len(v) == 1 and v[0]["state_type"] == "COMPLETED" for v in children.values())
    for name, runs_ in children.items():
        pool = "gpu" if ("sample" in name or "train" in name) else "cpu"
        assert runs_[0]["work_pool_name"] == pool
        assert runs_[0]["id"] in worker_logs[pool], f"{name} was not run by the {pool} worker"

    it, ref_it = runs / "pools" / "iter_001", ref.path / "iter_001"
    markers = [json.loads(p.read_text()) for p in sorted((it / "sampling").glob("*.done"))]
    assert len(markers) == 2 and all(m["pid"] != os.getpid() for m in markers)
    for name in ("samples.jsonl", "judgments.jsonl", "pairs.jsonl"):
        assert _records(it / name) == _records(ref_it / name), name
    verdicts = sorted(p.relative_to(ref_it) for p in (ref_it / "eval").rglob("*.jsonl") if "sampling" not in p.parts)
    assert verdicts
    for rel in verdicts:
        assert _records(it / rel) == _records(ref_it / rel), rel
    m, ref_m = (json.loads((d / "metrics.json").read_text())["headline"] for d in (it, ref_it))
    assert m["win_rate"] == ref_m["win_rate"] and m["lc_win_rate"] == ref_m["lc_win_rate"]


@pytest.mark.slow  # over a minute on 2 cores; run by make test-slow
def test_a_failed_child_stage_fails_the_round_by_name_and_the_next_round_resumes(tmp_path, tiny_overrides):
    refused = threading.Event()
    with OpenAIServer() as judge_server:
        judge_server.fault = lambda prompt: ("401",) if not refused.is_set() else None
        base = [*tiny_overrides, "run.name=fails", "judge.kind=openai", f"judge.base_url={judge_server.url}",
                "judge.model=judge", "judge.api_key_env=NASH_TEST_JUDGE_KEY", "judge.max_retries=0",
                "eval.judge.kind=rules", "stages.judge.work_pool=cpu"]
        runs = tmp_path / "runs"
        with PrefectServer(tmp_path / "prefect") as server:
            start_worker(server, "cpu", "cpu-1", tmp_path / "judge-machine", env={"NASH_TEST_JUDGE_KEY": "sk-test"})
            r = nash(server, ["deploy", DEFAULT, "--runs-dir", str(runs), *_sets(base)], tmp_path / "laptop")
            assert r.returncode == 0, r.stderr
            argv = ["run", DEFAULT, "--iterations", "1", "--runs-dir", str(runs), *_sets(base)]
            r = nash(server, argv, tmp_path / "laptop")
            assert r.returncode == 1, r.stderr
            assert "stage judge failed on work pool cpu" in r.stderr, r.stderr
            rounds = [x for x in server.flow_runs() if x["name"] == "fails-round"]
            assert [x["state_type"] for x in rounds] == ["FAILED"]
            assert "stage judge failed on work pool cpu" in server.states(rounds[0]["id"])[-1]["message"]
            samples = runs / "fails" / "iter_001" / "samples.jsonl"
            sampled_at = samples.stat().st_mtime_ns

            refused.set()  # the key is accepted again
            r = nash(server, argv, tmp_path / "laptop")
            assert r.returncode == 0, r.stderr
            judge_runs = stage_runs(server)["fails-iter_001-judge"]
        assert [x["state_type"] for x in judge_runs] == ["FAILED", "COMPLETED"]
        assert samples.stat().st_mtime_ns == sampled_at  # the finished stage was kept, not redone
        m = json.loads((runs / "fails" / "iter_001" / "manifest.json").read_text())
        assert m["status"] == "complete" and m["judge_outcomes"]["failed"] == 0


def _process_of(flow_run_id: str) -> int | None:
    """The pid of the process that runs this flow run (its environment names it)."""
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if f"PREFECT__FLOW_RUN_ID={flow_run_id}".encode() in (d / "environ").read_bytes().split(b"\0"):
                    return int(d.name)
            except OSError:
                continue
    return None


@pytest.mark.slow
def test_a_sampling_worker_killed_mid_shard_costs_that_shard_only(tmp_path, tiny_overrides):
    held, release = threading.Event(), threading.Event()
    asked: dict[str, int] = {}
    lock = threading.Lock()

    runs = tmp_path / "runs"
    partition = runs / "killed" / "iter_001" / "prompts.jsonl"

    def fault(prompt):
        """Hold shard 0's second prompt: its worker dies with one prompt of the shard answered."""
        with lock:
            asked[prompt] = asked.get(prompt, 0) + 1
            shard0 = [json.loads(x)["text"] for x in partition.read_text().splitlines()[:3]]
            hold = not held.is_set() and prompt in shard0 and sum(asked.get(p, 0) for p in shard0) == 2
            if hold:
                held.set()
                held.prompt = prompt
        return ("hold", release, "held answer") if hold else None

    replies = iter(range(10**6))

    def varied(prompt):  # answers the rules judge scores apart, so pairs exist
        k = next(replies)
        return "Short plain answer" if k % 2 else "A much longer answer, with commas, and many more words than six"

    with OpenAIServer(responder=varied) as policy_server:
        policy_server.fault = fault
        base = [*tiny_overrides, "run.name=killed", "sampling.backend=openai",
                f"sampling.server.base_url={policy_server.url}", "sampling.server.api_key_env=NASH_TEST_KEY",
                "sampling.server.concurrency=1", "sampling.shards=2", "stages.sample.work_pool=gpu",
                "stages.zombie_after_s=40", "stages.poll_s=1"]
        env = {"NASH_TEST_KEY": "sk-test"}
        with PrefectServer(tmp_path / "prefect") as server:
            workers = [start_worker(server, "gpu", f"gpu-{i}", tmp_path / f"machine-{i}", env) for i in (1, 2)]
            assert nash(server, ["deploy", DEFAULT, "--runs-dir", str(runs), *_sets(base)], tmp_path / "laptop",
                        env=env).returncode == 0
            argv = NASH + ["run", DEFAULT, "--iterations", "1", "--runs-dir", str(runs), *_sets(base)]
            round_ = subprocess.Popen(argv, cwd=tmp_path, env={**server.env(), **env}, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True)
            try:
                assert held.wait(300), "no shard asked for a second prompt"
                parts = [json.loads(x) for x in partition.read_text().splitlines()]
                shard = 0
                child = stage_runs(server)[f"killed-iter_001-sample-shard-{shard}"][0]
                pid = _process_of(child["id"])
                assert pid is not None
                worker_pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
                assert worker_pid in [w.pid for w in workers]
                for p in (worker_pid, pid):  # the machine dies: its worker first, so nothing reports the run
                    os.kill(p, signal.SIGKILL)
                release.set()
                out, _ = round_.communicate(timeout=600)
            finally:
                if round_.poll() is None:
                    round_.kill()
            assert round_.returncode == 0, out + server.log_tail()
            children = stage_runs(server)

    killed = children[f"killed-iter_001-sample-shard-{shard}"]
    other = children[f"killed-iter_001-sample-shard-{1 - shard}"]
    assert [x["state_type"] for x in killed] == ["CRASHED", "COMPLETED"]
    assert [x["state_type"] for x in other] == ["COMPLETED"]
    assert "crashed" in out and "starting it again" in out
    own = [p["text"] for p in parts[3 * shard: 3 * shard + 3]]
    others = [p["text"] for p in parts if p["text"] not in own]
    assert all(asked.get(p, 0) == 1 for p in others), asked  # the other shard was sampled once
    assert asked[held.prompt] == 2 and sum(asked[p] for p in own) == 4  # the answered prompt was kept
    samples = (runs / "killed" / "iter_001" / "samples.jsonl").read_text().splitlines()
    assert len(samples) == 6 * 4


def _wait_for(predicate, timeout: float, what: str, poll: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@pytest.mark.slow
def test_stopping_the_round_cancels_its_running_child_and_the_next_round_trains_again(tmp_path, tiny_overrides):
    base = [*tiny_overrides, "run.name=stopped", "train.epochs=300", "stages.train.work_pool=gpu", "stages.poll_s=1"]
    runs = tmp_path / "runs"
    with PrefectServer(tmp_path / "prefect") as server:
        start_worker(server, "gpu", "gpu-1", tmp_path / "machine")
        assert nash(server, ["deploy", DEFAULT, "--runs-dir", str(runs), *_sets(base)], tmp_path).returncode == 0
        argv = NASH + ["run", DEFAULT, "--iterations", "1", "--runs-dir", str(runs), *_sets(base)]
        round_ = subprocess.Popen(argv, cwd=tmp_path, env=server.env(), stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True)
        try:
            log = runs / "stopped" / "iter_001" / "train.log"
            _wait_for(lambda: log.is_file() and "'loss'" in log.read_text(), 300, "training steps")
            child = stage_runs(server)["stopped-iter_001-train"][0]
            pid = _process_of(child["id"])
            assert pid is not None
            round_.send_signal(signal.SIGTERM)  # a scheduler's time limit, or `kill`
            out, _ = round_.communicate(timeout=120)
        finally:
            if round_.poll() is None:
                round_.kill()
        assert round_.returncode != 0
        _wait_for(lambda: stage_runs(server)["stopped-iter_001-train"][0]["state_type"] == "CANCELLED", 120,
                  "the train child to be cancelled")
        _wait_for(lambda: not Path(f"/proc/{pid}").exists(), 60, "the child's process to exit")

        r = nash(server, ["run", DEFAULT, "--iterations", "1", "--runs-dir", str(runs), *_sets(base)], tmp_path)
        assert r.returncode == 0, r.stderr
        states = [x["state_type"] for x in stage_runs(server)["stopped-iter_001-train"]]
    assert states == ["CANCELLED", "COMPLETED"]
    assert json.loads((runs / "stopped" / "iter_001" / "manifest.json").read_text())["status"] == "complete"


@pytest.mark.slow  # over a minute on 2 cores; run by make test-slow
def test_nash_eval_waits_for_the_device_slot_a_stage_holds(tmp_path, tiny_overrides):
    from prefect.concurrency.sync import concurrency
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from nash.config import load_config
    from nash.iteration import run_iteration
    from nash.registry import RunDir

    base = [*tiny_overrides, "run.name=slots", "stages.evaluate.work_pool=gpu", "stages.evaluate.device_slots=1"]
    run = RunDir.create(tmp_path / "runs", load_config(DEFAULT, base))
    run_iteration(str(run.path))  # the stages themselves, without Prefect
    with PrefectServer(tmp_path / "prefect") as server:
        r = nash(server, ["deploy", DEFAULT, "--runs-dir", str(tmp_path / "runs"), *_sets(base)], tmp_path)
        assert "global concurrency limit nash-devices-gpu: 1 slot(s)" in r.stderr, r.stderr
        with temporary_settings({PREFECT_API_URL: server.url}):
            with concurrency("nash-devices-gpu", occupy=1, strict=True):  # a stage on the pool's one device
                ev = subprocess.Popen(NASH + ["eval", str(run.path)], cwd=tmp_path, env=server.env(),
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                time.sleep(20)
                waited = ev.poll() is None
                released_at = time.monotonic()
            out, _ = ev.communicate(timeout=120)
            finished_at = time.monotonic()
    assert waited and finished_at > released_at, out
    assert "waiting for a device: every slot of nash-devices-gpu is taken" in out
    assert ev.returncode == 0 and "win rate" in out, out

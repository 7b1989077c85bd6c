"""Experiment trackers: a real `mlflow server` on loopback read back through MLflow's client, W&B's
offline run files read back with its own protobuf schema, TensorBoard event files read back with
TensorBoard's own reader, and Trackio's own store."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from nash import iteration
from nash.config import load_config
from nash.errors import UserError
from nash.preflight import preflight
from nash.registry import RunDir


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """`mlflow server` with its own SQLite store, on loopback."""
    root = tmp_path_factory.mktemp("mlflow")
    port = _free_port()
    exe = Path(sys.executable).with_name("mlflow")
    proc = subprocess.Popen([str(exe), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                             "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
                             "--default-artifact-root", str(root / "artifacts")],
                            stdout=open(root / "server.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            try:
                urllib.request.urlopen(url + "/health", timeout=1)
                break
            except OSError:
                if proc.poll() is not None:
                    raise RuntimeError((root / "server.log").read_text()[-2000:]) from None
                time.sleep(0.5)
        else:
            raise RuntimeError("mlflow server did not answer in 120 s: " + (root / "server.log").read_text()[-2000:])
        yield url
    finally:
        proc.terminate()
        proc.wait(30)


def test_iteration_figures_and_training_steps_reach_mlflow(mlflow_server, tmp_path, tiny_overrides):
    from mlflow import MlflowClient

    cfg = load_config(None, tiny_overrides + ["run.name=tracked", "tracking.kind=mlflow",
                                              f"tracking.uri={mlflow_server}", "tracking.experiment=nash-test",
                                              "eval.drift_prompts=0", "train.kl_prompts=0"])
    run = RunDir.create(tmp_path, cfg)
    preflight(cfg, run)
    iteration.run_iteration(str(run.path))
    (it,) = run.iterations()
    head = json.loads(it.metrics.read_text())["headline"]

    client = MlflowClient(tracking_uri=mlflow_server)
    exp = client.get_experiment_by_name("nash-test")
    parents = client.search_runs([exp.experiment_id], "tags.`nash.run` = 'tracked'")
    parent = next(r for r in parents if "nash.iteration" not in r.data.tags)
    child = next(r for r in parents if r.data.tags.get("nash.iteration") == "1")
    assert parent.data.tags["nash.config_hash"] == cfg.hash()
    assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
    # The iteration's figures on the run, at step 1, equal to metrics.json.
    for key in ("win_rate", "substantive_pass_rate", "degenerate", "pass_rate"):
        (point,) = client.get_metric_history(parent.info.run_id, key)
        assert (point.step, point.value) == (1, pytest.approx(head[key])), key
    (pairs,) = client.get_metric_history(parent.info.run_id, "pairs_kept")
    assert pairs.value == it.manifest()["pairs"]["pairs"]
    assert client.get_metric_history(parent.info.run_id, "seconds_train")[0].value > 0
    # TRL's per-step training logs in the iteration's nested run.
    losses = client.get_metric_history(child.info.run_id, "loss")
    assert len(losses) == json.loads((it.path / "train.json").read_text())["steps"] >= 1
    assert [p.step for p in losses] == list(range(1, len(losses) + 1))
    assert json.loads((run.path / "tracking.json").read_text())["logged"] == [1]


def test_a_tracker_that_is_down_fails_preflight_or_warns(tmp_path, tiny_overrides, caplog, monkeypatch):
    dead = f"http://127.0.0.1:{_free_port()}"
    cfg = load_config(None, tiny_overrides + ["run.name=down", "tracking.kind=mlflow", f"tracking.uri={dead}"])
    run = RunDir.create(tmp_path, cfg)
    t0 = time.time()
    with pytest.raises(UserError, match="tracking.uri"):
        preflight(cfg, run)
    assert time.time() - t0 < 30  # one quick question, not minutes of retries
    warn = load_config(None, tiny_overrides + ["run.name=down", "tracking.kind=mlflow", f"tracking.uri={dead}",
                                               "tracking.on_error=warn"])
    preflight(warn, run)  # tracking is not hashed: the same run takes it
    assert "going on without it" in caplog.text
    # Training goes on untracked: the worker is told to report to nothing.
    from nash import tracking
    from nash.registry import IterationDir

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    run = RunDir.create(tmp_path, warn)  # a command's tracking section replaces the run's
    assert run.config().tracking.on_error == "warn"
    env = tracking.trainer_env(IterationDir(run, 1))
    assert env == {tracking.OFF: "1"}
    monkeypatch.setenv(tracking.OFF, "1")
    assert tracking.report_to(warn) == "none"
    monkeypatch.delenv(tracking.OFF)
    assert tracking.report_to(warn) == ["mlflow"]


def _wandb_iteration(tmp_path, tiny_overrides, extra=()):
    cfg = load_config(None, tiny_overrides + ["run.name=wb", "tracking.kind=wandb", "tracking.experiment=nightly",
                                              "eval.drift_prompts=0", "train.kl_prompts=0", *extra])
    run = RunDir.create(tmp_path, cfg)
    preflight(cfg, run)
    iteration.run_iteration(str(run.path))
    return cfg, run


def _served(server) -> dict[str, dict]:
    """What the stand-in server received, per run, in the shape of tests/wandb_store.py's sessions."""
    out = {}
    for run_id, got in server.runs.items():
        first = got["upserts"][0]
        config = {k: v.get("value") if isinstance(v, dict) else v for k, v in json.loads(first["config"]).items()}
        out[run_id] = {"project": first["project"], "name": first["displayName"], "group": first["groupName"],
                       "job_type": first["jobType"], "tags": first["tags"], "config": config,
                       "history": got["history"], "exitcode": got.get("exitcode")}
    return out


def _check_wandb_runs(cfg, run, runs: dict[str, dict]) -> None:
    """One W&B run for the nash run with the iteration's figures at step 1, one for its training steps."""
    (it,) = run.iterations()
    head = json.loads(it.metrics.read_text())["headline"]
    ids = json.loads((run.path / "tracking.json").read_text())["wandb"]
    assert set(runs) == {ids["run_id"], ids["iterations"]["1"]}
    nash_run, training = runs[ids["run_id"]], runs[ids["iterations"]["1"]]
    assert (nash_run["project"], nash_run["name"], nash_run["group"], nash_run["job_type"]) == \
        ("nightly", "wb", "wb", "round")
    assert nash_run["config"]["nash.config_hash"] == cfg.hash() and f"config-{cfg.hash()}" in nash_run["tags"]
    (logged,) = nash_run["history"]  # equal to metrics.json
    assert logged["_step"] == 1
    for key in ("win_rate", "substantive_pass_rate", "degenerate", "pass_rate"):
        assert logged[key] == pytest.approx(head[key]), key
    assert logged["pairs_kept"] == it.manifest()["pairs"]["pairs"] and logged["seconds_train"] > 0
    # TRL's steps, from the training subprocess.
    assert (training["project"], training["name"], training["group"], training["job_type"]) == \
        ("nightly", "wb-iter_001", "wb", "train")
    assert f"config-{cfg.hash()}" in training["tags"]
    steps = [row["train/global_step"] for row in training["history"] if "train/loss" in row]
    assert steps == list(range(1, json.loads((it.path / "train.json").read_text())["steps"] + 1)) and steps


def test_iteration_figures_and_training_steps_reach_a_wandb_server(tmp_path, tiny_overrides, monkeypatch):
    from tests.wandb_server import WandbServer

    key = "nashtest" + "k" * 40
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", key)
    monkeypatch.setenv("HOME", str(tmp_path))
    with WandbServer() as server:
        cfg, run = _wandb_iteration(tmp_path, tiny_overrides, [f"tracking.uri={server.url}"])
        runs = _served(server)
        assert not server.unknown and server.keys == {key}  # the key went in the header, and only there
    _check_wandb_runs(cfg, run, runs)
    assert all(r["exitcode"] == 0 for r in runs.values())  # both runs finished
    assert iteration.tracking.sync(run) == []  # logged once
    assert not _wandb_services(str(run.path))  # no W&B service outlives the stage that started it
    leaked = [p for p in run.path.rglob("*") if p.is_file() and key.encode() in p.read_bytes()]
    assert not leaked


@pytest.mark.slow  # a W&B server that stops answering holds nothing past tracking.timeout_s
def test_a_wandb_server_that_stops_answering_costs_at_most_the_timeout(tmp_path, tiny_overrides, monkeypatch, caplog):
    from tests.wandb_server import WandbServer

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    monkeypatch.setenv("HOME", str(tmp_path))
    with WandbServer() as server:
        server.stall_file_stream = True  # logins and run upserts are answered, the steps never are
        t0 = time.time()
        cfg, run = _wandb_iteration(tmp_path, tiny_overrides, [f"tracking.uri={server.url}", "tracking.timeout_s=5",
                                                               "tracking.on_error=warn"])
        took = time.time() - t0
        (it,) = run.iterations()
        assert it.complete and json.loads((it.path / "train.json").read_text())["steps"] >= 1
        assert "did not finish the training run in 5 s" in (it.path / "train.log").read_text()
        assert "no answer in 5 s" in caplog.text
        assert json.loads((run.path / "tracking.json").read_text()).get("logged", []) == []
        assert took < 120, took
        assert not _wandb_services(str(run.path))
        # When the server answers again, the next sync logs the iteration it missed.
        server.stall_file_stream = False
        assert iteration.tracking.sync(run) == [1]
        parent = json.loads((run.path / "tracking.json").read_text())["wandb"]["run_id"]
        assert [row["_step"] for row in server.runs[parent]["history"]] == [1]


@pytest.mark.slow  # a second W&B iteration; the server test keeps W&B in the fast selection
def test_offline_wandb_run_files_hold_the_figures_and_sync_to_a_server(tmp_path, tiny_overrides, monkeypatch):
    from tests import wandb_store
    from tests.wandb_server import WandbServer

    monkeypatch.setenv("WANDB_MODE", "offline")  # a node without internet: run files for `wandb sync`
    cfg, run = _wandb_iteration(tmp_path, tiny_overrides)
    files = sorted((run.path / "wandb").glob("offline-run-*"))
    assert len(files) == 2
    stored = {run_id: sessions[0] for run_id, sessions in wandb_store.runs(run.path / "wandb").items()}
    _check_wandb_runs(cfg, run, stored)
    monkeypatch.delenv("WANDB_MODE")
    with WandbServer() as server:
        env = {**os.environ, "WANDB_API_KEY": "k" * 40, "WANDB_BASE_URL": server.url, "HOME": str(tmp_path)}
        done = subprocess.run([str(Path(sys.executable).with_name("wandb")), "sync", *map(str, files)], env=env,
                              cwd=tmp_path, capture_output=True, text=True, timeout=300)  # its logs go to cwd
        assert done.returncode == 0, done.stdout + done.stderr
        synced = _served(server)
        assert not server.unknown
    _check_wandb_runs(cfg, run, synced)
    for run_id, session in stored.items():
        assert synced[run_id]["history"] == session["history"]


def test_wandb_without_a_server_or_a_key_fails_preflight_or_warns(tmp_path, tiny_overrides, caplog, monkeypatch):
    from nash import tracking
    from nash.registry import IterationDir

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc login
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    dead = f"http://127.0.0.1:{_free_port()}"
    overrides = tiny_overrides + ["run.name=wbdown", "tracking.kind=wandb", f"tracking.uri={dead}"]
    cfg = load_config(None, overrides)
    run = RunDir.create(tmp_path, cfg)
    with pytest.raises(UserError, match="WANDB_API_KEY"):
        preflight(cfg, run)
    key = "k" * 40
    monkeypatch.setenv("WANDB_API_KEY", key)
    monkeypatch.setattr(tracking, "PROBE_S", 3)  # a server that never answers is cut off at the deadline
    t0 = time.time()
    with pytest.raises(UserError, match="tracking.uri") as failed:
        preflight(cfg, run)
    assert time.time() - t0 < 10 and "no answer in 3 s" in str(failed.value) and key not in str(failed.value)
    assert not _wandb_services(dead)  # killed with the probe
    warn = load_config(None, overrides + ["tracking.on_error=warn"])
    run = RunDir.create(tmp_path, warn)
    monkeypatch.delenv("WANDB_API_KEY")
    env = tracking.trainer_env(IterationDir(run, 1))  # training goes on untracked
    assert env == {tracking.OFF: "1"} and "going on without it" in caplog.text and key not in caplog.text


def _wandb_services(marker: str) -> list:
    """wandb-core processes started with `marker` in their environment, after a moment to exit."""
    import psutil

    for _ in range(20):
        left = [p for p in psutil.process_iter(["name", "environ"])
                if p.info["name"] == "wandb-core" and marker in json.dumps(p.info["environ"] or {})]
        if not left:
            break
        time.sleep(0.5)
    return left


@pytest.mark.slow  # a second tiny iteration; the MLflow test keeps tracking in the fast selection
def test_iteration_figures_and_training_steps_in_tensorboard_event_files(tmp_path, tiny_overrides):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = load_config(None, tiny_overrides + ["run.name=tb", "tracking.kind=tensorboard"])
    run = RunDir.create(tmp_path, cfg)
    iteration.run_iteration(str(run.path))
    (it,) = run.iterations()
    head = json.loads(it.metrics.read_text())["headline"]

    figures = EventAccumulator(str(run.path / "tensorboard" / "run"))
    figures.Reload()
    for key in ("win_rate", "substantive_pass_rate", "degenerate"):
        (event,) = figures.Scalars(f"nash/{key}")
        assert (event.step, event.value) == (1, pytest.approx(head[key], abs=1e-6)), key
    steps = EventAccumulator(str(run.path / "tensorboard" / "iter_001"))
    steps.Reload()
    loss = steps.Scalars("train/loss")
    assert len(loss) == json.loads((it.path / "train.json").read_text())["steps"] >= 1
    shutil.rmtree(run.path / "tensorboard")
    assert iteration.tracking.sync(run) == []  # logged once: tracking.json remembers


@pytest.mark.slow  # a fourth tiny iteration; the MLflow and W&B tests keep tracking in the fast selection
def test_iteration_figures_and_training_steps_in_a_trackio_project(tmp_path, tiny_overrides, monkeypatch):
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))  # read when trackio is imported
    for name in [m for m in sys.modules if m == "trackio" or m.startswith("trackio.")]:
        monkeypatch.delitem(sys.modules, name)
    cfg = load_config(None, tiny_overrides + ["run.name=tr", "tracking.kind=trackio", "tracking.experiment=nightly"])
    run = RunDir.create(tmp_path / "runs", cfg)
    preflight(cfg, run)
    iteration.run_iteration(str(run.path))
    (it,) = run.iterations()
    head = json.loads(it.metrics.read_text())["headline"]

    from trackio.sqlite_storage import SQLiteStorage

    assert set(SQLiteStorage.get_runs("nightly")) == {"tr", "tr-iter_001"}
    (logged,) = SQLiteStorage.get_logs("nightly", "tr")
    assert logged["step"] == 1
    for key in ("win_rate", "substantive_pass_rate", "degenerate", "pass_rate"):
        assert logged[key] == pytest.approx(head[key]), key
    steps = [row for row in SQLiteStorage.get_logs("nightly", "tr-iter_001") if "train/loss" in row or "loss" in row]
    assert len(steps) == json.loads((it.path / "train.json").read_text())["steps"] >= 1
    assert (tmp_path / "trackio" / "nightly.db").is_file()

"""Experiment trackers: every iteration where a team already looks.

TRL's per-step training logs go to the tracker through `report_to`, from the training
subprocess (the environment below says where). nash logs each complete iteration's figures
itself, with the iteration as the step:

- `mlflow`: one MLflow run per nash run, tagged with the config hash, holding the iteration
  figures; one nested run per iteration holding its training steps. Run ids are kept in
  RUN/tracking.json, so a resumed or scheduled round logs into the same runs.
- `wandb`: one W&B run per nash run (job type `round`) holding the iteration figures, and one per
  iteration's training (job type `train`, named `<run>-iter_NNN`), grouped under the run's name and
  tagged with the config hash. Run ids are kept in RUN/tracking.json; each session resumes its run.
  With WANDB_MODE=offline the run files stay in `tracking.dir`/wandb (default RUN/wandb) for `wandb sync`.
- `tensorboard`: event files under `tracking.dir` (default RUN/tensorboard): `iter_NNN/` for the
  training steps, `run/` for the iteration figures.
- `trackio`: in the local project `tracking.experiment` (default the run's name) under TRACKIO_DIR:
  a run named after the nash run for the iteration figures, `<run>-iter_NNN` for each iteration's
  training steps.

Logging follows the files: an iteration is logged after it is complete, and every complete
iteration not yet logged is logged at the next chance (`sync`), so a tracker that was down
loses nothing and never costs an iteration its files. `tracking.on_error: fail` (the default)
refuses to start a round whose tracker cannot be reached; `warn` logs and goes on without it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from nash.errors import UserError
from nash.records import write_json
from nash.registry import IterationDir, RunDir

log = logging.getLogger("nash")

HEADLINE = ("win_rate", "win_rate_se", "lc_win_rate", "pass_rate", "substantive_pass_rate", "degenerate",
            "mean_length", "kl_from_initial", "perplexity", "rank_shift", "retention", "retention_drop")


def figures(it: IterationDir) -> dict[str, float]:
    """What nash logs for a complete iteration: its headline figures, pairs, KL to π_t, judge cost and
    the seconds of each stage."""
    m = it.manifest()
    head = m.get("metrics", {})
    out = {k: float(head[k]) for k in HEADLINE if isinstance(head.get(k), (int, float))}
    out["promoted"] = float(bool(head.get("promoted")))
    pairs, train = m.get("pairs", {}), m.get("train", {})
    for key, value in (("pairs_kept", pairs.get("pairs")), ("training_pairs", pairs.get("training_pairs")),
                       ("kl_from_parent", train.get("kl_from_parent")), ("train_loss", train.get("train_loss")),
                       ("judge_usd", m.get("judge_spend", {}).get("iteration", {}).get("cost_usd"))):
        if isinstance(value, (int, float)):
            out[key] = float(value)
    for stage, seconds in m.get("timings", {}).items():
        out[f"seconds_{stage}"] = float(seconds)
    return out


class _State:
    """RUN/tracking.json: the tracker's run ids and the iterations already logged."""

    def __init__(self, run: RunDir):
        self.path = run.path / "tracking.json"
        self.data = json.loads(self.path.read_text(encoding="utf-8")) if self.path.is_file() else {}

    def save(self) -> None:
        write_json(self.path, self.data)


def _mlflow_client(cfg):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=cfg.tracking.uri)


def _experiment(client, cfg, name: str) -> str:
    exp = client.get_experiment_by_name(cfg.tracking.experiment or name)
    return exp.experiment_id if exp else client.create_experiment(cfg.tracking.experiment or name)


def _mlflow_runs(run: RunDir, it: IterationDir | None = None) -> tuple[str, str | None]:
    """The nash run's MLflow run, and `it`'s nested run, created once and remembered."""
    cfg = run.config()
    client = _mlflow_client(cfg)
    state = _State(run)
    ids = state.data.setdefault("mlflow", {"iterations": {}})
    if "run_id" not in ids:
        exp = _experiment(client, cfg, run.name)
        parent = client.create_run(exp, run_name=run.name, tags={"nash.run": run.name,
                                                                 "nash.config_hash": cfg.hash()})
        ids.update(run_id=parent.info.run_id, experiment_id=exp)
        state.save()
    child = None
    if it is not None:
        child = ids["iterations"].get(str(it.index))
        if child is None:
            made = client.create_run(ids["experiment_id"], run_name=_iteration_run_name(it),
                                     tags={"mlflow.parentRunId": ids["run_id"], "nash.run": run.name,
                                           "nash.iteration": str(it.index), "nash.config_hash": cfg.hash()})
            child = ids["iterations"][str(it.index)] = made.info.run_id
            state.save()
    return ids["run_id"], child


def _iteration_run_name(it: IterationDir) -> str:
    """The tracker run that holds an iteration's training steps."""
    return f"{it.run.name}-{it.path.name}"


def tensorboard_dir(run: RunDir) -> Path:
    d = run.config().tracking.dir
    return Path(d) if d else run.path / "tensorboard"


def _wandb_ids(run: RunDir, it: IterationDir | None = None) -> tuple[str, str | None]:
    """The nash run's W&B run id, and `it`'s training run id, made once and remembered."""
    import secrets

    state = _State(run)
    ids = state.data.setdefault("wandb", {"iterations": {}})
    ids.setdefault("run_id", secrets.token_hex(4))
    child = ids["iterations"].setdefault(str(it.index), secrets.token_hex(4)) if it is not None else None
    state.save()
    return ids["run_id"], child


def _wandb_offline() -> bool:
    import os

    return os.environ.get("WANDB_MODE", "").lower() in ("offline", "dryrun", "disabled")


def _wandb_where(cfg, run: RunDir) -> dict[str, str]:
    """wandb.init's environment (project, entity, server, directory, group, tags), shared by the round's
    run and the training subprocess's. W&B writes
    its files to WANDB_DIR/wandb: RUN/wandb by default."""
    d = Path(cfg.tracking.dir) if cfg.tracking.dir else run.path
    (d / "wandb").mkdir(parents=True, exist_ok=True)
    env = {"WANDB_PROJECT": cfg.tracking.experiment or run.name, "WANDB_DIR": str(d), "WANDB_RUN_GROUP": run.name,
           "WANDB_TAGS": f"nash,config-{cfg.hash()}"}
    if cfg.tracking.entity:
        env["WANDB_ENTITY"] = cfg.tracking.entity
    if cfg.tracking.uri:
        env["WANDB_BASE_URL"] = cfg.tracking.uri
    return env


def _wandb_worker(args: list[str], env: dict[str, str], log_path: Path, timeout_s: float) -> str | None:
    """Run nash/wandb_worker.py with a deadline; what went wrong, or None."""
    import os
    import subprocess
    import sys

    from nash.supervisor import Child
    from nash.wandb_worker import ERROR_TAG

    with Child([sys.executable, "-m", "nash.wandb_worker", *args], log_path, {**os.environ, **env}) as child:
        child.pump_in_background()
        try:
            rc = child.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            return f"no answer in {timeout_s:.0f} s"
        child.join_output()
        tail = list(child.tail)
    if rc == 0:
        return None
    said = [line[len(ERROR_TAG):].strip() for line in tail if line.startswith(ERROR_TAG)]
    return said[-1] if said else f"exited with status {rc}: {' | '.join(tail[-3:])}"


PROBE_S = 45  # wandb's own request timeout is 10 s; past this the probe and wandb's service are killed


def _wandb_probe(cfg) -> str | None:
    """Why W&B cannot take a run now (server down, no or bad API key), or None. Offline needs no server."""
    if _wandb_offline():
        return None
    import tempfile

    with tempfile.TemporaryDirectory(prefix="nash-wandb-") as tmp:
        problem = _wandb_worker(["probe"], {"WANDB_BASE_URL": cfg.tracking.uri} if cfg.tracking.uri else {},
                                Path(tmp) / "probe.log", PROBE_S)
    if problem:
        return (f"W&B at {cfg.tracking.uri or 'WANDB_BASE_URL, else api.wandb.ai,'} did not take the API key or did "
                f"not answer (tracking.uri, WANDB_API_KEY; WANDB_MODE=offline needs no server): {problem}")
    return None


OFF = "NASH_TRACKING_OFF"  # set for a training subprocess whose tracker did not answer (on_error: warn)


def report_to(cfg) -> str | list[str]:
    """TRL's `report_to` for the training arguments."""
    import os

    return "none" if cfg.tracking.kind == "none" or os.environ.get(OFF) else [cfg.tracking.kind]


def trainer_args(it: IterationDir) -> dict[str, str]:
    """Training arguments the tracker's callback reads: trackio's project and run name."""
    cfg = it.run.config()
    if cfg.tracking.kind == "wandb":
        return {"run_name": _iteration_run_name(it)}
    if cfg.tracking.kind == "trackio":
        return {"project": cfg.tracking.experiment or it.run.name, "run_name": _iteration_run_name(it)}
    return {}


def trainer_env(it: IterationDir) -> dict[str, str]:
    """Where the training subprocess's tracker callback writes: this iteration's nested run or directory."""
    cfg = it.run.config()
    kind = cfg.tracking.kind
    if kind == "mlflow":
        try:
            _, child = _mlflow_runs(it.run, it)
        except Exception as e:  # the tracker is down: training goes on, its steps are not tracked
            return _failed(cfg, f"MLflow at {cfg.tracking.uri}: {type(e).__name__}: {str(e)[:200]}", {OFF: "1"})
        return {"MLFLOW_RUN_ID": child, **({"MLFLOW_TRACKING_URI": cfg.tracking.uri} if cfg.tracking.uri else {})}
    if kind == "wandb":
        problem = _wandb_probe(cfg)
        if problem:
            return _failed(cfg, problem, {OFF: "1"})
        _, child = _wandb_ids(it.run, it)
        return {**_wandb_where(cfg, it.run), "WANDB_RUN_ID": child, "WANDB_RESUME": "allow", "WANDB_JOB_TYPE": "train"}
    if kind == "tensorboard":
        return {"TENSORBOARD_LOGGING_DIR": str(tensorboard_dir(it.run) / it.path.name)}
    return {}


def _failed(cfg, message: str, fallback):
    if cfg.tracking.on_error == "fail":
        raise UserError(f"tracking: {message}")
    log.warning("tracking: %s; going on without it (tracking.on_error: warn)", message)
    return fallback


def sync(run: RunDir) -> list[int]:
    """Log every complete iteration the tracker has not had yet; return their numbers."""
    cfg = run.config()
    if cfg.tracking.kind == "none":
        return []
    state = _State(run)
    logged = set(state.data.get("logged", []))
    todo = [it for it in run.lineage() if it.index not in logged]
    if not todo:
        return []
    try:
        if cfg.tracking.kind == "mlflow":
            from mlflow.entities import Metric

            client = _mlflow_client(cfg)
            parent, _ = _mlflow_runs(run)
            for it in todo:
                stamp = _millis(it)
                client.log_batch(parent, metrics=[Metric(k, v, stamp, it.index) for k, v in figures(it).items()])
            client.set_terminated(parent)  # FINISHED in the UI between rounds; the next sync logs to it again
        elif cfg.tracking.kind == "wandb":
            _sync_wandb(cfg, run, todo)
        elif cfg.tracking.kind == "trackio":
            import trackio

            trackio.init(project=cfg.tracking.experiment or run.name, name=run.name, resume="allow",
                         config={"nash.config_hash": cfg.hash()})
            try:
                for it in todo:
                    trackio.log(figures(it), step=it.index)
            finally:
                trackio.finish()
        else:  # tensorboard
            from torch.utils.tensorboard import SummaryWriter

            with SummaryWriter(log_dir=str(tensorboard_dir(run) / "run")) as writer:
                for it in todo:
                    for k, v in figures(it).items():
                        writer.add_scalar(f"nash/{k}", v, it.index)
    except UserError:
        raise
    except Exception as e:
        return _failed(cfg, f"{cfg.tracking.kind}: {type(e).__name__}: {e}", [])
    state = _State(run)
    state.data["logged"] = sorted(logged | {it.index for it in todo})
    state.save()
    return [it.index for it in todo]


def _sync_wandb(cfg, run: RunDir, todo: list[IterationDir]) -> None:
    parent, _ = _wandb_ids(run)
    where = _wandb_where(cfg, run)
    files = Path(where["WANDB_DIR"]) / "wandb"
    spec = files / "nash-log.json"
    write_json(spec, {"init": {"id": parent, "resume": "allow", "name": run.name, "job_type": "round",
                               "config": {"nash.run": run.name, "nash.config_hash": cfg.hash()}},
                      "rows": [[it.index, figures(it)] for it in todo]})
    problem = _wandb_worker(["log", str(spec)], where, files / "nash-wandb.log", cfg.tracking.timeout_s)
    if problem:
        raise RuntimeError(problem)


def finish_trainer_run(cfg) -> None:
    """In the training worker, once train.json is written: end its W&B run within `tracking.timeout_s`.
    A server that stopped answering would otherwise hold the worker at exit, and the stage with it."""
    import os
    import sys
    import threading

    wandb = sys.modules.get("wandb")
    if cfg.tracking.kind != "wandb" or wandb is None or wandb.run is None:
        return
    done = threading.Thread(target=wandb.finish, daemon=True)
    done.start()
    done.join(cfg.tracking.timeout_s)
    if done.is_alive():
        print(f"tracking: W&B did not finish the training run in {cfg.tracking.timeout_s:.0f} s (tracking.timeout_s); "
              "its last steps may be missing there", flush=True)
        os._exit(0)  # train.json is written: the iteration goes on


def _millis(it: IterationDir) -> int:
    from datetime import datetime

    finished = it.manifest().get("finished_at")
    return int(datetime.fromisoformat(finished).timestamp() * 1000) if finished else 0


def check(cfg) -> None:
    """Before the first stage: the tracker's package is installed and its server answers."""
    kind = cfg.tracking.kind
    if kind == "none":
        return
    import importlib.util
    import os

    if importlib.util.find_spec(kind) is None:
        _failed(cfg, f"kind {kind} needs the {kind} package: pip install 'nash[tracking]'", None)
        return
    if kind == "wandb":
        problem = _wandb_probe(cfg)
        if problem:
            _failed(cfg, problem, None)
    elif kind == "mlflow":
        # One quick question, not MLflow's default minutes of retries against a dead server.
        saved = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")}
        os.environ.update(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="10")
        try:
            _mlflow_client(cfg).search_experiments(max_results=1)
        except Exception as e:
            _failed(cfg, f"MLflow at {cfg.tracking.uri or 'the default tracking URI'} did not answer "
                    f"(tracking.uri): {type(e).__name__}: {str(e)[:200]}", None)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

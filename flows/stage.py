"""Stages on work pools: the flow a worker runs for one stage (or one sampling shard), the device
slot a GPU stage holds, and how the round starts such runs and reads back how they ended.

Prefect does the distribution: each mapped stage is a deployment (`nash deploy`), the round starts
it with `run_deployment` and paths as parameters, a worker of the stage's pool runs it against the
run directory on shared disk. What Prefect leaves to the caller is done here: a child's Failed,
Crashed or Cancelled state fails the round (run_deployment returns it quietly), a Crashed child
(its worker died; Prefect's zombie automation marks it) is started again, and the children of a
round that stops are cancelled.
"""

from __future__ import annotations

import logging
import re
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.states import Cancelled

from nash import iteration as stages
from nash.errors import UserError
from nash.registry import IterationDir

STAGE_FLOW = "nash-stage"
STAGE_ENTRYPOINT = "nash.flows.stage.stage_flow"  # a module path: nash is installed on every worker
REMOTE_STAGES = ("sample", "judge", "train", "evaluate")


class StageFailed(RuntimeError):
    """A stage's child run ended Failed, Crashed (out of retries) or Cancelled."""


def artifact_key(*parts: str) -> str:
    return re.sub(r"[^a-z0-9-]+", "-", "-".join(parts).lower()).strip("-")


def progress_reporter(description: str, min_interval: float = 2.0):
    """A (done, total) callback that moves a Prefect progress artifact, at most every few seconds."""
    artifact = create_progress_artifact(0.0, description=description)
    last = [0.0]

    def report(done: int, total: int) -> None:
        now = time.monotonic()
        if done >= total or now - last[0] >= min_interval:
            last[0] = now
            update_progress_artifact(artifact, 100.0 * done / max(1, total))

    return report


def deployment_name(run_name: str, stage: str) -> str:
    return f"{run_name}-{stage}"


def device_limit(work_pool: str) -> str:
    return f"nash-devices-{work_pool}"


@contextmanager
def device_slot(cfg, stage: str):
    """Hold one slot of the stage's pool's device limit while the stage runs (when stages.<stage>.device_slots is set)."""
    pool = getattr(cfg.stages, stage, None)
    if pool is None or pool.device_slots is None:
        yield
        return
    from prefect.concurrency._asyncio import ConcurrencySlotAcquisitionError
    from prefect.concurrency.sync import concurrency
    from prefect.settings import PREFECT_API_URL

    name = device_limit(pool.work_pool)
    try:
        try:
            slot = concurrency(name, occupy=1, timeout_seconds=2, strict=True)
            slot.__enter__()
        except TimeoutError:
            # Say why nothing happens: every device of the pool is taken by another stage or evaluation.
            logging.getLogger("nash").warning("nash: waiting for a device: every slot of %s (%s) is taken",
                                              name, f"stages.{stage}.device_slots={pool.device_slots}")
            print(f"nash: waiting for a device: every slot of {name} is taken", file=sys.stderr, flush=True)
            slot = concurrency(name, occupy=1, strict=True)
            slot.__enter__()
    except ConcurrencySlotAcquisitionError as e:
        raise UserError(f"stages.{stage}.device_slots: cannot take a slot of the global concurrency limit {name} "
                        f"on the Prefect server at {PREFECT_API_URL.value() or '(none: set PREFECT_API_URL)'}: "
                        f"{e}; `nash deploy CONFIG` creates it") from None
    try:
        yield
    finally:
        slot.__exit__(None, None, None)


def _stage_run_name() -> str:
    from prefect.runtime import flow_run

    p = flow_run.parameters
    shard = "" if p.get("shard") is None else f"-shard-{p['shard']}"
    return f"{Path(p['iter_dir']).parent.name}-{Path(p['iter_dir']).name}-{p['stage']}{shard}"


@flow(name=STAGE_FLOW, flow_run_name=_stage_run_name)
def stage_flow(iter_dir: str, stage: str, shard: int | None = None) -> str:
    """One stage of one iteration (for `sample`, one shard), as a worker of the stage's pool runs it."""
    if stage not in REMOTE_STAGES:
        raise ValueError(f"stage {stage!r}: expected one of {', '.join(REMOTE_STAGES)}")
    it = IterationDir.from_path(iter_dir)
    log = get_run_logger()
    log.info("%s of %s in %s", stage if shard is None else f"sample shard {shard}", it.path.name, iter_dir)
    progress = progress_reporter(f"{stage}{'' if shard is None else f' shard {shard}'}: {iter_dir}")
    with device_slot(it.run.config(), stage):
        if stage == "sample":
            return stages.sample_shard(iter_dir, shard, progress)
        return getattr(stages, stage)(iter_dir, progress)


def _cancel(client, run_ids) -> None:
    from prefect.states import Cancelling

    for run_id in run_ids:
        try:
            state = client.read_flow_run(run_id).state
            if state is None or state.is_final():
                continue
            # A run no worker has picked up yet is cancelled outright; a running one through its worker.
            picked_up = state.is_running() or state.is_pending() or state.type.value == "CANCELLING"
            client.set_flow_run_state(run_id, Cancelling() if picked_up else Cancelled(), force=True)
        except Exception:  # the round is stopping already; the next round sees what is left
            pass


def _stop_leftovers(client, deployment: str, iter_dir: str, poll_s: float, wait_s: float = 600) -> None:
    """Children of an earlier round of this iteration that still run (that round's process was killed)
    are cancelled and waited for, so no two runs of one stage write the same files."""
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterName,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType

    live = [StateType.SCHEDULED, StateType.PENDING, StateType.RUNNING, StateType.CANCELLING, StateType.PAUSED]
    flt = FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=live)))
    dep = DeploymentFilter(name=DeploymentFilterName(any_=[deployment.split("/", 1)[1]]))
    runs = [r for r in client.read_flow_runs(flow_run_filter=flt, deployment_filter=dep)
            if r.parameters.get("iter_dir") == iter_dir]
    if not runs:
        return
    get_run_logger().warning("%d run(s) of %s from an earlier round of %s still run; cancelling them first",
                             len(runs), deployment, iter_dir)
    _cancel(client, [r.id for r in runs])
    deadline = time.monotonic() + wait_s
    while any(not (client.read_flow_run(r.id).state or Cancelled()).is_final() for r in runs):
        if time.monotonic() > deadline:
            raise StageFailed(f"{deployment}: earlier runs for {iter_dir} did not stop in {wait_s:g} s; "
                              "cancel them in the Prefect UI, then run again")
        time.sleep(poll_s)


def run_remotely(iter_dir: str, stage: str, shards: list[int | None] | None = None) -> None:
    """Run `stage` of the iteration on its work pool, one child run per shard (or one for the stage); wait.

    Raises StageFailed naming the stage when a child ends Failed or Cancelled, or Crashed more than
    stages.retries times. On any way out (a failure, Ctrl-C, the round cancelled) the children
    still running are cancelled.
    """
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    it = IterationDir.from_path(iter_dir)
    cfg = it.run.config()
    pool = getattr(cfg.stages, stage)
    name = f"{STAGE_FLOW}/{deployment_name(it.run.name, stage)}"
    log = get_run_logger()
    shards = [None] if shards is None else shards

    def start(shard):
        run = run_deployment(name, parameters={"iter_dir": str(it.path), "stage": stage, "shard": shard},
                             timeout=0, as_subflow=True, work_queue_name=pool.work_queue)
        log.info("%s%s: flow run %s on work pool %s", stage, "" if shard is None else f" shard {shard}",
                 run.name, pool.work_pool)
        return run.id

    crashes = dict.fromkeys(shards, 0)
    with get_client(sync_client=True) as client:
        _stop_leftovers(client, name, str(it.path), cfg.stages.poll_s)
        running = {shard: start(shard) for shard in shards}
        try:
            while running:
                time.sleep(cfg.stages.poll_s)
                for shard, run_id in list(running.items()):
                    fr = client.read_flow_run(run_id)
                    state = fr.state
                    if state is None or not state.is_final():
                        continue
                    what = stage if shard is None else f"{stage} shard {shard}"
                    if state.is_completed():
                        del running[shard]
                    elif state.is_crashed() and crashes[shard] < cfg.stages.retries:
                        crashes[shard] += 1
                        log.warning("%s: flow run %s crashed (%s); starting it again (%d of stages.retries=%d), "
                                    "from the files it left", what, fr.name, state.message, crashes[shard],
                                    cfg.stages.retries)
                        running[shard] = start(shard)
                    else:
                        del running[shard]
                        message = " ".join(f"stage {what} failed on work pool {pool.work_pool}: flow run {fr.name} "
                                           f"ended {state.type.value}: {state.message or ''}".split())
                        stages.record_stage_failure(it, stage, message)
                        raise StageFailed(message)
        except BaseException:
            _cancel(client, list(running.values()))
            raise


def run_stage(stage: str, task, iter_dir: str) -> str:
    """Run a stage where the config puts it: its Prefect task here, or child runs on its work pool."""
    it = IterationDir.from_path(iter_dir)
    if stage not in it.run.config().stages.mapped():
        return task(iter_dir)
    if stage == "sample":
        if not stages.stage_complete(it, "sample"):
            pending = stages.pending_shards(iter_dir)
            if pending:
                run_remotely(iter_dir, "sample", pending)
        return task(iter_dir)  # joins the shards here: no model is loaded when every shard is done
    if not stages.stage_complete(it, stage):
        run_remotely(iter_dir, stage)
    if not stages.stage_complete(it, stage):
        raise StageFailed(f"stage {stage}: its child run completed but {it.manifest_path} does not record it complete")
    return str(stages.stage_output(it, stage))

"""`nash deploy`: register a run's mapped stages (and, with stages.round, the round) as deployments.

Everything is registered on the Prefect server at PREFECT_API_URL, idempotently (a second deploy
updates in place):
- one deployment of the stage flow per mapped stage, `nash-stage/<run>-<stage>`, on the stage's work
  pool with its job variables, entrypoint a module path (nash is installed on every worker), and
  the heartbeat period in its environment;
- the automation Prefect documents for zombie runs, for this run's stage runs only: a child with no
  heartbeat for stages.zombie_after_s is marked Crashed, which the round reads and retries;
- a global concurrency limit `nash-devices-<pool>` with device_slots slots where that is set;
- the work pools, as process pools, where they do not exist yet (other kinds are created by the user);
- with stages.round, the round flow on its pool, optionally on a schedule.
"""

from __future__ import annotations

from datetime import timedelta

from nash.errors import UserError
from nash.flows.stage import STAGE_ENTRYPOINT, STAGE_FLOW, deployment_name, device_limit, stage_flow
from nash.registry import RunDir

ROUND_ENTRYPOINT = "nash.flows.round.round_flow"


def stage_tag(run_name: str) -> str:
    return f"nash-stage-{run_name}"


def _job_variables(pool, heartbeat_s: int) -> dict:
    jv = dict(pool.job_variables)
    jv["env"] = {"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(heartbeat_s), **jv.get("env", {})}
    return jv


def _ensure_pool(client, name: str) -> str:
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound

    try:
        return client.read_work_pool(name).type
    except ObjectNotFound:
        client.create_work_pool(WorkPoolCreate(name=name, type="process"))
        return "process (created)"


def _zombie_automation(client, run: RunDir, stages_cfg) -> str:
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    name = f"nash {run.name}: crash stage runs without a heartbeat"
    automation = AutomationCore(
        name=name,
        description="A stage run of this nash run that stopped sending heartbeats lost its worker; marked Crashed, "
                    "the round starts it again (stages.retries).",
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.heartbeat", "prefect.flow-run.Completed", "prefect.flow-run.Failed",
                    "prefect.flow-run.Cancelled", "prefect.flow-run.Crashed"},
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            match_related=ResourceSpecification({"prefect.resource.role": "tag",
                                                 "prefect.resource.id": f"prefect.tag.{stage_tag(run.name)}"}),
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=stages_cfg.zombie_after_s),
        ),
        actions=[ChangeFlowRunState(state=StateType.CRASHED,
                                    message=f"no heartbeat for {stages_cfg.zombie_after_s} s: its worker died")],
    )
    for old in client.read_automations_by_name(name):
        client.delete_automation(old.id)
    client.create_automation(automation)
    return name


def _check_server() -> str:
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        raise UserError("stages: work pools need a Prefect server that workers reach; set PREFECT_API_URL "
                        "(e.g. http://HOST:4200/api after `prefect server start --host 0.0.0.0`)")
    return url


def deploy(run: RunDir, iterations: int, cron: str | None = None, interval: float | None = None) -> list[str]:
    """Register the run's stage deployments (and the round's); return one line per thing registered."""
    from prefect.client.orchestration import get_client
    from prefect.utilities.callables import parameter_schema

    cfg = run.config()
    mapped = cfg.stages.mapped()
    if not mapped and cfg.stages.round is None:
        raise UserError("stages: no stage is mapped to a work pool (stages.sample, judge, train, evaluate, round); "
                        "without one every stage runs inside `nash run` and there is nothing to deploy")
    if (cron or interval) and cfg.stages.round is None:
        raise UserError("--cron/--interval: a scheduled round needs stages.round (the pool whose worker runs it)")
    url = _check_server()
    lines = []
    with get_client(sync_client=True) as client:
        pools = {p.work_pool for p in mapped.values()} | ({cfg.stages.round.work_pool} if cfg.stages.round else set())
        for pool in sorted(pools):
            lines.append(f"work pool {pool}: {_ensure_pool(client, pool)}")
        if mapped:
            flow_id = client.create_flow_from_name(STAGE_FLOW)
            schema = parameter_schema(stage_flow).model_dump_for_openapi()
            for stage, pool in mapped.items():
                name = deployment_name(run.name, stage)
                client.create_deployment(
                    flow_id, name, entrypoint=STAGE_ENTRYPOINT, work_pool_name=pool.work_pool,
                    work_queue_name=pool.work_queue, job_variables=_job_variables(pool, cfg.stages.heartbeat_s),
                    parameter_openapi_schema=schema, enforce_parameter_schema=False,
                    tags=["nash", stage_tag(run.name)], description=f"the {stage} stage of nash run {run.name} "
                    f"({run.path}); started by its round with the iteration directory as parameter")
                lines.append(f"deployment {STAGE_FLOW}/{name} on work pool {pool.work_pool}")
                if pool.device_slots:
                    client.upsert_global_concurrency_limit_by_name(device_limit(pool.work_pool), pool.device_slots)
                    lines.append(f"global concurrency limit {device_limit(pool.work_pool)}: {pool.device_slots} slot(s)")
            lines.append(f"automation: {_zombie_automation(client, run, cfg.stages)}")
        if cfg.stages.round is not None:
            lines.append(_deploy_round(client, run, iterations, cron, interval))
    return [f"Prefect server {url}", *lines]


def _deploy_round(client, run: RunDir, iterations: int, cron, interval) -> str:
    from prefect.client.schemas.actions import DeploymentScheduleCreate
    from prefect.client.schemas.objects import ConcurrencyOptions
    from prefect.client.schemas.schedules import CronSchedule, IntervalSchedule
    from prefect.utilities.callables import parameter_schema

    from nash.flows.round import ROUND_CONCURRENCY, round_flow

    pool = run.config().stages.round
    schedules = []
    if cron:
        schedules = [DeploymentScheduleCreate(schedule=CronSchedule(cron=cron), active=True)]
    elif interval:
        schedules = [DeploymentScheduleCreate(schedule=IntervalSchedule(interval=timedelta(seconds=interval)),
                                              active=True)]
    name = f"{run.name}-round"
    client.create_deployment(
        client.create_flow_from_name(round_flow.name), name, entrypoint=ROUND_ENTRYPOINT,
        work_pool_name=pool.work_pool, work_queue_name=pool.work_queue, job_variables=dict(pool.job_variables),
        parameters={"run_dir": str(run.path.resolve()), "iterations": iterations},
        parameter_openapi_schema=parameter_schema(round_flow).model_dump_for_openapi(),
        schedules=schedules, concurrency_limit=ROUND_CONCURRENCY.limit,
        concurrency_options=ConcurrencyOptions(collision_strategy=ROUND_CONCURRENCY.collision_strategy),
        tags=["nash"], description=f"self-improvement rounds of nash run {run.name}")
    when = f", cron {cron!r}" if cron else f", every {interval:g} s" if interval else ""
    return f"deployment {round_flow.name}/{name} on work pool {pool.work_pool}{when}"


def check_deployed(run: RunDir) -> None:
    """Before a round with mapped stages starts: the server answers and every stage's deployment is there."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    cfg = run.config()
    mapped = cfg.stages.mapped()
    if not mapped:
        return
    url = _check_server()
    with get_client(sync_client=True) as client:
        for stage, pool in mapped.items():
            name = f"{STAGE_FLOW}/{deployment_name(run.name, stage)}"
            try:
                d = client.read_deployment_by_name(name)
            except ObjectNotFound:
                raise UserError(f"stages.{stage}: no deployment {name} on the Prefect server at {url}; "
                                "run `nash deploy CONFIG` (same --set and --runs-dir) first") from None
            if d.work_pool_name != pool.work_pool:
                raise UserError(f"stages.{stage}.work_pool is {pool.work_pool} but deployment {name} is on "
                                f"{d.work_pool_name}; run `nash deploy CONFIG` again")

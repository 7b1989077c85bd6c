"""The round flow: N iterations as subflows, then a markdown summary of the run."""

from __future__ import annotations

import base64
import json
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy

from nash import distill, report
from nash import iteration as stages
from nash.errors import UserError
from nash.flows.iteration import iteration_flow
from nash.flows.stage import artifact_key
from nash.registry import IterationDir, RunDir
from nash.report import iteration_row
from nash.runlock import run_lock


def _markdown_table(rows: list[dict]) -> str:
    head = list(rows[0])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(r[h]) for h in head) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def summary_markdown(run: RunDir) -> str:
    rows = [iteration_row(it.manifest()) for it in run.iterations()]
    if not rows:
        return f"# {run.name}\n\nNo iterations yet.\n"
    out = f"# Run `{run.name}`\n\n{run.path}\n\n" + _markdown_table(rows)
    heads = report.headlines(run)
    if heads:
        out += "\n## Evaluation\n\n" + _markdown_table(report.table_rows(heads))
        out += "\n" + "\n".join(f"- {line.strip()}" for line in report.decisions_text(heads).splitlines()) + "\n"
    if run.promoted_path.is_file():
        promoted = json.loads(run.promoted_path.read_text())
        out += f"\nPromoted: iteration {promoted['iteration']} ({promoted['policy']})\n"
    if run.plot_path.is_file():
        # Inline, so the UI shows it without serving the run directory.
        data = base64.b64encode(run.plot_path.read_bytes()).decode()
        out += f"\n![win rate, LC win rate and length per iteration](data:image/png;base64,{data})\n\n{run.plot_path}\n"
    return out


def stage_failure(iter_dir: str) -> str | None:
    """"iteration iter_001 failed in stage judge: ValueError: ...", from a failed iteration's manifest."""
    m = IterationDir.from_path(iter_dir).manifest()
    if m.get("status") != "failed":
        return None
    failed = [(name, s) for name, s in m.get("stages", {}).items() if s.get("status") == "failed"]
    if failed:
        name, s = failed[-1]
        return " ".join(f"iteration {Path(iter_dir).name} failed in stage {name}: {s.get('error')}".split())
    return " ".join(f"iteration {Path(iter_dir).name} failed: {m.get('error')}".split())


@task(name="distill")
def distill_task(run_dir: str) -> str:
    """`distill.every`: a reward model on the judgments so far, for the next iterations' cascade judge."""
    run = RunDir(run_dir)
    out = distill.distill(run)
    rep = json.loads((out / "report.json").read_text(encoding="utf-8"))
    create_markdown_artifact("\n".join(f"- {line}" for line in distill.summary_lines(rep)),
                             key=artifact_key("nash", run.name, out.name, "distill"),
                             description=f"{run.name}: reward model {out.name}, held-out agreement with the teacher")
    return str(out)


def _round_run_name() -> str:
    from prefect.runtime import flow_run

    return f"{Path(flow_run.parameters['run_dir']).name}-round"


@flow(name="nash-round", flow_run_name=_round_run_name)
def round_flow(run_dir: str, iterations: int) -> list[str]:
    log = get_run_logger()
    run = RunDir(run_dir)
    done = []
    # One writer per run: `nash run` holds the lock already (re-entrant), a scheduled round takes it.
    with run_lock(run.path, "nash round"):
        for _ in range(iterations):
            iter_dir = stages.prepare(run_dir)
            log.info("iteration %s: %s", Path(iter_dir).name, iter_dir)
            _plan_artifact(run, log)
            try:
                done.append(iteration_flow.with_options(flow_run_name=f"{run.name}-{Path(iter_dir).name}")(iter_dir))
            except Exception:
                failure = stage_failure(iter_dir)
                if failure:
                    log.error("%s; its finished stages are kept and the next round resumes it", failure)
                raise  # the round ends Failed, with the stage's exception
            if distill.due(run):
                try:
                    version = distill_task(run_dir)
                    log.info("distilled %s from the run's judgments", version)
                except UserError as e:  # too few pairs yet: the cascade keeps its last model, or the teacher
                    log.warning("no reward model distilled after %s: %s", Path(iter_dir).name, e)
        create_markdown_artifact(summary_markdown(run), key=artifact_key("nash", run.name, "summary"),
                                 description=f"round summary of {run.name}")
    return done


def _plan_artifact(run: RunDir, log) -> None:
    """What the iteration about to run will cost, as a markdown artifact and a log line."""
    from nash import plan as planning

    try:
        p = planning.plan_iteration(run.config(), run)
    except Exception as e:  # an estimate must never stop a round
        log.warning("no plan for the next iteration: %s: %s", type(e).__name__, e)
        return
    log.info("%s", planning.summary(p))
    create_markdown_artifact(planning.markdown(p), key=artifact_key("nash", run.name, f"iter_{p['iteration']:03d}", "plan"),
                             description=f"{run.name}: what iter_{p['iteration']:03d} will cost")


# One round of a run at a time (iterations are sequential), and a slot that comes due while a
# round still runs is cancelled, not queued: scheduled rounds never pile up behind a long one.
ROUND_CONCURRENCY = ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW)


def round_deployment(run_dir: str, iterations: int, cron: str | None = None, interval: float | None = None):
    """A deployment of the round flow on a cron schedule (e.g. nightly rounds) or every `interval` seconds.

    Its parameters are the run directory and the iteration count only: the config lives
    in the run's `run.json`, and secrets stay in the environment of the serving process.
    """
    if (cron is None) == (interval is None):
        raise ValueError("round_deployment: give a cron or an interval, not both")
    run = RunDir(run_dir)
    return round_flow.to_deployment(
        name=f"{run.name}-round",
        cron=cron,
        interval=interval,
        parameters={"run_dir": str(Path(run_dir).resolve()), "iterations": iterations},
        description=f"scheduled self-improvement rounds of {run.name}",
        tags=["nash"],
        concurrency_limit=ROUND_CONCURRENCY,
    )

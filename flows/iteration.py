"""The iteration flow: one Prefect task per stage, each taking and returning a path."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NO_CACHE

from nash import evaluation, report
from nash import iteration as stages
from nash.registry import IterationDir
from nash.report import iteration_row


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


def stage_task(name: str, stage, reports_progress: bool = True):
    """A Prefect task around one stage. Stages resume from their own files, so Prefect's
    result cache is not used."""

    @task(name=name, cache_policy=NO_CACHE)
    def run_stage(iter_dir: str) -> str:
        if reports_progress:
            return stage(iter_dir, progress_reporter(f"{name}: {iter_dir}"))
        return stage(iter_dir)

    return run_stage


sample_task = stage_task("sample", stages.sample)
judge_task = stage_task("judge", stages.judge)
select_pairs_task = stage_task("select-pairs", stages.select, reports_progress=False)
train_task = stage_task("train", stages.train)
evaluate_task = stage_task("evaluate", stages.evaluate)
finalize_task = stage_task("finalize", stages.finalize, reports_progress=False)


@flow(name="nash-iteration")
def iteration_flow(iter_dir: str) -> str:
    log = get_run_logger()
    path = sample_task(iter_dir)
    log.info("samples: %s", path)
    judge_task(iter_dir)
    pairs = select_pairs_task(iter_dir)
    log.info("pairs: %s", pairs)
    train_task(iter_dir)
    evaluate_task(iter_dir)
    manifest_path = finalize_task(iter_dir)
    manifest = json.loads(Path(manifest_path).read_text())
    row = iteration_row(manifest)
    run_name = Path(iter_dir).parent.name
    create_table_artifact(
        [row],
        key=artifact_key("nash", run_name, Path(iter_dir).name),
        description=f"{iter_dir}: pairs kept, training health (loss, reward accuracy, KL to π_t), "
        "win rate and LC win rate against the reference outputs, drift, promotion",
    )
    metrics = json.loads((Path(iter_dir) / "metrics.json").read_text())
    create_table_artifact(metrics["table"], key=artifact_key("nash", run_name, "eval"),
                          description=f"{run_name}: evaluation of every iteration so far")
    it = IterationDir.from_path(iter_dir)
    create_markdown_artifact(report.samples_markdown(evaluation.answers_side_by_side(it), f"{run_name} {it.path.name}: "
                                                     "answers side by side"),
                             key=artifact_key("nash", run_name, Path(iter_dir).name, "samples"),
                             description=f"{iter_dir}: held-out answers of π_0, the previous and this iteration")
    for warning in metrics["warnings"]:
        log.warning(warning)
    log.info("iteration %s complete: win rate %s vs %s, LC win rate %s, KL to π_0 %s, promoted %s",
             row["iteration"], row["win rate"], row["vs"], row["LC win rate"], row["KL to π_0"], row["promoted"])
    return manifest_path

"""The iteration flow: one Prefect task per stage, each taking and returning a path; a stage mapped to a
work pool (stages.<stage>) runs there as child flow runs instead (nash/flows/stage.py)."""

from __future__ import annotations

import json
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from nash import evaluation, report
from nash import iteration as stages
from nash.flows.stage import artifact_key, progress_reporter, run_stage
from nash.registry import IterationDir
from nash.report import iteration_row


def stage_task(name: str, stage, reports_progress: bool = True):
    """A Prefect task around one stage. Stages resume from their own files, so Prefect's
    result cache is not used."""

    @task(name=name, cache_policy=NO_CACHE)
    def stage_run(iter_dir: str) -> str:
        if reports_progress:
            return stage(iter_dir, progress_reporter(f"{name}: {iter_dir}"))
        return stage(iter_dir)

    return stage_run


sample_task = stage_task("sample", stages.sample)
judge_task = stage_task("judge", stages.judge)
select_pairs_task = stage_task("select-pairs", stages.select, reports_progress=False)
train_task = stage_task("train", stages.train)
evaluate_task = stage_task("evaluate", stages.evaluate)
finalize_task = stage_task("finalize", stages.finalize, reports_progress=False)


@flow(name="nash-iteration")
def iteration_flow(iter_dir: str) -> str:
    log = get_run_logger()
    path = run_stage("sample", sample_task, iter_dir)
    log.info("samples: %s", path)
    run_stage("judge", judge_task, iter_dir)
    pairs = select_pairs_task(iter_dir)
    log.info("pairs: %s", pairs)
    run_stage("train", train_task, iter_dir)
    run_stage("evaluate", evaluate_task, iter_dir)
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
    log.info("iteration %s complete: win rate %s vs %s, LC win rate %s, KL to π_0 %s; %s",
             row["iteration"], row["win rate"], row["vs"], row["LC win rate"], row["KL to π_0"],
             metrics["promotion"].get("reason", f"promoted {row['promoted']}"))
    return manifest_path

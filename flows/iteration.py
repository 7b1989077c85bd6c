"""The iteration flow: one Prefect task per stage, each taking and returning a path."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_progress_artifact, create_table_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE

from nash import iteration as stages


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


# Stages resume from their own files, so Prefect's result cache is not used.
@task(name="sample", cache_policy=NO_CACHE)
def sample_task(iter_dir: str) -> str:
    return stages.sample(iter_dir, progress_reporter(f"sampling {iter_dir}"))


@task(name="judge", cache_policy=NO_CACHE)
def judge_task(iter_dir: str) -> str:
    return stages.judge(iter_dir, progress_reporter(f"judging {iter_dir}"))


@task(name="select-pairs", cache_policy=NO_CACHE)
def select_pairs_task(iter_dir: str) -> str:
    return stages.select(iter_dir)


@task(name="train", cache_policy=NO_CACHE)
def train_task(iter_dir: str) -> str:
    return stages.train(iter_dir, progress_reporter(f"training {iter_dir}"))


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate_task(iter_dir: str) -> str:
    return stages.evaluate(iter_dir, progress_reporter(f"evaluating {iter_dir}"))


@task(name="finalize", cache_policy=NO_CACHE)
def finalize_task(iter_dir: str) -> str:
    return stages.finalize(iter_dir)


def iteration_row(manifest: dict) -> dict:
    """One row of the per-iteration table (Prefect artifact and `nash status`)."""
    m, p = manifest.get("metrics", {}), manifest.get("pairs", {})
    fmt = lambda x: "-" if x is None else f"{x:.3f}"
    return {
        "iteration": manifest.get("iteration"),
        "status": manifest.get("status", "missing"),
        "prompts": p.get("prompts", "-"),
        "candidates": manifest.get("stages", {}).get("sample", {}).get("candidates", "-"),
        "pairs kept": p.get("pairs", "-"),
        "prompts dropped": p.get("prompts_dropped", "-"),
        "pass rate": fmt(m.get("pass_rate")),
        "pass rate π_0": fmt(m.get("initial_pass_rate")),
        "win rate vs π_0": fmt(m.get("win_rate_vs_initial")),
        "seconds": round(sum(manifest.get("timings", {}).values())),
    }


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
    create_table_artifact(
        [row],
        key=artifact_key("nash", Path(iter_dir).parent.name, Path(iter_dir).name),
        description=f"{iter_dir}: candidates, pairs kept, held-out pass rate and win rate vs π_0",
    )
    log.info("iteration %s complete: pass rate %s (π_0 %s), win rate vs π_0 %s",
             row["iteration"], row["pass rate"], row["pass rate π_0"], row["win rate vs π_0"])
    return manifest_path

"""The training subprocess: `python -m nash.train_worker ITER_DIR` (or under `accelerate launch`).

Reads the run config, the iteration's pairs and parent policy, trains, saves π_{t+1} to
ITER_DIR/policy, measures KL(π_{t+1} || π_t) on training prompts, and writes the metrics
to ITER_DIR/train.json. Progress goes to stdout as `nash-train-progress DONE TOTAL` lines.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable

from nash.drift import token_kl
from nash.lifeline import die_with_parent
from nash.policy import resolve_policy
from nash.records import Pair, Sample, iter_jsonl, read_jsonl, write_json
from nash.registry import IterationDir
from nash.supervisor import PROGRESS_TAG
from nash.tracking import finish_trainer_run, report_to, trainer_args
from nash.training import train_policy


def _is_main() -> bool:
    return os.environ.get("RANK", "0") == "0"


def kl_sample(samples: Iterable[Sample], n_prompts: int) -> tuple[list[str], list[str]]:
    """The first policy-written candidate of each of the first `n_prompts` prompts; reads no further
    (samples.jsonl may hold 600k candidates)."""
    seen: dict[str, Sample] = {}
    for s in samples:
        if len(seen) >= n_prompts:
            break
        if s.policy != "reference" and s.prompt_id not in seen:
            seen[s.prompt_id] = s
    return [s.prompt for s in seen.values()], [s.response for s in seen.values()]


def main(argv: list[str]) -> int:
    it = IterationDir.from_path(argv[0])
    cfg = it.run.config()
    parent = it.manifest()["parent_policy"]["path"]
    initial = resolve_policy(cfg.policy.model) if cfg.train.reference == "initial" else None
    precision = it.precision()

    def progress(done, total):
        if _is_main():
            print(f"{PROGRESS_TAG} {done} {total}", flush=True)

    metrics = train_policy(parent, read_jsonl(it.pairs, Pair), it.policy, cfg.train, cfg.pairs.length_guard,
                           precision, seed=cfg.run.seed * 1000 + it.index, initial_path=initial,
                           progress=progress, report_to=report_to(cfg), tracker_args=trainer_args(it))
    if not _is_main():
        return 0
    if cfg.train.kl_prompts:
        prompts, responses = kl_sample(iter_jsonl(it.samples, Sample), cfg.train.kl_prompts)
        kl = token_kl(str(it.policy), parent, prompts, responses, precision.drift_dtype,
                      max_length=cfg.train.max_length)
        metrics["kl_from_parent"] = kl["kl"]
        metrics["kl_tokens"] = kl["tokens"]
    metrics["worker_pid"] = os.getpid()
    write_json(it.path / "train.json", metrics)
    finish_trainer_run(cfg)
    return 0


if __name__ == "__main__":
    die_with_parent()  # under `accelerate launch` the parent is the launcher, itself tied to the stage
    os.register_at_fork(after_in_child=die_with_parent)  # dataloader workers
    sys.exit(main(sys.argv[1:]))

"""The distillation subprocess: `python -m nash.distill_worker VERSION_DIR`.

Trains a one-output classification head and its backbone with TRL's RewardTrainer
(Bradley-Terry loss) on VERSION_DIR/pairs.jsonl, saves the model to VERSION_DIR/model, then
scores every held-out candidate through the `reward_model` judge (as the cascade will) into
student_scores.jsonl, and writes the training figures to train.json. Progress goes to stdout
as `nash-train-progress DONE TOTAL` lines.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

from nash.lifeline import die_with_parent
from nash.records import Prompt, read_lines, write_json
from nash.supervisor import PROGRESS_TAG


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for _, line in read_lines(path) if line.strip()]


def train(out: Path, spec: dict) -> dict:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import RewardConfig, RewardTrainer

    from nash.models import load_tokenizer
    from nash.precision import resolve

    d = spec["distill"]
    precision = resolve(d["precision"])
    rows = [{"prompt": [{"role": "user", "content": r["prompt"]}],
             "chosen": [{"role": "assistant", "content": r["chosen"]}],
             "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in _rows(out / "pairs.jsonl")]
    tokenizer = load_tokenizer(spec["backbone"])
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token

    class _Report(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            print(f"{PROGRESS_TAG} {state.global_step} {state.max_steps}", flush=True)

    work = out / "trainer"
    args = RewardConfig(
        output_dir=str(work), learning_rate=d["learning_rate"], num_train_epochs=d["epochs"],
        per_device_train_batch_size=d["batch_size"], max_length=d["max_length"],
        center_rewards_coefficient=d["center_rewards"], gradient_checkpointing=False, logging_steps=1,
        save_strategy="no", report_to="none", disable_tqdm=True, seed=spec["seed"], warmup_steps=0.1,
        lr_scheduler_type="linear", model_init_kwargs={"dtype": precision.weights}, **precision.trainer_args(),
    )
    trainer = RewardTrainer(model=spec["backbone"], args=args, train_dataset=Dataset.from_list(rows),
                            processing_class=tokenizer, callbacks=[_Report()])
    used = len(trainer.train_dataset)
    result = trainer.train()
    model = trainer.accelerator.unwrap_model(trainer.model)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out / "model")
    tokenizer.save_pretrained(out / "model")
    shutil.rmtree(work, ignore_errors=True)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    return {"pairs": len(rows), "pairs_used": used, "left_out_too_long": len(rows) - used,
            "steps": trainer.state.global_step, "train_loss": result.training_loss,
            "first_step_loss": logs[0]["loss"] if logs else None, "last_step_loss": logs[-1]["loss"] if logs else None,
            "train_accuracy_last": logs[-1].get("accuracy") if logs else None,
            "train_seconds": result.metrics.get("train_runtime"), "precision": precision.compute}


def score_heldout(out: Path, spec: dict) -> None:
    from nash.config import RewardModelJudge as Section
    from nash.judges.reward_model import RewardModelJudge

    d = spec["distill"]
    judge = RewardModelJudge(Section(kind="reward_model", model=str(out / "model"), precision=d["precision"],
                                     batch_size=max(d["batch_size"], 8), max_length=d["max_length"]))
    groups = _rows(out / "heldout.jsonl")
    with open(out / "student_scores.jsonl", "w", encoding="utf-8") as f:
        for start in range(0, len(groups), 16):
            chunk = groups[start : start + 16]
            items = [(Prompt(id=g["prompt_id"], text=g["prompt"]), [c["response"] for c in g["candidates"]])
                     for g in chunk]
            for g, judgments in zip(chunk, judge.score_batch(items)):
                for c, j in zip(g["candidates"], judgments):
                    f.write(json.dumps({"prompt_id": g["prompt_id"], "candidate": c["candidate"],
                                        "score": j.score}) + "\n")


def main(argv: list[str]) -> int:
    out = Path(argv[0])
    spec = json.loads((out / "spec.json").read_text(encoding="utf-8"))
    metrics = train(out, spec)
    score_heldout(out, spec)
    metrics["worker_pid"] = os.getpid()
    write_json(out / "train.json", metrics)
    return 0


if __name__ == "__main__":
    die_with_parent()
    sys.exit(main(sys.argv[1:]))

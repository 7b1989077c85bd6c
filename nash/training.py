"""The contrastive update: TRL's DPOTrainer, KTOTrainer or CPOTrainer on the iteration's pairs.

The policy being trained starts as π_t. The reference is π_t (`train.reference: previous`)
or π_0 (`initial`); either way its log-probabilities are computed once before the first
step (TRL's `precompute_ref_log_probs`), reused by every epoch, and the reference model
is freed before training starts. CPO has no reference.

`train_policy` runs in a subprocess (nash/train_worker.py) started by `train_in_subprocess`,
so the trainer's memory goes back to the system before the next stage, and the same worker
runs under `accelerate launch` on several GPUs.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

from tqdm.auto import tqdm

from nash.config import PAIRED_LOSSES
from nash.lm_head import cpu_scored_heads
from nash.models import load_causal_lm, load_tokenizer
from nash.precision import Precision, resolve
from nash.records import Pair, fsync_dir
from nash.supervisor import Child, Progress


def pairs_to_dataset(pairs: list[Pair], loss: str = "dpo"):
    """Conversational rows: paired for DPO-family and CPO, unpaired halves (label True/False) for KTO."""
    from datasets import Dataset

    def user(p):
        return [{"role": "user", "content": p.prompt}]

    def reply(text):
        return [{"role": "assistant", "content": text}]

    if loss == "kto":
        rows = [row for p in pairs for row in (
            {"prompt": user(p), "completion": reply(p.chosen), "label": True},
            {"prompt": user(p), "completion": reply(p.rejected), "label": False},
        )]
    else:
        rows = [{"prompt": user(p), "chosen": reply(p.chosen), "rejected": reply(p.rejected)} for p in pairs]
    return Dataset.from_list(rows)


def build_trainer(policy_path: str, pairs: list[Pair], work_dir: Path, train_cfg, length_guard=None,
                  precision: Precision | None = None, seed: int = 0, initial_path: str | None = None, callbacks=()):
    """The TRL trainer for `train.loss`, configured from the train section.

    The weights load in `precision.weights` and TRL's bf16/fp16 arguments put the forward and
    backward passes (and the reference log-probabilities) under autocast in `precision.compute`.
    """
    cfg = train_cfg
    precision = precision or resolve("fp32")
    tokenizer = load_tokenizer(policy_path)
    model = load_causal_lm(policy_path, precision.weights)
    common = dict(
        output_dir=str(work_dir),
        beta=cfg.beta,
        learning_rate=cfg.learning_rate,
        num_train_epochs=cfg.epochs,
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        max_length=cfg.max_length,
        warmup_steps=cfg.warmup_ratio,  # below 1: a share of the steps
        lr_scheduler_type="linear",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=seed,
        gradient_checkpointing=cfg.gradient_checkpointing,
        **precision.trainer_args(),
    )
    peft_config = None
    if cfg.lora is not None:
        from peft import LoraConfig

        peft_config = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                                 target_modules=cfg.lora.target_modules, task_type="CAUSAL_LM")
    ref_model = None
    if cfg.reference == "initial" and initial_path and cfg.loss != "cpo":
        ref_model = load_causal_lm(initial_path, precision.weights)
    dataset = pairs_to_dataset(pairs, cfg.loss)
    kwargs = dict(model=model, train_dataset=dataset, processing_class=tokenizer,
                  callbacks=list(callbacks), peft_config=peft_config)
    if cfg.loss in PAIRED_LOSSES:
        from trl import DPOConfig, DPOTrainer

        downweight = length_guard is not None and length_guard.action == "downweight"
        # RPO: TRL's `sft` term is the mean NLL of the chosen tokens, weighted against the preference loss.
        losses, weights = [PAIRED_LOSSES[cfg.loss]], None
        if cfg.nll_alpha:
            losses, weights = losses + ["sft"], [1.0, cfg.nll_alpha]
        args = DPOConfig(**common, loss_type=losses, loss_weights=weights, label_smoothing=cfg.label_smoothing,
                         ld_alpha=length_guard.alpha if downweight else None, precompute_ref_log_probs=True)
        with cpu_scored_heads():
            return DPOTrainer(ref_model=ref_model, args=args, **kwargs)
    if cfg.loss == "kto":
        from trl import KTOConfig, KTOTrainer

        args = KTOConfig(**common, precompute_ref_log_probs=True)
        with cpu_scored_heads():
            return KTOTrainer(ref_model=ref_model, args=args, **kwargs)
    if cfg.loss == "cpo":
        from trl.experimental.cpo import CPOConfig, CPOTrainer

        args = CPOConfig(**common, loss_type="sigmoid", cpo_alpha=cfg.cpo_alpha)
        return CPOTrainer(args=args, **kwargs)
    raise ValueError(f"train.loss: unknown loss {cfg.loss!r}")


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def train_policy(policy_path: str, pairs: list[Pair], out_dir: Path, train_cfg, length_guard=None,
                 precision: Precision | None = None, seed: int = 0, initial_path: str | None = None,
                 progress: Progress | None = None) -> dict:
    """Train π_t on `pairs`, save π_{t+1} to `out_dir` (HF format, LoRA merged), return training metrics."""
    from transformers import TrainerCallback

    class _Report(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if progress:
                progress(state.global_step, state.max_steps)

    work = out_dir.with_name(out_dir.name + ".trainer")
    precision = precision or resolve("fp32")
    trainer = build_trainer(policy_path, pairs, work, train_cfg, length_guard, precision, seed, initial_path,
                            [_Report()])
    result = trainer.train()
    model = trainer.accelerator.unwrap_model(trainer.model)
    if train_cfg.lora is not None:
        model = model.merge_and_unload()  # the next sampler loads a plain model
    if trainer.accelerator.is_main_process:
        tmp = out_dir.with_name(out_dir.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        trainer.processing_class.save_pretrained(tmp)
        for f in tmp.iterdir():
            with open(f, "rb+") as fh:
                os.fsync(fh.fileno())
        shutil.rmtree(out_dir, ignore_errors=True)
        tmp.rename(out_dir)  # the policy directory is complete or absent
        fsync_dir(out_dir.parent)
        shutil.rmtree(work, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()

    logs = [h for h in trainer.state.log_history if "loss" in h]
    first, last = (logs[0], logs[-1]) if logs else ({}, {})
    return {
        "loss_function": train_cfg.loss,
        "reference": "none" if train_cfg.loss == "cpo" else train_cfg.reference,
        "steps": trainer.state.global_step,
        "pairs": len(pairs),
        "train_loss": result.training_loss,
        "first_step_loss": first.get("loss"),
        "last_step_loss": last.get("loss"),
        "reward_margin": last.get("rewards/margins"),
        "reward_accuracy": last.get("rewards/accuracies"),
        "reward_margin_mean": _mean([h.get("rewards/margins") for h in logs]),
        "reward_accuracy_mean": _mean([h.get("rewards/accuracies") for h in logs]),
        "precision": precision.compute,
        "weights_dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "train_seconds": result.metrics.get("train_runtime"),
        "pairs_per_second": round(len(pairs) * train_cfg.epochs / result.metrics["train_runtime"], 3)
        if result.metrics.get("train_runtime") else None,
    }


def worker_command(iter_dir: str | Path, train_cfg) -> list[str]:
    # nash.lifeline ties the launcher to this process; the workers tie themselves to the launcher.
    lifeline = [sys.executable, "-m", "nash.lifeline"]
    if train_cfg.launcher == "accelerate":
        return lifeline + [sys.executable, "-m", "accelerate.commands.launch", "--num_processes",
                           str(train_cfg.num_processes), "-m", "nash.train_worker", str(iter_dir)]
    return lifeline + [sys.executable, "-m", "nash.train_worker", str(iter_dir)]


def train_in_subprocess(iter_dir: Path, train_cfg, progress: Progress | None = None) -> dict:
    """Run nash/train_worker.py on the iteration; stream its progress; return what it wrote to train.json.

    The worker's output goes to train.log in the iteration directory; a failure raises
    with the log's last lines. The worker's process group is killed on any way out.
    """
    log_path, result_path = iter_dir / "train.log", iter_dir / "train.json"
    result_path.unlink(missing_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1"}
    bar = tqdm(desc="training", unit="step", leave=False)

    def on_progress(done: int, total: int) -> None:
        bar.total, bar.n = total, done
        bar.refresh()
        if progress:
            progress(done, total)

    with Child(worker_command(iter_dir, train_cfg), log_path, env, on_progress, tail=20) as worker:
        rc = worker.follow()
        tail = list(worker.tail)
    bar.close()
    if rc != 0 or not result_path.is_file():
        raise RuntimeError(f"training subprocess exited with status {rc}; see {log_path}:\n  " + "\n  ".join(tail))
    return json.loads(result_path.read_text(encoding="utf-8"))

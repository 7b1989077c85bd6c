"""The contrastive update: TRL's DPOTrainer on this iteration's pairs, reference = π_t.

The policy being trained starts as π_t, and the reference log-probabilities are
computed from it once before the first step (TRL's `precompute_ref_log_probs`), so the
reference is exactly the policy that sampled the candidates and no second copy of the
model is kept in memory during training.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from nash.records import Pair
from nash.sampling import Progress


def pairs_to_dataset(pairs: list[Pair]):
    from datasets import Dataset

    return Dataset.from_list(
        [
            {
                "prompt": [{"role": "user", "content": p.prompt}],
                "chosen": [{"role": "assistant", "content": p.chosen}],
                "rejected": [{"role": "assistant", "content": p.rejected}],
            }
            for p in pairs
        ]
    )


def train_dpo(
    policy_path: str,
    pairs: list[Pair],
    out_dir: Path,
    train_cfg,
    dtype: str = "float32",
    seed: int = 0,
    progress: Progress | None = None,
) -> dict:
    """Train π_t on `pairs`, save π_{t+1} to `out_dir` (HF format), return training metrics."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    work = out_dir.with_name(out_dir.name + ".trainer")
    tokenizer = AutoTokenizer.from_pretrained(policy_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(policy_path, dtype=getattr(torch, dtype))
    args = DPOConfig(
        output_dir=str(work),
        loss_type=["sigmoid"],
        beta=train_cfg.beta,
        learning_rate=train_cfg.learning_rate,
        num_train_epochs=train_cfg.epochs,
        per_device_train_batch_size=train_cfg.batch_size,
        gradient_accumulation_steps=train_cfg.gradient_accumulation_steps,
        max_length=train_cfg.max_length,
        warmup_steps=train_cfg.warmup_ratio,
        lr_scheduler_type="linear",
        precompute_ref_log_probs=True,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=seed,
        bf16=dtype == "bfloat16" and torch.cuda.is_available(),
    )

    class _Report(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if progress:
                progress(state.global_step, state.max_steps)

    trainer = DPOTrainer(
        model=model,
        args=args,
        train_dataset=pairs_to_dataset(pairs),
        processing_class=tokenizer,
        callbacks=[_Report()],
    )
    result = trainer.train()
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    trainer.model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    shutil.rmtree(work, ignore_errors=True)

    logs = [h for h in trainer.state.log_history if "loss" in h]
    first, last = (logs[0], logs[-1]) if logs else ({}, {})
    return {
        "steps": trainer.state.global_step,
        "pairs": len(pairs),
        "train_loss": result.training_loss,
        "first_step_loss": first.get("loss"),
        "last_step_loss": last.get("loss"),
        "reward_margin": last.get("rewards/margins"),
        "reward_accuracy": last.get("rewards/accuracies"),
        "train_seconds": result.metrics.get("train_runtime"),
    }

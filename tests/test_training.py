import math

import torch
from transformers import AutoModelForCausalLM

from nash.config import TrainSection
from nash.records import Pair
from nash.training import train_dpo


def pairs(n=4):
    return [
        Pair(prompt_id=str(i), prompt=f"Write about item {i} in lowercase.", chosen=f"item {i} is nice.",
             rejected=f"ITEM {i} IS NICE, REALLY.", chosen_candidate=0, rejected_candidate=1,
             chosen_score=1.0, rejected_score=0.0, margin=1.0)
        for i in range(n)
    ]


def test_dpo_update_changes_weights_and_starts_at_log2(tiny_model_dir, tmp_path):
    cfg = TrainSection(learning_rate=1e-2, epochs=2, batch_size=2, max_length=64, warmup_ratio=0.0)
    out = tmp_path / "policy"
    seen = []
    metrics = train_dpo(tiny_model_dir, pairs(), out, cfg, progress=lambda d, t: seen.append((d, t)))
    assert metrics["steps"] == 4 and seen[-1] == (4, 4)
    # The reference is the starting policy, so the first loss is -log σ(0) = log 2.
    assert math.isclose(metrics["first_step_loss"], math.log(2), rel_tol=1e-3)
    assert metrics["last_step_loss"] < metrics["first_step_loss"]
    before = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    after = AutoModelForCausalLM.from_pretrained(out).state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed, "training left every parameter unchanged"
    assert (out / "tokenizer_config.json").is_file() and not (tmp_path / "policy.trainer").exists()

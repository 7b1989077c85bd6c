"""A plain TRL DPO script: the baseline that benchmarks/train_throughput.py compares nash with.

    python benchmarks/plain_trl_dpo.py POLICY_DIR PAIRS_JSONL OUT_DIR --beta 0.1 --lr 5e-5 ...

What a user would write from TRL's documentation: DPOTrainer with its defaults (a reference
copy of the model, reference log-probs recomputed at every step), the same data and settings.
Prints one JSON line with its timings.
"""

import argparse
import json
import time

start = time.time()

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402
from trl import DPOConfig, DPOTrainer  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("policy")
ap.add_argument("pairs")
ap.add_argument("out")
ap.add_argument("--beta", type=float, default=0.1)
ap.add_argument("--lr", type=float, default=5e-5)
ap.add_argument("--epochs", type=float, default=2)
ap.add_argument("--batch-size", type=int, default=8)
ap.add_argument("--max-length", type=int, default=256)
ap.add_argument("--warmup", type=float, default=0.1)
ap.add_argument("--seed", type=int, default=0)
args = ap.parse_args()

rows = [json.loads(line) for line in open(args.pairs)]
data = Dataset.from_list([
    {"prompt": [{"role": "user", "content": r["prompt"]}],
     "chosen": [{"role": "assistant", "content": r["chosen"]}],
     "rejected": [{"role": "assistant", "content": r["rejected"]}]}
    for r in rows
])
tok = AutoTokenizer.from_pretrained(args.policy)
model = AutoModelForCausalLM.from_pretrained(args.policy, dtype=torch.float32)
config = DPOConfig(output_dir=args.out + ".trainer", beta=args.beta, learning_rate=args.lr,
                   num_train_epochs=args.epochs, per_device_train_batch_size=args.batch_size,
                   max_length=args.max_length, warmup_steps=args.warmup, lr_scheduler_type="linear",
                   logging_steps=1, save_strategy="no", report_to="none", seed=args.seed, disable_tqdm=True,
                   bf16=torch.cuda.is_available())  # as TRL's docs run it: bf16 on a GPU, float32 on a CPU
trainer = DPOTrainer(model=model, args=config, train_dataset=data, processing_class=tok)
result = trainer.train()
trainer.save_model(args.out)
print(json.dumps({"pairs": len(rows), "steps": trainer.state.global_step,
                  "train_seconds": result.metrics["train_runtime"], "wall_seconds": time.time() - start,
                  "first_step_loss": next(h["loss"] for h in trainer.state.log_history if "loss" in h)}))

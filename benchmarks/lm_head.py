"""One DPO batch's forward and backward through TRL's fused LM head and through nash's CPU head.

    python benchmarks/lm_head.py [--repeats 5]

SmolLM2-135M (the embedded default), float32 weights under bf16 autocast as the train stage
runs them here, 16 sequences of 160 tokens: half of each is prompt (label -100) and half the
rows end in 20 tokens of padding, as a DPO batch of 8 pairs does. The two heads alternate in
one process, `--repeats` times each; the minimum and the median are reported with the steal
share of each timing. Writes results/lm_head.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402
from trl.trainer.utils import add_fused_lm_head  # noqa: E402

from benchmarks.machine import Interval, describe  # noqa: E402
from nash.lm_head import cpu_scored_lm_head  # noqa: E402
from nash.policy import resolve_policy  # noqa: E402

OUTPUTS = ("log_probs", "entropy", "mean_logits", "is_top1")  # what DPOTrainer asks for
HEADS = {"trl fused head (torch fallback)": add_fused_lm_head, "nash cpu head": cpu_scored_lm_head}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "lm_head.json"))
    args = ap.parse_args()
    path = resolve_policy("embedded:smollm2-135m-instruct")
    torch.manual_seed(0)
    ids = torch.randint(0, 49000, (16, 160))
    labels = ids.clone()
    labels[:, :80] = -100
    labels[8:, 140:] = -100
    models = {}
    for name, patch in HEADS.items():
        models[name] = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        patch(models[name], outputs=OUTPUTS)
    times, sums = {n: [] for n in HEADS}, {}
    for _ in range(args.repeats):
        for name, model in models.items():
            model.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16), Interval() as t:
                out = model(input_ids=ids, labels=labels, fused_lm_head=True)
                out.log_probs.sum().backward()
            times[name].append({"seconds": round(t.wall, 2), "steal_share": t.steal and round(t.steal, 3)})
            sums[name] = float(out.log_probs.detach().sum())
            print(f"{name}: {t.wall:.2f} s (steal {100 * (t.steal or 0):.0f}%)", flush=True)
    result = {"machine": describe(), "batch": "16 x 160 tokens, 1,160 labelled positions",
              "log_prob_sum": sums, "timings": times,
              "min_seconds": {n: min(x["seconds"] for x in v) for n, v in times.items()},
              "median_seconds": {n: statistics.median(x["seconds"] for x in v) for n, v in times.items()}}
    trl_name, nash_name = HEADS
    result["speedup_min"] = round(result["min_seconds"][trl_name] / result["min_seconds"][nash_name], 2)
    result["speedup_median"] = round(result["median_seconds"][trl_name] / result["median_seconds"][nash_name], 2)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("min_seconds", "median_seconds", "speedup_min", "speedup_median")}))


if __name__ == "__main__":
    main()

"""Generation speed and KL in float32, float32 under bf16 autocast, and bf16 weights.

    python benchmarks/precision_probe.py RUN_DIR [--iteration 2]

Uses a finished run of the embedded default: the policy of iteration N and π_0. For each
mode, times `generate` (16 held-out prompts x 4 samples, 64 new tokens) and the teacher-forced
KL(π_N || π_0) on 32 of π_N's held-out answers, each mode in this one process after a warm-up.
Writes results/precision_probe.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from benchmarks.machine import Interval, describe  # noqa: E402
from nash.drift import _encode, _pad  # noqa: E402
from nash.policy import resolve_policy  # noqa: E402
from nash.records import Sample, read_jsonl  # noqa: E402
from nash.registry import IterationDir, RunDir  # noqa: E402

MODES = {"float32": (torch.float32, False), "float32 + bf16 autocast": (torch.float32, True),
         "bf16 weights": (torch.bfloat16, False)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir")
    ap.add_argument("--iteration", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "precision_probe.json"))
    args = ap.parse_args()
    run = RunDir(args.run_dir)
    it = IterationDir(run, args.iteration)
    p0 = resolve_policy(run.config().policy.model)
    tok = AutoTokenizer.from_pretrained(p0, padding_side="left")
    answers = read_jsonl(it.eval_dir / "samples.jsonl", Sample)[:32]
    rows = _encode(tok, [a.prompt for a in answers], [a.response for a in answers], 256)
    chats = [tok.apply_chat_template([{"role": "user", "content": a.prompt}], add_generation_prompt=True,
                                     tokenize=False) for a in answers[:16]]
    enc = tok(chats, return_tensors="pt", padding=True, add_special_tokens=False)
    out = {}
    for name, (dtype, autocast) in MODES.items():
        p = AutoModelForCausalLM.from_pretrained(str(it.policy), dtype=dtype).eval()
        q = AutoModelForCausalLM.from_pretrained(p0, dtype=dtype).eval()
        ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if autocast else contextlib.nullcontext
        with torch.inference_mode(), ctx():
            p.generate(**enc, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)  # warm-up
            with Interval() as gen:
                torch.manual_seed(0)
                p.generate(**enc, max_new_tokens=64, min_new_tokens=64, do_sample=True, num_return_sequences=4,
                           top_k=None, pad_token_id=tok.pad_token_id)
            total = tokens = 0.0
            with Interval() as kl_span:
                for s in range(0, len(rows), 4):
                    b = rows[s:s + 4]
                    ids, attn = _pad([i for i, _ in b], tok.pad_token_id, "cpu")
                    resp, _ = _pad([m for _, m in b], 0, "cpu")
                    lp = torch.log_softmax(p(input_ids=ids, attention_mask=attn).logits[:, :-1].float(), -1)
                    lq = torch.log_softmax(q(input_ids=ids, attention_mask=attn).logits[:, :-1].float(), -1)
                    mask = resp[:, 1:].float()
                    total += float(((lp.exp() * (lp - lq)).sum(-1) * mask).sum())
                    tokens += float(mask.sum())
        out[name] = {"generate_64x64_seconds": round(gen.wall, 1), "generate_steal": gen.steal and round(gen.steal, 3),
                     "kl": round(total / tokens, 5), "kl_seconds": round(kl_span.wall, 1)}
        print(name, out[name], flush=True)
    res = {"machine": describe(), "policy": f"{run.name} iter_{args.iteration:03d}", "modes": out}
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()

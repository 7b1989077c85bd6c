"""Requests, tokens and cache hits per kept pair: batched (DNO) vs pairwise vs pointwise.

    python benchmarks/judge_protocols.py [--samples runs/demo/iter_001/samples.jsonl]

All three protocols judge the same candidates through the `openai` judge and the real
OpenAI client, against a loopback OpenAI-compatible server whose verdicts follow one hidden
quality per candidate (1..6), so every protocol sees the same preferences. Token counts are
the SmolLM2 tokenizer's on the exact request and reply texts (a stand-in for the served
model's). Each protocol runs twice on one cache: the second run shows what a re-run pays.
Kept pairs: batched and pointwise through the DNO rule (all qualifying pairs, chosen >= 5
and margin >= 2 on 1..6; >= 4 and >= 2 on 0..5); pairwise: every comparison whose two
orders agree.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nash.config import load_config  # noqa: E402
from nash.judges import build_judge  # noqa: E402
from nash.judging import judge_samples, outcome_counts  # noqa: E402
from nash.pairs import select_pairs  # noqa: E402
from nash.policy import EMBEDDED, resolve_policy  # noqa: E402
from nash.prompts import builtin_prompts  # noqa: E402
from nash.records import Prompt, Sample, read_jsonl  # noqa: E402
from tests.openai_server import OpenAIServer  # noqa: E402


def quality(text: str) -> int:
    return 1 + int(hashlib.sha256(text.strip().encode()).hexdigest(), 16) % 6


def responder(prompt: str) -> str:
    if "<id>_score" in prompt:
        body = prompt.split("[Candidates]\n", 1)[1].split("\n\nReply with a single JSON", 1)[0]
        parts = re.split(r"\[Candidate ([A-Z])\]\n", body)[1:]
        return json.dumps({f"{cid}_score": quality(text) for cid, text in zip(parts[::2], parts[1::2])})
    if "Better:" in prompt:
        a = prompt.split("[Output (a)]\n", 1)[1].split("\n\n[Output (b)]", 1)[0]
        b = prompt.split("[Output (b)]\n", 1)[1].split("\n\nWhich output is better?", 1)[0]
        qa, qb = quality(a), quality(b)
        return "Better: " + ("a" if qa > qb else "b" if qb > qa else "tie")
    response = prompt.split("<response>", 1)[1].split("</response>", 1)[0]
    return f"Score: {quality(response) - 1}"


def kept_pairs(protocol: str, samples, judgments) -> int:
    if protocol == "pairwise":
        return sum(c["won"] is True for j in judgments for c in j.details.get("comparisons", []))
    chosen, margin = (5, 2) if protocol == "batched" else (4, 2)
    return len(select_pairs(samples, judgments, chosen, margin, "all")[0])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", help="samples.jsonl to judge (default: fresh samples of the embedded default)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "judge_protocols.json"))
    args = ap.parse_args()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_policy(EMBEDDED))
    count = lambda text: len(tok(text, add_special_tokens=False)["input_ids"])  # noqa: E731

    prompts = {p.id: p for p in builtin_prompts(0)}
    if args.samples:
        samples = read_jsonl(args.samples, Sample)
    else:
        from nash.sampling import SamplingParams
        from nash.sampling.hf import TransformersSampler

        chosen = [p for p in prompts.values() if p.split == "train"][:32]
        outs = TransformersSampler(resolve_policy(EMBEDDED)).generate([p.text for p in chosen], SamplingParams(n=4))
        samples = [Sample(prompt_id=p.id, candidate=k, prompt=p.text, response=c.text, num_tokens=c.num_tokens,
                          policy="iter_000") for p, cs in zip(chosen, outs) for k, c in enumerate(cs)]
    prompts = {pid: prompts.get(pid) or Prompt(id=pid, text=s.prompt) for pid, s in
               {s.prompt_id: s for s in samples}.items()}
    os.environ.setdefault("OPENAI_API_KEY", "sk-benchmark")
    result = {"prompts": len(prompts), "candidates": len(samples), "protocols": {}}
    with tempfile.TemporaryDirectory() as tmp, OpenAIServer(responder, count) as server:
        os.environ["NASH_CACHE"] = tmp
        for protocol in ("batched", "pairwise", "pointwise"):
            row = {}
            for run in ("first", "rerun"):
                cfg = load_config(None, ["judge.kind=openai", f"judge.base_url={server.url}", f"judge.protocol={protocol}",
                                         "judge.concurrency=8"])
                sent = len(server.requests)
                judgments, _ = judge_samples(build_judge(cfg.judge), prompts, samples,
                                             Path(tmp) / f"{protocol}-{run}.jsonl")
                c = outcome_counts(judgments)
                row[run] = {"requests": len(server.requests) - sent, "cache_hits": c["cached"],
                            "tokens_in": c["tokens_in"], "tokens_out": c["tokens_out"], "failed": c["failed"],
                            "cost_usd_at_gpt4_turbo_prices": c["cost_usd"],
                            "kept_pairs": kept_pairs(protocol, samples, judgments)}
            first, pairs = row["first"], max(1, row["first"]["kept_pairs"])
            row["per_kept_pair"] = {"requests": first["requests"] / pairs,
                                    "tokens": (first["tokens_in"] + first["tokens_out"]) / pairs,
                                    "usd": first["cost_usd_at_gpt4_turbo_prices"] / pairs}
            result["protocols"][protocol] = row
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")

    print(f"\n{result['prompts']} prompts, {result['candidates']} candidates\n")
    print("| protocol | requests | tokens in / out | kept pairs | requests per pair | tokens per pair | "
          "$ per pair (GPT-4-Turbo prices) | re-run: requests / cache hits |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in result["protocols"].items():
        f, p, again = r["first"], r["per_kept_pair"], r["rerun"]
        print(f"| {name} | {f['requests']} | {f['tokens_in']} / {f['tokens_out']} | {f['kept_pairs']} | "
              f"{p['requests']:.2f} | {p['tokens']:.0f} | {p['usd']:.4f} | {again['requests']} / {again['cache_hits']} |")


if __name__ == "__main__":
    main()

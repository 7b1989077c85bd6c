"""Replay GPT-4-Turbo's recorded AlpacaEval 2.0 annotations through nash's `alpaca_eval` protocol.

The alpaca_eval repository keeps, for some leaderboard models, GPT-4-Turbo's actual replies
(`raw_completion`, with the top log-probabilities of its one token) in
`results/<model>/weighted_alpaca_eval_gpt4_turbo/annotations.json`. A loopback server answers
each of nash's requests with the recorded reply to that instruction, so nash computes the
preferences, win rate and standard error that GPT-4-Turbo's replies give through nash's
request construction, order randomisation and parsing; these are compared with the recorded
preferences and with the package's published leaderboard row. A request that put the two
outputs in the other order than the recorded run would get the recorded reply with its meaning
swapped, and show as a preference far from the recorded one.

The token counts of the recorded replies (`price_per_example` at the package's $0.01 per
1,000 tokens) give what one evaluation costs.

    git clone https://github.com/tatsu-lab/alpaca_eval     # (or any copy of its results/)
    python benchmarks/alpaca_eval_replay.py --repo alpaca_eval alpaca-7b OpenHermes-2.5-Mistral-7B
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# GPT-4-Turbo (gpt-4-1106-preview) list prices, USD per million tokens.
PRICE_IN, PRICE_OUT = 10.0, 30.0


def leaderboard_row(model: str) -> dict | None:
    import pandas as pd
    from alpaca_eval import constants

    path = (Path(constants.__file__).parent / "leaderboards" / "data_AlpacaEval_2" /
            "weighted_alpaca_eval_gpt4_turbo_leaderboard.csv")
    df = pd.read_csv(path, index_col=0)
    return df.loc[model].to_dict() if model in df.index else None


def replay(records: list[dict], work: Path) -> dict:
    from nash import evaluation
    from nash.config import OpenAIJudge
    from nash.judges import build_alpaca_eval_judge
    from nash.records import Judgment, Prompt, Sample, read_jsonl
    from tests.openai_server import OpenAIServer

    by_instruction = {r["instruction"]: r for r in records}
    mismatched = []

    def recorded(user: str) -> dict | None:
        """The row whose instruction the message quotes, if both of its outputs are in the message too."""
        instruction = user.split('"instruction": """', 1)[-1].split('""",\n}', 1)[0]
        r = by_instruction.get(instruction)
        if r is None or r.get("raw_completion") is None or r["output_1"] not in user or r["output_2"] not in user:
            return None
        return r

    def next_token(user: str) -> dict[str, float]:
        r = recorded(user)
        if r is None:
            mismatched.append(user[:200])
            return {"?": 1.0}
        top = r["raw_completion"]["logprobs"]["content"][0]["top_logprobs"]
        return {t["token"]: math.exp(t["logprob"]) for t in top}

    def tokens(user: str) -> int:
        r = recorded(user)
        return round(r["price_per_example"] / 1e-5) - 1 if r else 0

    prompts = [Prompt(id=f"ref-{i:04d}", text=r["instruction"], split="eval") for i, r in enumerate(records)]
    samples = [Sample(prompt_id=p.id, candidate=0, prompt=p.text, response=r["output_2"], num_tokens=0,
                      policy=r["generator_2"]) for p, r in zip(prompts, records)]
    reference = {p.id: r["output_1"] for p, r in zip(prompts, records)}
    out = work / "judgments.jsonl"
    with OpenAIServer(count_tokens=tokens) as srv:
        srv.next_token = next_token
        cfg = OpenAIJudge(kind="openai", base_url=srv.url, cache=False, concurrency=16)
        annotator = build_alpaca_eval_judge(cfg, "weighted_alpaca_eval_gpt4_turbo")
        t0 = time.monotonic()
        result = evaluation.compare(annotator, prompts, samples, reference, out, "length_controlled_minimal")
        wall = time.monotonic() - t0
        requests = len(srv.requests)
    prefs = evaluation.preferences(read_jsonl(out, Judgment))
    diffs = [abs(prefs[p.id] - float(r["preference"])) for p, r in zip(prompts, records)
             if prefs.get(p.id) is not None]
    missing = sum(prefs.get(p.id) is None for p in prompts)
    assert len(by_instruction) == len(records), "instructions are not unique"
    return {"result": result, "requests": requests, "wall_s": wall, "max_abs_diff": max(diffs),
            "compared": len(diffs), "nash_failed": missing, "mismatched_requests": len(mismatched),
            "tokens_in": result["usage"]["tokens_in"], "tokens_out": result["usage"]["tokens_out"],
            "model_mean_chars": result["mean_chars"], "reference_mean_chars": result["reference_mean_chars"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+", help="model directories under results/")
    ap.add_argument("--repo", required=True, help="a copy of the alpaca_eval repository (its results/ is enough)")
    ap.add_argument("--out", default="benchmarks/results/alpaca_eval_replay.json")
    args = ap.parse_args()
    os.environ.setdefault("NASH_CACHE", tempfile.mkdtemp(prefix="nash-replay-"))
    rows = []
    for model in args.models:
        path = Path(args.repo) / "results" / model / "weighted_alpaca_eval_gpt4_turbo" / "annotations.json"
        records = json.loads(path.read_text())
        with tempfile.TemporaryDirectory() as work:
            r = replay(records, Path(work))
        board = leaderboard_row(model)
        res = r.pop("result")
        row = {"model": model, "instructions": len(records), **r,
               "win_rate": res["win_rate"] * 100, "standard_error": res["standard_error"] * 100,
               "lc_win_rate_minimal": res["lc_win_rate"] * 100, "n": res["n"],
               "leaderboard_win_rate": board and board["win_rate"],
               "leaderboard_standard_error": board and board["standard_error"],
               "leaderboard_lc_win_rate_v1": board and board["length_controlled_winrate"],
               "cost_usd": (r["tokens_in"] * PRICE_IN + r["tokens_out"] * PRICE_OUT) / 1e6}
        rows.append(row)
        print(f"{model}: {r['requests']} requests, {r['mismatched_requests']} not the package's prompt; "
              f"max |pref - recorded| {r['max_abs_diff']:.2e} over {r['compared']}; "
              f"win rate {row['win_rate']:.6f} ± {row['standard_error']:.6f} "
              f"(leaderboard {row['leaderboard_win_rate']:.6f} ± {row['leaderboard_standard_error']:.6f}); "
              f"{r['tokens_in'] / max(1, r['requests']):.0f} prompt tokens per request, "
              f"${row['cost_usd']:.2f} at list price")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=2, default=float) + "\n")


if __name__ == "__main__":
    main()

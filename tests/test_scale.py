"""The scale path of benchmarks/scale.py at a small size: `nash run` with sampling and batched judging on an
instant loopback server, so that the path the benchmark measures cannot silently break."""

import json

from benchmarks.scale import EVAL_PROMPTS, Counting, K, is_lucky, one_size
from nash.records import Judgment, iter_jsonl

N = 1000  # benchmarks/scale.py measures the larger sizes


def test_a_thousand_prompts_through_nash_run(tmp_path, tiny_model_dir):
    with Counting() as server:
        row = one_size(N, server, tmp_path, tiny_model_dir, ["eval.drift_prompts=0", "train.kl_prompts=0"])
    assert row["candidates"] == N * (K + 1)
    # Every prompt sampled once with n=5 (plus the held-out answers of π_1 and π_0) and judged in one request.
    assert row["requests"]["sample_choices"] == N * K + 2 * EVAL_PROMPTS
    assert row["requests"]["judge"] == N
    it = tmp_path / "runs" / f"scale-{N}" / "iter_001"
    with open(it / "samples.jsonl", "rb") as f:
        assert sum(1 for _ in f) == N * (K + 1)
    judgments = list(iter_jsonl(it / "judgments.jsonl", Judgment))
    assert len(judgments) == N * (K + 1) and all(j.outcome == "scored" for j in judgments)
    assert sum(j.raw is not None for j in judgments) == N  # each batched reply once
    # The server favours one prompt in 200, by a hash of its id: exactly those give the pairs.
    lucky = {f"q{i}" for i in range(N) if is_lucky(f"q{i}")}
    pairs = [json.loads(line) for line in (it / "pairs.jsonl").read_text().splitlines()]
    assert {p["prompt_id"] for p in pairs} == lucky and row["pairs"] == len(lucky) > 0
    manifest = json.loads((it / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["prompt_partition"]["size"] == N
    assert all(s["cpu_seconds"] >= 0 for s in manifest["stages"].values())
    assert row["peak_pss_mib"] > 0 and row["stages"]["judge"]["peak_pss_mib"] > 0
    assert row["peak_by_process_mib"]["nash run"]["pss"] > 0

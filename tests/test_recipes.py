"""Each recipe runs one real iteration on the embedded default through `nash run` (slow)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nash.records import Pair, read_jsonl
from nash.registry import RunDir
from tests.openai_server import OpenAIServer

ROOT = Path(__file__).resolve().parent.parent
SMALL = ["--set", "prompts.partition_size=16", "--set", "eval.num_prompts=16"]


def nash_run(recipe, runs, *extra, env=None):
    cmd = [sys.executable, "-m", "nash.flows.cli", "run", str(ROOT / "configs" / recipe), "--iterations", "1",
           "--runs-dir", str(runs), *SMALL, *extra]
    subprocess.run(cmd, check=True, cwd=ROOT, timeout=1800, env={**os.environ, **(env or {})})


def finished(runs, name):
    it = RunDir(runs / name).iterations()[0]
    assert it.complete, it.manifest().get("error")
    m = it.manifest()
    assert m["train"]["steps"] > 0 and m["train"]["kl_from_parent"] > 0
    head = json.loads(it.metrics.read_text())["headline"]
    assert head["win_rate"] is not None and head["kl_from_initial"] > 0 and head["perplexity"] > 1
    return it, m, read_jsonl(it.pairs, Pair)


@pytest.mark.slow
def test_spin_recipe(tmp_path):
    nash_run("spin.yaml", tmp_path)
    it, m, pairs = finished(tmp_path, "spin")
    assert m["stages"]["judge"]["skipped"] and all(p.chosen_policy == "reference" for p in pairs)
    assert len(pairs) == 16 and m["train"]["loss_function"] == "dpo"
    assert m["metrics"]["against"] == "nash-gold"  # the gold answers of the 32 held-out instructions


@pytest.mark.slow
def test_self_rewarding_recipe(tmp_path):
    nash_run("self_rewarding.yaml", tmp_path)
    it, m, pairs = finished(tmp_path, "self-rewarding")
    assert pairs and all(p.chosen_score > p.rejected_score for p in pairs)


@pytest.mark.slow
def test_dno_gpt4_recipe_against_a_loopback_server(tmp_path):
    with OpenAIServer() as server:
        nash_run("dno_gpt4.yaml", tmp_path, "--set", f"judge.base_url={server.url}",
                 env={"OPENAI_API_KEY": "sk-loopback-test"})
    it, m, pairs = finished(tmp_path, "dno-gpt4")
    assert m["stages"]["sample"]["candidates"] == 16 * 6  # K=5 plus the gold answer
    assert all(p.chosen_score >= 5 and p.margin >= (1 if p.rejected_policy == "reference" else 2) for p in pairs)
    assert "sk-loopback-test" not in json.dumps(m)
    assert m["metrics"]["against"] == "nash-gold" and m["metrics"]["n"] + m["metrics"]["failed"] == 16


@pytest.mark.slow
def test_dno_gpt4_alpaca_eval_recipe_against_a_loopback_server(tmp_path):
    """AlpacaEval 2.0's annotator on a local copy of the evaluation set (no hub here)."""
    from nash.evaluation import GOLD_REFERENCE
    from tests.test_alpaca_eval import next_token

    rows = [json.loads(line) for line in GOLD_REFERENCE.read_text().splitlines()][:16]
    local = tmp_path / "alpaca_eval_gpt4_baseline.json"
    local.write_text(json.dumps([{**r, "generator": "gpt4_1106_preview"} for r in rows]))
    with OpenAIServer() as server:
        server.next_token = next_token
        nash_run("dno_gpt4_alpaca_eval.yaml", tmp_path / "runs", "--set", f"judge.base_url={server.url}",
                 "--set", f"eval.judge.base_url={server.url}", "--set", f"eval.reference={local}",
                 "--set", "eval.lc_glm=length_controlled_minimal", "--set", "eval.max_new_tokens=64",
                 env={"OPENAI_API_KEY": "sk-loopback-test"})
        annotation_requests = [r["body"] for r in server.requests if r["body"].get("top_logprobs")]
    it, m, pairs = finished(tmp_path / "runs", "dno-gpt4-alpaca-eval")
    metrics = json.loads(it.metrics.read_text())
    result = metrics["win_rate"]
    assert result["n"] + result["failed"] == 16 and result["lc_glm"] == "length_controlled_minimal"
    # One request per instruction: against the reference outputs, then head to head with π_0 (eval.gate).
    assert len(annotation_requests) == 16 * 2
    assert metrics["versus_promoted"]["against"] == "iter_000" and metrics["promotion"]["reason"]
    assert {b["model"] for b in annotation_requests} == {"gpt-4-1106-preview"}
    assert all(b["max_tokens"] == 1 and b["top_logprobs"] == 5 for b in annotation_requests)
    recorded = result["alpaca_eval"]
    assert recorded["annotator"] == "weighted_alpaca_eval_gpt4_turbo" and recorded["alpaca_eval_version"]
    assert "sk-loopback-test" not in it.metrics.read_text()

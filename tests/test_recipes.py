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
    cmd = [sys.executable, "-m", "flows.cli", "run", str(ROOT / "configs" / recipe), "--iterations", "1",
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

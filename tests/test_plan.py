"""`nash plan` against what iterations then really send to a loopback server, and the budget refusal."""

import json
from pathlib import Path

import pytest

from nash import plan as planning
from nash.config import load_config
from nash.errors import UserError
from nash.iteration import run_iteration
from nash.records import Judgment, read_jsonl
from nash.registry import RunDir
from tests.openai_server import OpenAIServer

N = 10


@pytest.fixture
def gold_prompts(tmp_path):
    rows = [{"id": f"g{i}", "prompt": f"Tell me about thing {i} in a sentence.",
             "reference": f"Thing {i} is a small and useful object that people keep at home.",
             "split": "train" if i < 2 * N else "eval"} for i in range(2 * N + 4)]
    path = tmp_path / "gold.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _config(tiny_model_dir, prompts, url, *extra):
    return load_config(None, [
        f"policy.model={tiny_model_dir}", f"prompts.source={prompts}", f"prompts.partition_size={N}",
        "sampling.n=3", "sampling.max_new_tokens=12", "sampling.include_reference=true",
        "judge={kind: openai, protocol: batched, model: gpt-4-turbo, concurrency: 2}", f"judge.base_url={url}",
        "pairs.min_chosen_score=2", "pairs.min_margin=1", "train.batch_size=2", "train.max_length=128",
        "train.epochs=1", "train.kl_prompts=0", "eval.num_prompts=4", "eval.max_new_tokens=8", "eval.drift_prompts=0",
        "eval.gate=null", "run.name=planned", *extra])


def _sent(it) -> tuple[int, int]:
    js = read_jsonl(it.judgments, Judgment)
    return sum(j.requests for j in js), sum(j.tokens_in for j in js)


@pytest.mark.slow  # two iterations; the budget refusal below keeps the plan in the fast selection
def test_plan_matches_the_requests_and_tokens_iterations_send(tiny_model_dir, gold_prompts, tmp_path, monkeypatch):
    from nash.models import load_tokenizer

    monkeypatch.setenv("OPENAI_API_KEY", "sk-plan")
    monkeypatch.setenv("NASH_CACHE", str(tmp_path / "cache"))
    tok = load_tokenizer(tiny_model_dir)
    with OpenAIServer(count_tokens=lambda text: len(tok(text, add_special_tokens=False).input_ids)) as server:
        cfg = _config(tiny_model_dir, gold_prompts, server.url)
        run = RunDir.create(tmp_path / "runs", cfg)
        first = planning.plan_iteration(cfg, run)
        assert first["measured_from"] is None and first["candidates_per_prompt"] == 4
        run_iteration(str(run.path))
        it1 = run.iterations()[0]
        requests, tokens_in = _sent(it1)
        assert first["judging"]["requests"] == requests == N  # one batched request a prompt
        # Before anything is measured, candidates are counted at sampling.max_new_tokens: near the truth for
        # a random policy, which rarely stops early.
        assert first["judging"]["tokens_in"] == pytest.approx(tokens_in, rel=0.25)

        second = planning.plan_iteration(cfg, run)
        assert second["iteration"] == 2 and second["measured_from"] == "iter_001"
        run_iteration(str(run.path))
        requests, tokens_in = _sent(run.iterations()[1])
    assert second["judging"]["requests"] == requests == N
    print("plan vs sent, tokens in:", first["judging"]["tokens_in"], second["judging"]["tokens_in"], tokens_in)
    assert second["judging"]["tokens_in"] == pytest.approx(tokens_in, rel=0.10)
    assert second["sampling"]["sequences"] == N * 3 and second["disk"]["policy_bytes"] > 0
    line = planning.summary(second)
    assert line.startswith(f"plan for iter_002: {N} prompts x 4 candidates") and "as measured in iter_001" in line


def test_nash_run_refuses_an_iteration_planned_over_the_judging_budget(tiny_model_dir, gold_prompts, tmp_path,
                                                                     monkeypatch, capsys):
    from nash.flows.cli import main

    monkeypatch.setenv("OPENAI_API_KEY", "sk-plan")
    monkeypatch.setenv("NASH_CACHE", str(tmp_path / "cache"))
    with OpenAIServer() as server:
        cfg = _config(tiny_model_dir, gold_prompts, server.url, "judge.budget_usd=0.01")
        p = planning.plan_iteration(cfg)
        assert p["judging"]["usd"] > 0.01  # GPT-4-Turbo's prices, replies counted at judge.max_tokens
        sets = [x for o in [f"policy.model={tiny_model_dir}", f"prompts.source={gold_prompts}",
                            f"prompts.partition_size={N}", "sampling.n=3", "sampling.max_new_tokens=12",
                            "sampling.include_reference=true",
                            "judge={kind: openai, protocol: batched, model: gpt-4-turbo, budget_usd: 0.01}",
                            f"judge.base_url={server.url}", "run.name=over"] for x in ("--set", o)]
        assert main(["run", str(Path(__file__).parent.parent / "configs" / "default.yaml"), "--runs-dir", str(tmp_path / "runs"), *sets]) == 2
        assert not server.requests or all("score" not in json.dumps(r["body"]) for r in server.requests)
    err = capsys.readouterr().err
    assert f"puts judging at ${p['judging']['usd']:.2f}, over judge.budget_usd $0.01" in err
    assert "--over-budget" in err and not (tmp_path / "runs" / "over" / "iter_001").exists()
    with pytest.raises(UserError, match="over judge.budget_usd"):
        planning.check_budget(p, over_budget=False)
    assert "going on (--over-budget)" in planning.check_budget(p, over_budget=True)

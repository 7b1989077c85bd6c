"""AlpacaEval 2.0's annotator: nash's `alpaca_eval` protocol against the `alpaca_eval` package itself.

Both run against one loopback OpenAI-compatible server that answers `top_logprobs` requests
with a distribution over the next token drawn from the prompt: the package through its own
`evaluate` (its PairwiseAnnotator with `weighted_alpaca_eval_gpt4_turbo`, its OpenAI client
pointed at the server), nash through `evaluation.compare`. They must send the same requests
and get the same preference for every instruction, the same win rate, standard error and
length-controlled win rate.
"""

from __future__ import annotations

import hashlib
import json
import logging

import pandas as pd
import pytest

from nash import evaluation
from nash.config import ConfigError, load_config
from nash.records import Prompt, Sample
from tests.openai_server import OpenAIServer

N = 30


def next_token(user: str) -> dict[str, float]:
    """The judge's next-token distribution; a fifth of the replies name neither m nor M."""
    h = int(hashlib.sha256(user.encode()).hexdigest(), 16)
    if h % 5 == 0:
        return {"Both": 0.7, "The": 0.2}
    p = (h % 997) / 997 * 0.96 + 0.02
    if h % 7 == 0:  # only one of the two tokens among the top 5
        return {"M": p, "The": (1 - p) / 2}
    return {"M": p, "m": (1 - p) * 0.9, "Based": (1 - p) * 0.05}


def outputs():
    instructions = [f"Question {i}: how does a {['river', 'market', 'engine', 'song'][i % 4]} work?"
                    for i in range(N)]
    model = [("A short answer. " * (1 + (i * 7) % 11)).strip() for i in range(N)]
    ref = [("A reference answer with detail. " * (2 + (i * 5) % 9)).strip() for i in range(N)]
    ref[4] = model[4]  # identical outputs: 1.5, and no request
    return instructions, model, ref


def gamed_file(tmp_path, n: int):
    """AlpacaEval's hub file of gamed baselines (instruction difficulty plus their annotations), made up."""
    rows = []  # one block per gamed model, as the package looks difficulties up by row position
    for model, sign in (("gpt4_gamed_concise", -1.0), ("gpt4_gamed_verbose", 1.0)):
        for i in range(n):
            rows.append({"index": i, "instruction_difficulty": ((i * 13) % 10 - 5) / 5, "model": model,
                         "preference": 0.5 + 0.4 * sign * ((i % 3) / 3), "std_delta_len": -2.0 * sign,
                         "not_gamed_baseline": False})
    path = tmp_path / "df_gamed.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return str(path)


def judge_config(url: str):
    from nash.config import OpenAIJudge

    return OpenAIJudge(kind="openai", base_url=url, api_key_env="NASH_TEST_KEY", concurrency=4)


def run_package(srv, instructions, model, ref, glm):
    from alpaca_eval import main

    lb, annotations = main.evaluate(
        model_outputs=[{"instruction": s, "output": o, "generator": "policy"} for s, o in zip(instructions, model)],
        reference_outputs=[{"instruction": s, "output": o, "generator": "gpt4_1106_preview"}
                           for s, o in zip(instructions, ref)],
        annotators_config="weighted_alpaca_eval_gpt4_turbo", output_path=None, precomputed_leaderboard=None,
        is_cache_leaderboard=False, is_return_instead_of_print=True, caching_path=None,
        metric_kwargs={"glm_name": glm, "save_weights_dir": None, "is_warn_extreme_changes": False},
        annotation_kwargs={"openai_api_base": srv.url, "openai_api_keys": ["sk-test"],
                           "client_config_path": "/nonexistent", "num_procs": 2})
    return lb.loc["policy"], pd.DataFrame(annotations)


def run_nash(srv, instructions, model, ref, glm, out):
    from nash.judges import build_alpaca_eval_judge

    judge = build_alpaca_eval_judge(judge_config(srv.url), "weighted_alpaca_eval_gpt4_turbo")
    prompts = [Prompt(id=f"ref-{i:04d}", text=s, split="eval") for i, s in enumerate(instructions)]
    samples = [Sample(prompt_id=p.id, candidate=0, prompt=p.text, response=o, num_tokens=len(o.split()),
                      policy="iter_001") for p, o in zip(prompts, model)]
    reference = {p.id: r for p, r in zip(prompts, ref)}
    result = evaluation.compare(judge, prompts, samples, reference, out, glm)
    annotations = evaluation.preferences(evaluation.read_jsonl(out, evaluation.Judgment))
    return result, [annotations[p.id] for p in prompts]


@pytest.mark.parametrize("glm", ["length_controlled_minimal", "length_controlled_v1"])
def test_same_requests_preferences_and_win_rates_as_the_package(glm, tmp_path, monkeypatch):
    import alpaca_eval.metrics.glm_winrate as glm_module

    monkeypatch.setenv("NASH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("NASH_TEST_KEY", "sk-test")
    monkeypatch.setattr(glm_module, "hf_hub_download", lambda **kw: gamed_file(tmp_path, N))
    logging.getLogger().setLevel(logging.WARNING)  # the package logs every request at INFO
    instructions, model, ref = outputs()
    with OpenAIServer() as srv:
        srv.next_token = next_token
        theirs, their_annotations = run_package(srv, instructions, model, ref, glm)
        their_requests = [r["body"] for r in srv.requests]
        srv.requests.clear()
        ours, our_prefs = run_nash(srv, instructions, model, ref, glm, tmp_path / "judgments.jsonl")
        our_requests = [r["body"] for r in srv.requests]

    # The same request bodies (messages, model, max_tokens, temperature, top_p, logprobs, top_logprobs).
    assert len(our_requests) == len(their_requests) == N - 1
    assert sorted(json.dumps(b, sort_keys=True) for b in our_requests) == \
        sorted(json.dumps(b, sort_keys=True) for b in their_requests)
    # The same preference for every instruction, missing ones included.
    their_prefs = their_annotations.set_index("instruction").loc[instructions, "preference"].tolist()
    assert sum(pd.isna(their_prefs)) >= 3  # the case of a reply without m or M is exercised
    assert sum(0 < abs(p - 1.5) < 0.49 for p in their_prefs if not pd.isna(p)) >= 10  # and fractional ones
    for i, (a, b) in enumerate(zip(our_prefs, their_prefs)):
        assert (a is None) == bool(pd.isna(b)), instructions[i]
        if a is not None:
            assert a == pytest.approx(b, abs=1e-6), instructions[i]
    # The same figures, the package's in percent.
    assert ours["win_rate"] * 100 == pytest.approx(theirs["win_rate"], rel=1e-9)
    assert ours["standard_error"] * 100 == pytest.approx(theirs["standard_error"], rel=1e-9)
    assert ours["n"] == theirs["n_total"] and ours["failed"] == sum(pd.isna(their_prefs))
    assert ours["lc_win_rate"] * 100 == pytest.approx(theirs["length_controlled_winrate"], rel=1e-9)
    assert ours["lc_standard_error"] * 100 == pytest.approx(theirs["lc_standard_error"], rel=1e-9)
    assert abs(ours["lc_win_rate"] - ours["win_rate"]) > 1e-3  # length control moved the figure
    # What makes two runs' figures comparable is recorded.
    recorded = ours["alpaca_eval"]
    assert recorded["annotator"] == "weighted_alpaca_eval_gpt4_turbo" and recorded["model"] == "gpt-4-1106-preview"
    assert recorded["alpaca_eval_version"] == evaluation_version()
    assert recorded["annotator_config"]["completions_kwargs"]["top_logprobs"] == 5


def evaluation_version():
    from importlib.metadata import version

    return version("alpaca_eval")


def test_annotations_are_cached_and_budgeted(tmp_path, monkeypatch):
    monkeypatch.setenv("NASH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("NASH_TEST_KEY", "sk-test")
    instructions, model, ref = outputs()
    with OpenAIServer() as srv:
        srv.next_token = next_token
        first, prefs = run_nash(srv, instructions, model, ref, "length_controlled_minimal", tmp_path / "a.jsonl")
        paid = len(srv.requests)
        again, prefs_again = run_nash(srv, instructions, model, ref, "length_controlled_minimal",
                                      tmp_path / "b.jsonl")
        # Replies that gave a preference come from the cache; the unreadable ones are asked again.
        assert len(srv.requests) - paid == first["failed"]
        assert prefs_again == prefs
        assert first["usage"]["tokens_in"] > 0 and again["usage"]["cached"] == paid - first["failed"]

        from nash.judges import build_alpaca_eval_judge
        from nash.judges.base import BudgetExhausted

        cfg = judge_config(srv.url).model_copy(update={"budget_tokens": 1, "cache": False})
        judge = build_alpaca_eval_judge(cfg, "weighted_alpaca_eval_gpt4_turbo")
        p = Prompt(id="ref-0000", text=instructions[0], split="eval")
        judge.compare(p, model[0], ref[0])
        with pytest.raises(BudgetExhausted):
            judge.compare(p, model[1], ref[1])


def test_protocol_needs_an_openai_annotator(tmp_path):
    with pytest.raises(ConfigError, match="eval.protocol"):
        load_config("configs/default.yaml", ["eval.protocol=alpaca_eval"])
    cfg = load_config("configs/default.yaml", ["eval.protocol=alpaca_eval", "eval.judge.kind=openai"])
    assert cfg.eval.judge.kind == "openai"


def test_unknown_annotator_names_the_key(monkeypatch):
    from nash.judges.alpaca_eval import AlpacaEvalConfigError, annotator_config

    with pytest.raises(AlpacaEvalConfigError, match="eval.alpaca_eval_annotator.*no annotator 'gpt5_magic'"):
        annotator_config("gpt5_magic")
    with pytest.raises(AlpacaEvalConfigError, match="fn_completions"):
        annotator_config("claude_ranking")


def test_alpaca_eval_set_offline_names_the_way_to_get_it(monkeypatch):
    import huggingface_hub

    def offline(*a, **kw):
        raise huggingface_hub.errors.LocalEntryNotFoundError("offline")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(evaluation.ReferenceSetError, match="huggingface-cli download tatsu-lab/alpaca_eval"):
        evaluation.load_reference_set("alpaca_eval", 0)


def test_alpaca_eval_set_from_the_hub_cache(monkeypatch, tmp_path):
    import huggingface_hub

    rows = [{"instruction": f"i{k}", "output": f"o{k}", "generator": "gpt4_1106_preview", "dataset": "x"}
            for k in range(5)]
    path = tmp_path / "alpaca_eval_gpt4_baseline.json"
    path.write_text(json.dumps(rows))
    asked = []
    monkeypatch.setattr(huggingface_hub, "hf_hub_download",
                        lambda repo, filename, repo_type: asked.append((repo, filename, repo_type)) or str(path))
    prompts = evaluation.load_reference_set("alpaca_eval", 0)
    assert asked == [("tatsu-lab/alpaca_eval", "alpaca_eval_gpt4_baseline.json", "dataset")]
    assert [p.reference for p in prompts] == [r["output"] for r in rows]
    assert prompts[0].generator == "gpt4_1106_preview"

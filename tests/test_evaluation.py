import json
import math
import random

import pandas as pd
import pytest

from nash.evaluation import (
    MODEL,
    annotate,
    length_controlled,
    load_reference_set,
    pass_rates,
    preferences,
    win_rate,
)
from nash.judges.rules import RulesJudge
from nash.records import Prompt, Sample


def test_win_rate_and_standard_error_by_hand():
    # AlpacaEval preferences: 2 = policy wins, 1 = reference wins, 1.5 = tie; None = failed.
    prefs = [2, 2, 1, 1.5, 2, None, 1.75]
    r = win_rate(prefs, expected=8)
    xs = [1, 1, 0, 0.5, 1, 0.75]
    mean = sum(xs) / 6
    se = math.sqrt(sum((x - mean) ** 2 for x in xs) / 5) / math.sqrt(6)
    assert r["win_rate"] == pytest.approx(mean) and r["standard_error"] == pytest.approx(se)
    assert (r["n"], r["wins"], r["ties"], r["losses"], r["failed"], r["unjudged"]) == (6, 4, 1, 1, 1, 1)


def test_win_rate_matches_alpaca_eval():
    from alpaca_eval.metrics.winrate import get_winrate

    prefs = [2, 1, 1.5, 2, 2, 1.25, 1, 2]
    ours = win_rate(prefs)
    theirs = get_winrate(pd.DataFrame({"preference": prefs}))
    assert ours["win_rate"] * 100 == pytest.approx(theirs["win_rate"])
    assert ours["standard_error"] * 100 == pytest.approx(theirs["standard_error"])
    assert (ours["wins"], ours["losses"]) == (theirs["n_wins"], theirs["n_wins_base"])


def test_win_rate_with_nothing_judged_is_none():
    r = win_rate([None, None])
    assert r["win_rate"] is None and r["standard_error"] is None and r["failed"] == 2


def lc_data(n=60, seed=0):
    """Annotations where the longer answer tends to win."""
    rng = random.Random(seed)
    model, ref, prefs = [], [], []
    for _ in range(n):
        lm, lr = rng.randint(20, 400), rng.randint(20, 400)
        model.append("x" * lm)
        ref.append("y" * lr)
        p_model = 1 / (1 + math.exp(-(lm - lr) / 120 - 0.3))
        prefs.append(2.0 if rng.random() < p_model else 1.0)
    return prefs, model, ref


def test_length_controlled_win_rate_matches_alpaca_eval(monkeypatch, tmp_path):
    """The package's own `get_length_controlled_winrate` on the same annotations, its hub file replaced."""
    import alpaca_eval.metrics.glm_winrate as glm

    prefs, model, ref = lc_data()
    gamed = tmp_path / "df_gamed.csv"
    pd.DataFrame({"index": range(len(prefs)), "instruction_difficulty": 0.0, "model": "m"}).to_csv(gamed, index=False)
    monkeypatch.setattr(glm, "hf_hub_download", lambda **kw: str(gamed))
    df = pd.DataFrame({"index": range(len(prefs)), "preference": prefs, "output_1": ref, "output_2": model,
                       "generator_1": "reference", "generator_2": "policy", "annotator": "test"})
    theirs = glm.get_length_controlled_winrate(df, glm_name="length_controlled_minimal", save_weights_dir=None,
                                               is_warn_extreme_changes=False)
    ours = length_controlled(prefs, model, ref, "length_controlled_minimal")
    assert ours["lc_win_rate"] * 100 == pytest.approx(theirs["length_controlled_winrate"], rel=1e-9)
    assert ours["lc_standard_error"] * 100 == pytest.approx(theirs["lc_standard_error"], rel=1e-9)
    # Length explains part of the wins here, so controlling for it moves the win rate.
    assert abs(ours["lc_win_rate"] - win_rate(prefs)["win_rate"]) > 0.01


def test_length_controlled_needs_five_annotations():
    r = length_controlled([2, 1, 2], ["a", "b", "c"], ["dd", "e", "f"])
    assert r["lc_win_rate"] is None and "at least 5" in r["lc_note"]


def prompts_with_constraints(n=4):
    return [Prompt(id=f"p{i}", text=f"Describe {i} in lowercase.", constraints=[{"kind": "lowercase"}],
                   split="eval") for i in range(n)]


def test_rules_annotation_scores_both_sides_and_counts_failures(tmp_path):
    prompts = prompts_with_constraints()
    model = [Sample(prompt_id=p.id, candidate=0, prompt=p.text, response=r, num_tokens=2, policy="iter_001")
             for p, r in zip(prompts, ["all lower", "Not Lower", "both lower", "x"])]
    reference = {"p0": "Upper Case", "p1": "lower", "p2": "also lower"}  # p3 has no reference: unjudged
    path = tmp_path / "vs" / "judgments.jsonl"
    annotations, info = annotate(RulesJudge(), prompts, model, reference, path)
    prefs = preferences(annotations)
    assert prefs == {"p0": 2.0, "p1": 1.0, "p2": 1.5}
    assert pass_rates(annotations)["pass_rate"] == pytest.approx(2 / 3)
    assert pass_rates(annotations, "reference")["pass_rate"] == pytest.approx(2 / 3)
    # Append-only and resumable: a second call asks nothing new.
    again, _ = annotate(RulesJudge(), prompts, model, reference, path)
    assert len(again) == len(annotations) == 6 and len(path.read_text().splitlines()) == 6


def test_openai_annotation_asks_both_orders_and_keeps_failures(tmp_path, monkeypatch):
    from nash.config import load_config
    from nash.judges import build_judge
    from tests.openai_server import OpenAIServer, default_reply

    monkeypatch.setenv("OPENAI_API_KEY", "sk-eval-test")
    monkeypatch.setenv("NASH_CACHE", str(tmp_path / "cache"))
    prompts = [Prompt(id=f"q{i}", text=f"Say something about {i}.", split="eval") for i in range(3)]
    model = [Sample(prompt_id=p.id, candidate=0, prompt=p.text, response=r, num_tokens=1, policy="iter_001")
             for p, r in zip(prompts, ["short", "a much longer answer here", "fails"])]
    reference = {"q0": "a longer reference answer", "q1": "tiny", "q2": "ref"}
    def responder(prompt):  # the shorter output wins, in either order; one prompt gets no verdict
        return "no verdict" if "fails" in prompt else default_reply(prompt)

    with OpenAIServer(responder) as server:
        cfg = load_config(None, ["judge.kind=openai", f"judge.base_url={server.url}", "judge.protocol=pairwise",
                                 "judge.parse_retries=0", "judge.max_retries=0"])
        annotations, _ = annotate(build_judge(cfg.judge), prompts, model, reference, tmp_path / "j.jsonl")
        bodies = [r["body"]["messages"][-1]["content"] for r in server.requests]
    # Each prompt asked twice, the outputs swapped in the second request.
    q0 = [b for b in bodies if "short" in b]
    assert len(bodies) == 6 and len(q0) == 2
    assert {b.index("short") < b.index("a longer reference") for b in q0} == {True, False}
    prefs = preferences(annotations)
    assert prefs["q0"] == 2.0 and prefs["q1"] == 1.0 and prefs["q2"] is None
    failed = [j for j in annotations if j.candidate == MODEL and j.outcome == "failed"]
    assert len(failed) == 1 and "no verdict" in failed[0].raw
    r = win_rate(list(prefs.values()))
    assert (r["n"], r["failed"], r["win_rate"]) == (2, 1, 0.5)


def test_reference_sets_in_alpaca_eval_layout(tmp_path):
    rows = [{"instruction": "Name a colour.", "output": "Blue.", "generator": "gpt4_turbo"},
            {"instruction": "Name a fruit.", "output": "Apple.", "generator": "gpt4_turbo"}]
    jl = tmp_path / "ref.jsonl"
    jl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    js = tmp_path / "ref.json"
    js.write_text(json.dumps(rows))
    for path in (jl, js):
        got = load_reference_set(str(path), 0)
        assert [(p.text, p.reference, p.generator) for p in got] == [("Name a colour.", "Blue.", "gpt4_turbo"),
                                                                      ("Name a fruit.", "Apple.", "gpt4_turbo")]
    assert len(load_reference_set("builtin:gold", 0)) == 32 and len(load_reference_set(str(jl), 1)) == 1
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"instruction": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl: row 1: missing output"):
        load_reference_set(str(bad), 0)


def test_openai_weighted_annotation_reads_the_verdict_logprobs(tmp_path, monkeypatch):
    """eval.weighted with an openai judge: P(a) from top_logprobs, averaged over both orders."""
    from nash.config import load_config
    from nash.judges import build_judge
    from tests.openai_server import OpenAIServer

    monkeypatch.setenv("OPENAI_API_KEY", "sk-eval-test")
    monkeypatch.setenv("NASH_CACHE", str(tmp_path / "cache"))
    prompts = [Prompt(id=f"q{i}", text=f"Say something about {i}.", split="eval") for i in range(2)]
    model = [Sample(prompt_id=p.id, candidate=0, prompt=p.text, response=r, num_tokens=1, policy="iter_001")
             for p, r in zip(prompts, ["short", "a much longer answer here"])]
    reference = {"q0": "a longer reference answer", "q1": "tiny"}
    with OpenAIServer() as server:  # the shorter output wins with probability 0.8, in either order
        cfg = load_config(None, ["judge.kind=openai", f"judge.base_url={server.url}", "judge.protocol=pairwise",
                                 "judge.weighted=true"])
        annotations, _ = annotate(build_judge(cfg.judge), prompts, model, reference, tmp_path / "w.jsonl")
        assert all(r["body"]["logprobs"] is True and r["body"]["top_logprobs"] == 5 for r in server.requests)
        # A server without log-probabilities: the text verdict counts, in both orders.
        server.logprobs = False
        cfg2 = load_config(None, ["judge.kind=openai", f"judge.base_url={server.url}", "judge.protocol=pairwise",
                                  "judge.weighted=true", "judge.cache=false"])
        plain, _ = annotate(build_judge(cfg2.judge), prompts, model, reference, tmp_path / "p.jsonl")
    assert preferences(annotations) == {"q0": pytest.approx(1.8), "q1": pytest.approx(1.2)}
    assert preferences(plain) == {"q0": 2.0, "q1": 1.0}

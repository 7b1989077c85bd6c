import pytest
from nash.judges import build_judge

from nash.config import load_config
from nash.records import Prompt


def test_rules_judge_scores_the_share_of_constraints_met():
    judge = build_judge(load_config(None, ["judge.kind=rules"]).judge)
    prompt = Prompt(id="p", text="t", constraints=[{"kind": "lowercase"}, {"kind": "max_words", "n": 3}])
    out = judge.score(prompt, ["just two", "Just two", "Far Too Many Words Here", "far too many words here"])
    assert [j.score for j in out] == [1.0, 0.5, 0.0, 0.5]
    assert [j.candidate for j in out] == [0, 1, 2, 3]
    assert all(j.outcome == "scored" and j.judge == "rules" for j in out)
    assert out[1].details["passed"] == {"lowercase": False, "max_words(n=3)": True}


def test_rules_judge_refuses_prompts_without_constraints():
    judge = build_judge(load_config(None, ["judge.kind=rules"]).judge)
    with pytest.raises(ValueError, match="prompt 'p' has no constraints"):
        judge.score(Prompt(id="p", text="t"), ["a"])


def test_self_judge_weighted_scores_come_from_the_policy(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("NASH_CACHE", str(tmp_path))
    cfg = load_config(None, ["judge.kind=self"]).judge
    judge = build_judge(cfg, policy_path=tiny_model_dir)
    out = judge.score(Prompt(id="p", text="Say hi."), ["hi", "hello there", "hi"])
    assert [j.outcome for j in out] == ["scored"] * 3
    assert all(0.0 <= j.score <= 5.0 for j in out)
    assert out[0].score == out[2].score != out[1].score  # same answer, same score
    assert all(j.requests == 1 and j.tokens_in > 0 for j in out)
    again = build_judge(cfg, policy_path=tiny_model_dir).score(Prompt(id="p", text="Say hi."), ["hi"])
    assert again[0].cached == 1 and again[0].requests == 0 and again[0].score == out[0].score


def test_local_judge_without_weighting_records_unparseable_replies_as_failed(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("NASH_CACHE", str(tmp_path))
    cfg = load_config(None, ["judge.kind=hf", f"judge.model={tiny_model_dir}", "judge.weighted=false",
                             "judge.max_tokens=8", "judge.parse_retries=1", "judge.temperature=1.0"]).judge
    out = build_judge(cfg).score(Prompt(id="p", text="Say hi."), ["hi", "hello"])
    # A random model never writes "Score: n": both fail, each after two requests, raw text kept.
    assert [(j.outcome, j.requests) for j in out] == [("failed", 2), ("failed", 2)]
    assert all(j.raw is not None and j.error.startswith("ParseError") for j in out)


def test_composite_weights_scores_and_fails_when_a_component_fails(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("NASH_CACHE", str(tmp_path))
    prompt = Prompt(id="p", text="t", constraints=[{"kind": "lowercase"}])
    cfg = load_config(None, ["judge={kind: composite, components: [{kind: rules}, {kind: rules}], weights: [3, 1]}"])
    out = build_judge(cfg.judge).score(prompt, ["ok", "NO"])
    assert [j.score for j in out] == [1.0, 0.0]
    assert out[0].details["components"] == [{"judge": "rules", "score": 1.0, "outcome": "scored",
                                             "details": {"passed": {"lowercase": True}}}] * 2
    mixed = load_config(None, [f"judge={{kind: composite, components: [{{kind: rules}}, {{kind: hf, model: '{tiny_model_dir}', "
                                "weighted: false, max_tokens: 4, parse_retries: 0}]}"]).judge
    out = build_judge(mixed).score(prompt, ["ok"])
    assert out[0].outcome == "failed" and out[0].error.startswith("hf: ParseError")


def test_reward_model_judge_scores_with_a_scalar_head(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    config = LlamaConfig.from_pretrained(tiny_model_dir)
    config.num_labels = 1
    rm_dir = tmp_path / "rm"
    LlamaForSequenceClassification(config).save_pretrained(rm_dir)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(rm_dir)
    judge = build_judge(load_config(None, ["judge.kind=reward_model", f"judge.model={rm_dir}"]).judge)
    out = judge.score(Prompt(id="p", text="Say hi."), ["hi", "a much longer answer than hi", "hi"])
    assert [j.outcome for j in out] == ["scored"] * 3
    assert out[0].score == pytest.approx(out[2].score) and out[0].score != out[1].score


def test_self_judge_cache_does_not_outlive_the_model_at_its_path(tiny_model_dir, tmp_path, monkeypatch):
    import os
    import shutil

    monkeypatch.setenv("NASH_CACHE", str(tmp_path / "cache"))
    model = tmp_path / "policy"
    shutil.copytree(tiny_model_dir, model)
    cfg = load_config(None, ["judge.kind=self"]).judge
    build_judge(cfg, policy_path=str(model)).score(Prompt(id="p", text="Say hi."), ["hi"])
    weights = model / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))  # a retrained model
    again = build_judge(cfg, policy_path=str(model)).score(Prompt(id="p", text="Say hi."), ["hi"])
    assert again[0].cached == 0 and again[0].requests == 1

import pytest

from nash.config import load_config
from nash.judges import build_judge
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


@pytest.fixture
def rm_dir(tiny_model_dir, tmp_path):
    """A tiny randomly initialised reward model: the tiny policy's config with one label."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    config = LlamaConfig.from_pretrained(tiny_model_dir)
    config.num_labels = 1
    rm_dir = tmp_path / "rm"
    LlamaForSequenceClassification(config).save_pretrained(rm_dir)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(rm_dir)
    return rm_dir


def test_reward_model_judge_scores_with_a_scalar_head(rm_dir):
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


# -- score_batch: several prompts judged together, the same judgments as one by one ---------------

BATCH_ITEMS = [
    (Prompt(id="p0", text="Say hi."), ["hi", "hello there, how are you today?", "hi"]),
    (Prompt(id="p1", text="Name a colour and say why you like it."), ["Red.", "Blue, because the sky and sea are blue."]),
    (Prompt(id="p2", text="Count to three.", topic="counting"), ["one two three", "1, 2, 3", "three", "I cannot count."]),
]


def _same_judgments(batched, one_by_one, tol):
    """Equal records, floats (scores, probabilities) to `tol`: padding differs between the batches."""
    assert len(batched) == len(one_by_one)
    for got, want in zip(batched, one_by_one):
        assert [(j.prompt_id, j.candidate, j.other, j.outcome, j.winner) for j in got] == \
               [(j.prompt_id, j.candidate, j.other, j.outcome, j.winner) for j in want]
        for g, w in zip(got, want):
            assert (g.requests, g.cached, g.tokens_in, g.tokens_out) == (w.requests, w.cached, w.tokens_in, w.tokens_out)
            assert g.score == pytest.approx(w.score, abs=tol)
            assert g.model_dump(exclude={"score", "details", "raw"}) == w.model_dump(exclude={"score", "details", "raw"})


def _counting(backend):
    """Wrap `backend.complete`: the size of each request list it is handed."""
    sizes, complete = [], backend.complete

    def counted(requests, *a, **kw):
        sizes.append(len(requests))
        return complete(requests, *a, **kw)

    backend.complete = counted
    return sizes


@pytest.mark.parametrize("protocol", ["pointwise", "pairwise"])
def test_self_judge_score_batch_matches_score_per_prompt(protocol, tiny_model_dir, tmp_path, monkeypatch):
    # fp32, no cache (a cache would hand the second pass the first one's replies): scores agree to
    # 1e-5, the float noise of padding the prompts to other lengths, and usage is exactly the same.
    from nash.precision import resolve

    monkeypatch.setenv("NASH_CACHE", str(tmp_path))
    cfg = load_config(None, ["judge.kind=self", f"judge.protocol={protocol}", "judge.weighted=true",
                             "judge.cache=false", "judge.batch_size=16"]).judge
    judge = build_judge(cfg, policy_path=tiny_model_dir, precision=resolve("fp32"))
    sizes = _counting(judge.backend)
    one_by_one = [judge.score(p, c) for p, c in BATCH_ITEMS]
    per_prompt_sizes, sizes[:] = list(sizes), []
    batched = judge.score_batch(BATCH_ITEMS)
    requests = [judge.prompt_requests(len(c)) for _, c in BATCH_ITEMS]
    assert per_prompt_sizes == requests  # one call per prompt ...
    assert sizes == [sum(requests)]  # ... against one call with every prompt's requests
    _same_judgments(batched, one_by_one, 1e-5)
    assert all(j.outcome != "failed" for js in batched for j in js)
    if protocol == "pairwise":
        for got, want in zip(batched, one_by_one):
            assert [j.details["comparisons"] for j in got] == [j.details["comparisons"] for j in want]


def test_local_judge_score_batch_re_asks_malformed_replies_of_all_prompts_together(tiny_model_dir, tmp_path,
                                                                                    monkeypatch):
    # Generated replies that never parse: every request is asked 1 + parse_retries times, and the
    # re-asks of all the prompts go to the backend again in one call; usage stays per candidate.
    monkeypatch.setenv("NASH_CACHE", str(tmp_path))
    cfg = load_config(None, ["judge.kind=hf", f"judge.model={tiny_model_dir}", "judge.weighted=false",
                             "judge.max_tokens=4", "judge.parse_retries=1"]).judge
    judge = build_judge(cfg)
    sizes = _counting(judge.backend)
    out = judge.score_batch(BATCH_ITEMS[:2])
    assert sizes == [5, 5]
    assert [[(j.outcome, j.requests) for j in js] for js in out] == [[("failed", 2)] * 3, [("failed", 2)] * 2]


def test_quality_judge_score_batch_matches_score_per_prompt():
    # fp32: relevances (cosines) to 1e-5 whatever the padding of the batch, hence the same verdicts.
    judge = build_judge(load_config(None, ["judge.kind=quality", "judge.precision=fp32"]).judge)
    items = [(Prompt(id="v", text="Tell me about volcanoes.", topic="volcanoes"),
              ["A volcano is an opening in the ground where hot melted rock comes up from deep inside the earth.",
               "bees bees bees bees bees bees bees", ""]),
             (Prompt(id="t", text="How is tea made?"),
              ["Tea is made by pouring hot water over dried leaves, and people drink it all over the world.", "Tea."])]
    one_by_one = [judge.score(p, c) for p, c in items]
    batched = judge.score_batch(items)
    _same_judgments(batched, one_by_one, 0)
    for got, want in zip(batched, one_by_one):
        for g, w in zip(got, want):
            assert g.details["relevance"] == pytest.approx(w.details["relevance"], abs=1e-4)  # rounded to 4 places
            assert {k: v for k, v in g.details.items() if k != "relevance"} == \
                   {k: v for k, v in w.details.items() if k != "relevance"}
    assert [j.score for j in batched[0]] == [1.0, 0.0, 0.0] and [j.score for j in batched[1]] == [1.0, 0.0]


def test_composite_score_batch_combines_each_components_batch(tiny_model_dir, tmp_path, monkeypatch):
    from nash.precision import resolve

    monkeypatch.setenv("NASH_CACHE", str(tmp_path))
    cfg = load_config(None, ["judge={kind: composite, components: [{kind: rules}, {kind: self, cache: false}], "
                             "weights: [1, 1]}"]).judge
    judge = build_judge(cfg, policy_path=tiny_model_dir, precision=resolve("fp32"))
    sizes = _counting(judge.components[1].backend)
    items = [(p, c) for p, c in BATCH_ITEMS]
    items = [(p.model_copy(update={"constraints": [{"kind": "lowercase"}]}), c) for p, c in items]
    one_by_one = [judge.score(p, c) for p, c in items]
    sizes[:] = []
    batched = judge.score_batch(items)
    assert sizes == [sum(len(c) for _, c in items)]
    _same_judgments(batched, one_by_one, 1e-5)
    assert all(j.judge == "composite" and len(j.details["components"]) == 2 for js in batched for j in js)


def test_reward_model_score_batch_matches_score_per_prompt(rm_dir):
    judge = build_judge(load_config(None, ["judge.kind=reward_model", f"judge.model={rm_dir}",
                                           "judge.precision=fp32", "judge.batch_size=8"]).judge)
    one_by_one = [judge.score(p, c) for p, c in BATCH_ITEMS]
    _same_judgments(judge.score_batch(BATCH_ITEMS), one_by_one, 1e-5)

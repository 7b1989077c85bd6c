"""The quality signal and the degeneration measures, on hand-made answers."""

import pytest

from nash import quality
from nash.config import load_config
from nash.judges import build_judge
from nash.prompts import builtin_prompts

# What the iteration-2 policy of the rules-only demo answered on held-out prompts.
DEGENERATE = ["smolLM", "SmolLM", "LIGHTLEMALESHELLER", '"Scareful"', "That is all for now.", "simple and elegant",
              "", "Thank you for reading.", "bees bees bees bees bees bees bees bees bees bees"]

REAL = {
    "honeybees": "Honeybees live in large colonies and collect nectar from flowers to make honey for the winter.",
    "volcanoes": "A volcano is an opening in the ground where hot melted rock comes up from deep inside the earth.",
    "tea": "Tea is made by pouring hot water over dried leaves, and people drink it all over the world.",
    "lighthouses": "Lighthouses stand on rocky coasts and shine a bright light so that ships can find their way at night.",
}


@pytest.fixture(scope="module")
def gated_judge():
    cfg = load_config(None, ["judge.kind=composite", "judge.combine=gated",
                             "judge.components=[{kind: quality}, {kind: rules}]"])
    return build_judge(cfg.judge)


def _prompt(topic):
    return next(p for p in builtin_prompts(0) if p.topic == topic)


@pytest.mark.parametrize("topic", sorted(REAL))
def test_real_answers_outscore_every_degenerate_one(gated_judge, topic):
    prompt = _prompt(topic)
    scores = [j.score for j in gated_judge.score(prompt, [REAL[topic], *DEGENERATE])]
    real, degenerate = scores[0], scores[1:]
    assert real >= 0.5 and max(degenerate) == 0.0, (prompt.text, scores)


def test_off_topic_and_gibberish_answers_fail_the_gate(gated_judge):
    prompt = _prompt("volcanoes")
    off_topic = REAL["tea"]
    gibberish = "Flarbonic zintels mepple the grovish trundles quorbly, snarfing plinteous wobbets and glimmerous zonts."
    js = build_judge(load_config(None, ["judge.kind=quality"]).judge).score(prompt, [REAL["volcanoes"], off_topic,
                                                                                      gibberish])
    assert [j.score for j in js] == [1.0, 0.0, 0.0]
    assert "off_topic" in js[1].details["failed"] and "gibberish" in js[2].details["failed"]
    assert js[0].details["relevance"] > 0.4 > js[1].details["relevance"]


def test_gated_score_pays_constraints_only_on_real_answers(gated_judge):
    prompt = _prompt("tea").model_copy(update={"constraints": [{"kind": "no_commas"}]})
    comma_free = "Tea is made by pouring hot water over dried leaves and people drink it all over the world."
    scores = [j.score for j in gated_judge.score(prompt, [comma_free, REAL["tea"], "Tea."])]
    assert scores == [1.0, 0.5, 0.0]


def test_degeneration_flags_on_hand_made_answers():
    f = quality.degeneration("", "tea")
    assert f["empty"] and f["short"] and not f["substantive"]
    f = quality.degeneration("Tea is nice.", "tea")
    assert f["short"] and not f["empty"] and not f["off_topic"]
    f = quality.degeneration(REAL["tea"], "volcanoes")
    assert f["off_topic"] and not f["short"] and not f["substantive"]
    f = quality.degeneration("tea is good tea is good tea is good tea is good", "tea")
    assert f["repetitive"] and not f["substantive"]
    assert quality.degeneration(REAL["honeybees"], "honeybees")["substantive"]
    # A compound topic counts when its part is named; plural and singular both count.
    assert quality.names_topic("The bees were busy all day.", "honeybees")
    assert quality.names_topic("A lighthouse guided the ship.", "lighthouses")
    assert quality.names_topic("Seeds are kept in a vault.", "libraries of seeds")
    assert not quality.names_topic("The cat slept.", "the ocean")


def test_distinct_n_and_repeated_ngrams():
    assert quality.distinct_n("a b a b", 2) == pytest.approx(2 / 3)
    assert quality.distinct_n("one", 2) is None
    assert quality.repeated_ngram_share("x y z x y z", 3) == pytest.approx(1 - 3 / 4)
    assert quality.repeated_ngram_share("every word here differs from others", 3) == 0.0


def test_report_shares():
    texts = ["", "Tea is nice.", REAL["tea"], REAL["tea"]]
    r = quality.report(texts, ["tea", "tea", "tea", "volcanoes"])
    assert r["n"] == 4 and r["empty"] == 0.25 and r["short"] == 0.5 and r["off_topic"] == 0.25
    assert r["substantive"] == 0.25 and r["mean_words"] == pytest.approx((0 + 3 + 18 + 18) / 4)
    assert quality.report(["Anything at all here today."], [None])["off_topic"] is None

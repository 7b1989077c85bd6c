import pytest

from judges import build_judge
from nash.config import load_config
from nash.records import Prompt


def test_rules_judge_scores_the_share_of_constraints_met():
    judge = build_judge(load_config(None).judge)
    prompt = Prompt(id="p", text="t", constraints=[{"kind": "lowercase"}, {"kind": "max_words", "n": 3}])
    out = judge.score(prompt, ["just two", "Just two", "Far Too Many Words Here", "far too many words here"])
    assert [j.score for j in out] == [1.0, 0.5, 0.0, 0.5]
    assert [j.candidate for j in out] == [0, 1, 2, 3]
    assert all(j.outcome == "scored" and j.judge == "rules" for j in out)
    assert out[1].details["passed"] == {"lowercase": False, "max_words(n=3)": True}


def test_rules_judge_refuses_prompts_without_constraints():
    judge = build_judge(load_config(None).judge)
    with pytest.raises(ValueError, match="prompt 'p' has no constraints"):
        judge.score(Prompt(id="p", text="t"), ["a"])

from nash.evaluation import summarize, win_rate
from nash.records import Judgment


def j(pid, score, outcome="scored", passed=None):
    return Judgment(prompt_id=pid, candidate=0, judge="rules", outcome=outcome,
                    score=score if outcome == "scored" else None, details={"passed": passed or {}})


def test_win_rate_counts_ties_half_and_reports_unjudged():
    new = [j("a", 1.0), j("b", 0.5), j("c", 0.0), j("d", 1.0), j("e", None, "failed")]
    base = [j("a", 0.5), j("b", 0.5), j("c", 1.0), j("d", 0.0), j("e", 1.0)]
    r = win_rate(new, base)
    assert (r["wins"], r["ties"], r["losses"], r["n"], r["unjudged"]) == (2, 1, 1, 4, 1)
    assert r["win_rate"] == (2 + 0.5) / 4


def test_win_rate_with_nothing_judged_is_none():
    assert win_rate([j("a", None, "failed")], [j("a", 1.0)])["win_rate"] is None


def test_summary_pass_rates():
    js = [
        j("a", 1.0, passed={"lowercase": True, "max_words(n=3)": True}),
        j("b", 0.5, passed={"lowercase": False, "max_words(n=5)": True}),
        j("c", None, "failed"),
    ]
    s = summarize(js)
    assert s["n"] == 2 and s["failed"] == 1
    assert s["pass_rate"] == 0.5 and s["constraint_pass_rate"] == 0.75
    assert s["per_constraint"] == {"lowercase": 0.5, "max_words": 1.0}

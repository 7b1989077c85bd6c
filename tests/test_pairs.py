from nash.pairs import select_pairs
from nash.records import Judgment, Sample


def make(scores: dict[str, list[float | None]]):
    samples, judgments = [], []
    for pid, cand_scores in scores.items():
        for k, s in enumerate(cand_scores):
            samples.append(Sample(prompt_id=pid, candidate=k, prompt=f"q {pid}", response=f"{pid}-{k}",
                                  num_tokens=3, policy="iter_000"))
            judgments.append(Judgment(prompt_id=pid, candidate=k, judge="t",
                                      outcome="failed" if s is None else "scored", score=s))
    return samples, judgments


def test_best_pair_is_top_against_bottom():
    pairs, stats = select_pairs(*make({"a": [0.5, 1.0, 0.0, 0.5]}), 0.5, 0.5, "best")
    assert [(p.chosen, p.rejected, p.margin) for p in pairs] == [("a-1", "a-2", 1.0)]
    assert stats.pairs == 1 and stats.prompts_with_pairs == 1 and stats.prompts_dropped == 0


def test_ties_break_by_candidate_index():
    pairs, _ = select_pairs(*make({"a": [0.0, 1.0, 1.0, 0.0]}), 0.5, 0.5, "best")
    assert (pairs[0].chosen_candidate, pairs[0].rejected_candidate) == (1, 3)


def test_all_equal_scores_drop_the_prompt():
    pairs, stats = select_pairs(*make({"a": [1.0] * 4, "b": [0.0] * 4}), 0.5, 0.5, "best")
    assert pairs == [] and stats.prompts_dropped == 2
    assert stats.drop_reasons == {"all scores equal": 2}


def test_no_qualifying_pair():
    # Best below the chosen threshold, and a margin too small: both dropped, each for its reason.
    pairs, stats = select_pairs(*make({"low": [0.4, 0.0], "close": [1.0, 0.75]}), 0.5, 0.5, "best")
    assert pairs == []
    assert stats.drop_reasons == {"best below min_chosen_score": 1, "margin below min_margin": 1}


def test_margin_exactly_at_threshold_is_kept():
    pairs, _ = select_pairs(*make({"a": [1.0, 0.5]}), 0.5, 0.5, "best")
    assert len(pairs) == 1 and pairs[0].margin == 0.5


def test_all_mode_keeps_every_qualifying_pair():
    pairs, stats = select_pairs(*make({"a": [1.0, 0.5, 0.0, 1.0]}), 0.5, 0.5, "all")
    got = {(p.chosen_candidate, p.rejected_candidate) for p in pairs}
    assert got == {(0, 1), (0, 2), (3, 1), (3, 2), (1, 2)}
    assert stats.pairs == 5 and stats.prompts_with_pairs == 1
    assert all(p.chosen_score - p.rejected_score >= 0.5 and p.chosen_score >= 0.5 for p in pairs)


def test_failed_judgments_never_make_a_pair():
    pairs, stats = select_pairs(*make({"a": [None, 0.0, 1.0], "b": [None, None, 1.0]}), 0.5, 0.5, "all")
    assert {(p.prompt_id, p.chosen_candidate, p.rejected_candidate) for p in pairs} == {("a", 2, 1)}
    assert stats.failed_candidates == 3
    assert stats.drop_reasons == {"fewer than 2 scored candidates": 1}


def test_max_min_pairs_highest_with_lowest_and_skips_ties():
    pairs, stats = select_pairs(*make({"a": [2.1, 4.5, 0.3, 4.5], "b": [3.0, 3.0, 3.0, 3.0], "c": [None, 1.0, 1.2]}),
                                0.0, 0.0, rule="max_min")
    got = {(p.prompt_id, p.chosen_candidate, p.rejected_candidate) for p in pairs}
    assert got == {("a", 1, 2), ("c", 2, 1)}
    assert stats.drop_reasons == {"all scores equal": 1} and stats.failed_candidates == 1

from nash.pairs import TEACHER, PairStats, finish_stats, length_guard, replay, select_pairs, spin_pairs
from nash.records import Judgment, Pair, Sample


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


def with_teacher(scores: dict[str, list[float]]):
    """The last candidate of each prompt is the gold answer (policy 'reference')."""
    samples, judgments = make(scores)
    last = {}
    for s in samples:
        last[s.prompt_id] = s
    for s in last.values():
        s.policy = TEACHER
    return samples, judgments


def test_teacher_chosen_needs_the_full_margin():
    # Gold 6 vs samples 5 and 3: teacher over student needs the full margin 2, so (gold, 5) does not qualify.
    pairs, stats = select_pairs(*with_teacher({"a": [5, 3, 6]}), 5, 2, "all", teacher_margin=1)
    assert [(p.chosen_policy, p.rejected_candidate, p.margin) for p in pairs] == [(TEACHER, 1, 3),
                                                                                   ("iter_000", 1, 2)]
    assert stats.teacher_chosen == 1 and stats.teacher_rejected == 0


def test_student_chosen_over_teacher_uses_the_smaller_margin():
    # Student 6 over gold 5: margin 1 qualifies against the teacher (teacher_margin 1) ...
    pairs, stats = select_pairs(*with_teacher({"a": [6, 5.5, 5]}), 5, 2, "all", teacher_margin=1)
    assert {(p.chosen_candidate, p.rejected_candidate) for p in pairs} == {(0, 2)}
    assert stats.teacher_rejected == 1
    # ... but not between two students (6 vs 5.5 needs 2), and not without teacher_margin.
    pairs, stats = select_pairs(*with_teacher({"a": [6, 5.5, 5]}), 5, 2, "all")
    assert pairs == [] and stats.drop_reasons == {"margin below min_margin": 1}


def test_best_is_the_largest_margin_pair_with_teacher():
    pairs, _ = select_pairs(*with_teacher({"a": [6, 2, 5]}), 5, 2, "best", teacher_margin=1)
    assert [(p.chosen_candidate, p.rejected_candidate) for p in pairs] == [(0, 1)]


def test_spin_pairs_gold_over_own_samples():
    samples, _ = with_teacher({"a": [0, 0, 0], "b": [0, 0]})
    samples = [s for s in samples if not (s.prompt_id == "b" and s.policy == TEACHER)]  # b has no gold
    samples.append(Sample(prompt_id="c", candidate=0, prompt="q c", response="same", num_tokens=1, policy="iter_000"))
    samples.append(Sample(prompt_id="c", candidate=1, prompt="q c", response="same", num_tokens=1, policy=TEACHER))
    pairs, stats = spin_pairs(samples, "all", iteration=3)
    assert [(p.prompt_id, p.chosen, p.rejected, p.iteration) for p in pairs] == [("a", "a-2", "a-0", 3),
                                                                                   ("a", "a-2", "a-1", 3)]
    assert all(p.margin is None and p.chosen_policy == TEACHER for p in pairs)
    assert stats.drop_reasons == {"no reference answer": 1, "sample equals reference": 1}
    best, _ = spin_pairs(samples, "best")
    assert [(p.prompt_id, p.rejected) for p in best] == [("a", "a-0")]


def lengths(pairs_, chosen_rejected):
    for p, (c, r) in zip(pairs_, chosen_rejected):
        p.chosen_tokens, p.rejected_tokens = c, r
    return pairs_


def test_length_guard_drops_much_longer_chosen_and_reports_mean_lengths():
    pairs, stats = select_pairs(*make({"a": [1, 0], "b": [1, 0], "c": [1, 0]}), 0.5, 0.5)
    pairs = lengths(pairs, [(30, 10), (15, 10), (5, 20)])
    kept = length_guard(pairs, 1.5, stats)
    assert [p.prompt_id for p in kept] == ["b", "c"] and stats.length_guard_dropped == 1 and stats.pairs == 2
    finish_stats(stats, kept)
    assert (stats.chosen_mean_tokens, stats.rejected_mean_tokens, stats.training_pairs) == (10.0, 15.0, 2)


def test_replay_shares_and_shortfall():
    old = lambda i, n: [Pair(prompt_id=f"{i}-{k}", prompt="q", chosen="c", rejected="r", chosen_candidate=0,  # noqa: E731
                             rejected_candidate=1, iteration=i) for k in range(n)]
    stats = PairStats()
    # 11 fresh pairs with shares 0.3 / 0.15: a training set of 20, so 6 from t-1 and 3 from t-2.
    got = replay(11, [(4, old(4, 50)), (3, old(3, 50))], [0.3, 0.15], seed=0, stats=stats)
    assert stats.replayed == {"iter_004": {"requested": 6, "drawn": 6}, "iter_003": {"requested": 3, "drawn": 3}}
    assert [p.iteration for p in got] == [4] * 6 + [3] * 3 and len({p.prompt_id for p in got}) == 9
    # An earlier iteration with fewer pairs gives what it has; a missing one (t-2 before iteration 1) gives none.
    stats = PairStats()
    got = replay(11, [(1, old(1, 2))], [0.3, 0.15], seed=0, stats=stats)
    assert stats.replayed == {"iter_001": {"requested": 6, "drawn": 2}} and len(got) == 2
    # The same seed draws the same pairs.
    again = replay(11, [(4, old(4, 50))], [0.3], seed=0, stats=PairStats())
    assert [p.prompt_id for p in again] == [p.prompt_id for p in replay(11, [(4, old(4, 50))], [0.3], 0, PairStats())]

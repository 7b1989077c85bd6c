import pytest

from nash import constraints

CASES = [
    ({"kind": "lowercase"}, "all quiet here.", "All quiet here."),
    ({"kind": "uppercase"}, "ALL QUIET HERE.", "ALL quiet HERE."),
    ({"kind": "max_words", "n": 3}, "one two three", "one two three four"),
    ({"kind": "bullets", "n": 2}, "- a\n- b", "- a\n- b\n- c"),
    ({"kind": "keyword", "word": "balance"}, "Find your Balance.", "Find your balances."),
    ({"kind": "no_commas"}, "no commas at all", "one, two"),
    ({"kind": "end_phrase", "phrase": "That is all."}, "Sun is hot. That is all.", "That is all. Sun is hot."),
    ({"kind": "start_word", "word": "Yes"}, "Yes, it is.", "Well yes."),
    ({"kind": "quotes"}, '"quoted"', 'not "quoted"'),
]


@pytest.mark.parametrize("constraint,good,bad", CASES, ids=[c[0]["kind"] for c in CASES])
def test_check(constraint, good, bad):
    constraints.validate(constraint)
    assert constraints.check(constraint, good)
    assert not constraints.check(constraint, bad)
    assert constraints.describe(constraint)


def test_empty_response_fails_every_content_check():
    for kind, _, _ in CASES:
        assert not constraints.check(kind, "")


def test_validate_names_the_problem():
    with pytest.raises(constraints.ConstraintError, match="unknown constraint kind 'shout'"):
        constraints.validate({"kind": "shout"})
    with pytest.raises(constraints.ConstraintError, match=r"takes parameters \['n'\]"):
        constraints.validate({"kind": "max_words"})

"""Verifiable instructions: each kind renders its instruction text and checks a response.

The built-in prompts attach these to tasks, and the rules judge scores a response by the
share of its prompt's constraints it satisfies. A constraint is stored as plain data
(`{"kind": "max_words", "n": 25}`) so prompt files stay readable and editable.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from nash.errors import UserError

_BULLET = re.compile(r"^\s*[-*•]\s+\S")


def _words(text: str) -> list[str]:
    return re.findall(r"[A-Za-z0-9']+", text)


def _strip_trailing(text: str) -> str:
    return text.strip().rstrip("\"' \n")


@dataclass(frozen=True)
class ConstraintKind:
    name: str
    params: tuple[str, ...]
    describe: Callable[..., str]
    check: Callable[..., bool]


KINDS: dict[str, ConstraintKind] = {
    k.name: k
    for k in [
        ConstraintKind(
            "lowercase",
            (),
            lambda: "Write your entire answer in lowercase letters, with no capital letters at all.",
            lambda r: any(c.isalpha() for c in r) and r == r.lower(),
        ),
        ConstraintKind(
            "uppercase",
            (),
            lambda: "Write your entire answer in capital letters.",
            lambda r: any(c.isalpha() for c in r) and r == r.upper(),
        ),
        ConstraintKind(
            "max_words",
            ("n",),
            lambda n: f"Use at most {n} words.",
            lambda r, n: 0 < len(_words(r)) <= n,
        ),
        ConstraintKind(
            "bullets",
            ("n",),
            lambda n: f"Format the answer as exactly {n} bullet points, each on its own line starting with '- '.",
            lambda r, n: sum(bool(_BULLET.match(line)) for line in r.splitlines()) == n,
        ),
        ConstraintKind(
            "keyword",
            ("word",),
            lambda word: f"Include the word '{word}' in your answer.",
            lambda r, word: re.search(rf"\b{re.escape(word)}\b", r, re.IGNORECASE) is not None,
        ),
        ConstraintKind(
            "no_commas",
            (),
            lambda: "Do not use any commas in your answer.",
            lambda r: bool(r.strip()) and "," not in r,
        ),
        ConstraintKind(
            "end_phrase",
            ("phrase",),
            lambda phrase: f"End your answer with the exact phrase '{phrase}' and nothing after it.",
            lambda r, phrase: _strip_trailing(r).endswith(phrase.rstrip("\"' ")),
        ),
        ConstraintKind(
            "start_word",
            ("word",),
            lambda word: f"Start your answer with the word '{word}'.",
            lambda r, word: re.match(rf"^\W*{re.escape(word)}\b", r.strip()) is not None,
        ),
        ConstraintKind(
            "quotes",
            (),
            lambda: "Wrap your entire answer in double quotation marks.",
            lambda r: len(r.strip()) > 1 and r.strip()[0] == '"' and r.strip()[-1] == '"',
        ),
    ]
}


class ConstraintError(UserError, ValueError):
    pass


def validate(constraint: dict) -> None:
    kind = KINDS.get(constraint.get("kind", ""))
    if kind is None:
        raise ConstraintError(
            f"unknown constraint kind {constraint.get('kind')!r}; known: {', '.join(KINDS)}"
        )
    given = set(constraint) - {"kind"}
    if given != set(kind.params):
        raise ConstraintError(
            f"constraint {kind.name!r} takes parameters {list(kind.params)}, got {sorted(given)}"
        )


def describe(constraint: dict) -> str:
    kind = KINDS[constraint["kind"]]
    return kind.describe(**{p: constraint[p] for p in kind.params})


def check(constraint: dict, response: str) -> bool:
    kind = KINDS[constraint["kind"]]
    return bool(kind.check(response, **{p: constraint[p] for p in kind.params}))


def label(constraint: dict) -> str:
    """Short stable name for reports, e.g. `max_words(n=25)`."""
    args = ",".join(f"{k}={v}" for k, v in constraint.items() if k != "kind")
    return f"{constraint['kind']}({args})" if args else constraint["kind"]

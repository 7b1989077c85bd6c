"""The judge protocol: score the K candidates of one prompt.

A judge returns one `Judgment` per candidate, in order. A candidate the judge could not
score is a `failed` judgment, never a made-up score, so pair selection can leave it out
and the manifest can count it.
"""

from __future__ import annotations

from typing import Protocol

from nash.records import Judgment, Prompt


class Judge(Protocol):
    name: str

    def score(self, prompt: Prompt, candidates: list[str]) -> list[Judgment]:
        ...

"""Pair selection: turn judged candidates into preference pairs.

`max_min` (Self-Rewarding) pairs the highest-scored candidate with the lowest and skips
a prompt whose extremes tie. The DNO rule keeps a pair only when the chosen candidate scores at least
`min_chosen_score` and beats the rejected one by at least `min_margin`. Candidates whose
judgment failed take part in no pair. A prompt with no qualifying pair is dropped and
counted, never padded with a weak pair.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from nash.records import Judgment, Pair, Sample


@dataclass
class PairStats:
    prompts: int = 0
    prompts_with_pairs: int = 0
    prompts_dropped: int = 0
    pairs: int = 0
    failed_candidates: int = 0
    drop_reasons: dict[str, int] = field(default_factory=dict)


def _dno_pairs(scored: list[tuple[int, float]], min_chosen: float, min_margin: float, per_prompt: str):
    # Sort by score, then candidate index, so ties break the same way on every run.
    ranked = sorted(scored, key=lambda cs: (-cs[1], cs[0]))
    if per_prompt == "best":
        (ci, cs), (ri, rs) = ranked[0], ranked[-1]
        ok = cs >= min_chosen and cs - rs >= min_margin
        return [(ci, ri)] if ok else []
    return [
        (ci, ri)
        for ci, cs in ranked
        if cs >= min_chosen
        for ri, rs in ranked
        if cs - rs >= min_margin
    ]


def _max_min_pairs(scored: list[tuple[int, float]]):
    """Self-Rewarding: the highest against the lowest score; a tie between them skips the prompt."""
    ranked = sorted(scored, key=lambda cs: (-cs[1], cs[0]))
    (ci, cs), (ri, rs) = ranked[0], ranked[-1]
    return [(ci, ri)] if cs > rs else []


def select_pairs(
    samples: list[Sample],
    judgments: list[Judgment],
    min_chosen_score: float,
    min_margin: float,
    per_prompt: str = "best",
    rule: str = "dno",
) -> tuple[list[Pair], PairStats]:
    by_key = {(s.prompt_id, s.candidate): s for s in samples}
    scores: dict[str, list[tuple[int, float]]] = defaultdict(list)
    stats = PairStats()
    prompt_ids = list(dict.fromkeys(s.prompt_id for s in samples))
    for j in judgments:
        if j.outcome == "scored" and j.score is not None:
            scores[j.prompt_id].append((j.candidate, j.score))
        else:
            stats.failed_candidates += 1
    reasons: dict[str, int] = defaultdict(int)
    pairs = []
    for pid in prompt_ids:
        stats.prompts += 1
        scored = scores.get(pid, [])
        if len(scored) < 2:
            reasons["fewer than 2 scored candidates"] += 1
            continue
        if rule == "max_min":
            chosen = _max_min_pairs(scored)
        else:
            chosen = _dno_pairs(scored, min_chosen_score, min_margin, per_prompt)
        if not chosen:
            top, bottom = max(s for _, s in scored), min(s for _, s in scored)
            reasons["all scores equal" if top == bottom else
                    "best below min_chosen_score" if top < min_chosen_score else "margin below min_margin"] += 1
            continue
        stats.prompts_with_pairs += 1
        score_of = dict(scored)
        for ci, ri in chosen:
            c, r = by_key[(pid, ci)], by_key[(pid, ri)]
            pairs.append(
                Pair(prompt_id=pid, prompt=c.prompt, chosen=c.response, rejected=r.response,
                     chosen_candidate=ci, rejected_candidate=ri, chosen_score=score_of[ci],
                     rejected_score=score_of[ri], margin=score_of[ci] - score_of[ri])
            )
    stats.prompts_dropped = stats.prompts - stats.prompts_with_pairs
    stats.pairs = len(pairs)
    stats.drop_reasons = dict(reasons)
    return pairs, stats

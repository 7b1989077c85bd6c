"""Pair selection: turn judged candidates into preference pairs, plus replay and a length guard.

Rules (`pairs.rule`):
- `dno`: a pair (chosen, rejected) qualifies when chosen scores at least `min_chosen_score`
  and beats rejected by at least `min_margin`, or by `teacher_margin` when a policy sample
  is chosen over the gold answer. `per_prompt: best` keeps the largest-margin pair of a
  prompt, `all` every qualifying one.
- `max_min` (Self-Rewarding): the highest-scored candidate against the lowest; a tie between
  them skips the prompt.
- `spin`: the gold answer chosen over the policy's own sample; no judge.

Candidates whose judgment failed take part in no pair. A prompt with no qualifying pair is
dropped and counted, never padded with a weak pair.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field

from nash.records import Judgment, Pair, Sample, grouped

TEACHER = "reference"  # Sample.policy of a gold answer that joined the candidates


@dataclass
class PairStats:
    prompts: int = 0
    prompts_with_pairs: int = 0
    prompts_dropped: int = 0
    pairs: int = 0  # fresh pairs of this iteration, after the length guard
    failed_candidates: int = 0
    drop_reasons: dict[str, int] = field(default_factory=dict)
    length_guard_dropped: int = 0
    teacher_chosen: int = 0
    teacher_rejected: int = 0
    replayed: dict[str, dict[str, int]] = field(default_factory=dict)  # "iter_NNN": {"requested", "drawn"}
    training_pairs: int = 0  # fresh + replayed
    chosen_mean_tokens: float | None = None  # over the training pairs
    rejected_mean_tokens: float | None = None


def _dno_pairs(scored, teacher, min_chosen, min_margin, teacher_margin, per_prompt):
    found = []
    for ci, cs in scored:
        if cs < min_chosen:
            continue
        for ri, rs in scored:
            need = teacher_margin if (ri in teacher and ci not in teacher) else min_margin
            if ri != ci and cs > rs and cs - rs >= need:
                found.append((ci, ri, cs - rs, cs))
    # Largest margin first, then higher chosen score; ties break on candidate index, the same on every run.
    found.sort(key=lambda f: (-f[2], -f[3], f[0], -f[1]))
    pairs = [(ci, ri) for ci, ri, _, _ in found]
    return pairs[:1] if per_prompt == "best" else pairs


def _max_min_pairs(scored):
    ranked = sorted(scored, key=lambda cs: (-cs[1], cs[0]))
    (ci, cs), (ri, rs) = ranked[0], ranked[-1]
    return [(ci, ri)] if cs > rs else []


def _drop_reason(scored, min_chosen):
    top, bottom = max(s for _, s in scored), min(s for _, s in scored)
    if top == bottom:
        return "all scores equal"
    return "best below min_chosen_score" if top < min_chosen else "margin below min_margin"


def select_pairs(samples: list[Sample], judgments: list[Judgment], *args, **kwargs) -> tuple[list[Pair], PairStats]:
    """`select_grouped` on lists held in memory."""
    judged = dict(_by_prompt(judgments))
    groups = ((pid, group, judged.get(pid, [])) for pid, group in _by_prompt(samples))
    return select_grouped(groups, *args, **kwargs)


def select_grouped(
    groups: Iterable[tuple[str, list[Sample], list[Judgment]]],
    min_chosen_score: float,
    min_margin: float,
    per_prompt: str = "best",
    rule: str = "dno",
    teacher_margin: float | None = None,
    iteration: int | None = None,
) -> tuple[list[Pair], PairStats]:
    """Judged pairs by the `dno` or `max_min` rule, prompt by prompt: (prompt id, its samples, its
    judgments) at a time, so that only the pairs kept are held."""
    stats = PairStats()
    reasons: dict[str, int] = defaultdict(int)
    pairs = []
    for pid, samples, judgments in groups:
        stats.prompts += 1
        by_candidate = {s.candidate: s for s in samples}
        scored = []
        for j in judgments:
            if j.outcome == "scored" and j.score is not None:
                scored.append((j.candidate, j.score))
            else:
                stats.failed_candidates += 1
        if len(scored) < 2:
            reasons["fewer than 2 scored candidates"] += 1
            continue
        if rule == "max_min":
            chosen = _max_min_pairs(scored)
        else:
            teacher = {c for c, _ in scored if by_candidate[c].policy == TEACHER}
            chosen = _dno_pairs(scored, teacher, min_chosen_score, min_margin,
                                teacher_margin if teacher_margin is not None else min_margin, per_prompt)
        if not chosen:
            reasons[_drop_reason(scored, min_chosen_score)] += 1
            continue
        stats.prompts_with_pairs += 1
        score_of = dict(scored)
        pairs += [_pair(by_candidate[ci], by_candidate[ri], score_of[ci], score_of[ri], iteration)
                  for ci, ri in chosen]
    stats.drop_reasons = dict(reasons)
    return pairs, _count(stats, pairs)


def spin_pairs(samples: Iterable[Sample], per_prompt: str = "best",
               iteration: int | None = None) -> tuple[list[Pair], PairStats]:
    """SPIN: each prompt's gold answer chosen over the policy's samples (`best`: the first sample only)."""
    groups = _by_prompt(samples) if isinstance(samples, list) else grouped(samples)
    return spin_grouped(groups, per_prompt, iteration)


def _by_prompt(records: list):
    """(prompt id, its records) in first-seen order, for records held in memory."""
    out: dict[str, list] = defaultdict(list)
    for r in records:
        out[r.prompt_id].append(r)
    return out.items()


def spin_grouped(groups: Iterable[tuple[str, list[Sample]]], per_prompt: str = "best",
                 iteration: int | None = None) -> tuple[list[Pair], PairStats]:
    stats, reasons, pairs = PairStats(), defaultdict(int), []
    for pid, group in groups:
        gold = next((s for s in group if s.policy == TEACHER), None)
        mine = [s for s in group if s.policy != TEACHER]
        if not mine:
            continue
        stats.prompts += 1
        if gold is None:
            reasons["no reference answer"] += 1
            continue
        rejected = [s for s in sorted(mine, key=lambda s: s.candidate) if s.response.strip() != gold.response.strip()]
        if not rejected:
            reasons["sample equals reference"] += 1
            continue
        stats.prompts_with_pairs += 1
        pairs += [_pair(gold, s, None, None, iteration) for s in rejected[: 1 if per_prompt == "best" else None]]
    stats.drop_reasons = dict(reasons)
    return pairs, _count(stats, pairs)


def _pair(c: Sample, r: Sample, cs: float | None, rs: float | None, iteration: int | None) -> Pair:
    return Pair(
        prompt_id=c.prompt_id, prompt=c.prompt, chosen=c.response, rejected=r.response,
        chosen_candidate=c.candidate, rejected_candidate=r.candidate, chosen_score=cs, rejected_score=rs,
        margin=None if cs is None else cs - rs, chosen_tokens=c.num_tokens, rejected_tokens=r.num_tokens,
        chosen_policy=c.policy, rejected_policy=r.policy, iteration=iteration,
    )


def _count(stats: PairStats, pairs: list[Pair]) -> PairStats:
    stats.prompts_dropped = stats.prompts - stats.prompts_with_pairs
    stats.pairs = len(pairs)
    stats.teacher_chosen = sum(p.chosen_policy == TEACHER for p in pairs)
    stats.teacher_rejected = sum(p.rejected_policy == TEACHER for p in pairs)
    return stats


def length_guard(pairs: list[Pair], max_ratio: float, stats: PairStats) -> list[Pair]:
    """Drop pairs whose chosen answer is more than `max_ratio` times as long as the rejected one."""
    kept = [p for p in pairs if p.chosen_tokens is None or p.chosen_tokens <= max_ratio * max(p.rejected_tokens or 0, 1)]
    stats.length_guard_dropped = len(pairs) - len(kept)
    stats.pairs = len(kept)
    return kept


def replay(fresh: int, earlier: list[tuple[int, list[Pair]]], shares: list[float], seed: int,
           stats: PairStats) -> list[Pair]:
    """Draw pairs of earlier iterations so that lag k makes up `shares[k-1]` of the training set.

    `earlier` holds (iteration, its own fresh pairs) for t-1, t-2, ... With F fresh pairs the
    training set is F / (1 - sum(shares)), so lag k asks for round(share_k * F / (1 - sum));
    an iteration with fewer pairs gives all it has and the shortfall is reported.
    """
    total = fresh / (1.0 - sum(shares)) if shares else fresh
    drawn = []
    for share, (index, pool) in zip(shares, earlier):
        want = round(share * total)
        got = random.Random(seed * 1_000_003 + index).sample(pool, min(want, len(pool)))
        stats.replayed[f"iter_{index:03d}"] = {"requested": want, "drawn": len(got)}
        drawn += got
    return drawn


def finish_stats(stats: PairStats, training: list[Pair]) -> PairStats:
    stats.training_pairs = len(training)
    for side in ("chosen", "rejected"):
        lengths = [getattr(p, f"{side}_tokens") for p in training if getattr(p, f"{side}_tokens") is not None]
        setattr(stats, f"{side}_mean_tokens", round(sum(lengths) / len(lengths), 1) if lengths else None)
    return stats

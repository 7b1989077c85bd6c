"""The `composite` judge: several judges' scores combined into one.

`mean`: a weighted mean. `gated`: the first component is a gate scoring 0..1 (the `quality`
judge: is this a real answer?) and the score is gate × (1 + weighted mean of the others) / 2, so
a real answer that meets no constraint (0.5) still beats an empty one that meets them all (0).
A candidate is scored only when every component scored it; if any component failed, the
composite judgment fails too, naming the component, rather than combining what is left.
Component scales differ (rules 0..1, pointwise 0..5, batched 1..6): choose weights with that
in mind.
"""

from __future__ import annotations

from nash.records import USAGE, Judgment, Prompt


class CompositeJudge:
    name = "composite"

    def __init__(self, components: list, weights: list[float] | None = None, combine: str = "mean"):
        self.components = components
        self.weights = weights or [1.0] * len(components)
        self.combine = combine
        self.concurrency = max(getattr(c, "concurrency", 1) for c in components)

    def _combine(self, scores: list[float]) -> float:
        if self.combine == "gated":
            rest = sum(w * s for w, s in zip(self.weights[1:], scores[1:])) / sum(self.weights[1:])
            return scores[0] * (1 + rest) / 2
        return sum(w * s for w, s in zip(self.weights, scores)) / sum(self.weights)

    def score(self, prompt: Prompt, candidates: list[str]) -> list[Judgment]:
        return self.score_batch([(prompt, candidates)])[0]

    def score_batch(self, items: list[tuple[Prompt, list[str]]]) -> list[list[Judgment]]:
        """Each component's `score_batch` over all the items, then the scores combined per candidate."""
        per_judge = [c.score_batch(items) if hasattr(c, "score_batch") else [c.score(p, cs) for p, cs in items]
                     for c in self.components]
        return [self._merge(prompt, [js[n] for js in per_judge]) for n, (prompt, _) in enumerate(items)]

    def _merge(self, prompt: Prompt, per_judge: list[list[Judgment]]) -> list[Judgment]:
        out = []
        for k in range(len(per_judge[0])):
            parts = [js[k] for js in per_judge]
            usage = {key: sum(getattr(p, key) for p in parts) for key in USAGE}
            details = {"components": [{"judge": p.judge, "score": p.score, "outcome": p.outcome,
                                       "details": p.details} for p in parts]}
            failed = [p for p in parts if p.outcome != "scored"]
            if failed:
                out.append(Judgment(prompt_id=prompt.id, candidate=k, judge=self.name, outcome="failed",
                                    details=details, error=f"{failed[0].judge}: {failed[0].error}", **usage))
                continue
            out.append(Judgment(prompt_id=prompt.id, candidate=k, judge=self.name, outcome="scored",
                                score=self._combine([p.score for p in parts]), details=details, **usage))
        return out

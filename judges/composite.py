"""The `composite` judge: a weighted mean of several judges' scores.

A candidate is scored only when every component scored it; if any component failed, the
composite judgment fails too, naming the component, rather than averaging what is left.
Component scales differ (rules 0..1, pointwise 0..5, batched 1..6): choose weights with that
in mind.
"""

from __future__ import annotations

from nash.records import USAGE, Judgment, Prompt


class CompositeJudge:
    name = "composite"

    def __init__(self, components: list, weights: list[float] | None = None):
        self.components = components
        self.weights = weights or [1.0] * len(components)
        self.concurrency = max(getattr(c, "concurrency", 1) for c in components)

    def score(self, prompt: Prompt, candidates: list[str]) -> list[Judgment]:
        per_judge = [c.score(prompt, candidates) for c in self.components]
        out = []
        for k in range(len(candidates)):
            parts = [js[k] for js in per_judge]
            usage = {key: sum(getattr(p, key) for p in parts) for key in USAGE}
            details = {"components": [{"judge": p.judge, "score": p.score, "outcome": p.outcome} for p in parts]}
            failed = [p for p in parts if p.outcome != "scored"]
            if failed:
                out.append(Judgment(prompt_id=prompt.id, candidate=k, judge=self.name, outcome="failed",
                                    details=details, error=f"{failed[0].judge}: {failed[0].error}", **usage))
                continue
            score = sum(w * p.score for w, p in zip(self.weights, parts)) / sum(self.weights)
            out.append(Judgment(prompt_id=prompt.id, candidate=k, judge=self.name, outcome="scored", score=score,
                                details=details, **usage))
        return out

"""The `cascade` judge: a cheap student scores every candidate; the teacher judges the prompts it is unsure of.

The student is a reward model (by default the run's distilled one, `nash distill`). For each
prompt it scores all candidates; the decisive margin is its best candidate's score minus its
worst's. A prompt whose margin reaches the threshold (chosen on the distillation's held-out
prompts to meet `judge.agreement`) keeps the student's scores, mapped onto the teacher's
scale so pair selection's thresholds mean the same thing; every other prompt, and any prompt
the student could not score, goes to the teacher, with the teacher's own cache and budget.

Every judgment says which judge decided (`judge` is the student's or the teacher's name, and
`details.decided_by` is `student` or `teacher`, with the student's score and the margin). A
teacher's failed judgment stays failed: the student's score never stands in for it.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

from nash.records import Judgment, Prompt


class CascadeJudge:
    name = "cascade"
    concurrency = 1  # judged in chunks: the student batches, the teacher keeps its own concurrency

    def __init__(self, student, teacher, threshold: float | None, score_map: dict | None = None,
                 chunk_candidates: int = 256, routing: str = "no student: the teacher decides every prompt"):
        self.student, self.teacher = student, teacher
        self.components = [c for c in (student, teacher) if c is not None]  # close_judge reaches both
        self.threshold = threshold
        self.score_map = score_map
        self.batch_requests = chunk_candidates
        self.routing = routing  # why the threshold is what it is, for the manifest

    @staticmethod
    def prompt_requests(k: int) -> int:
        return k

    def score(self, prompt: Prompt, candidates: list[str]) -> list[Judgment]:
        return self.score_batch([(prompt, candidates)])[0]

    def score_batch(self, items: list[tuple[Prompt, list[str]]]) -> list[list[Judgment]]:
        from nash.distill import apply_map

        cheap = self.student.score_batch(items) if self.student is not None and self.threshold is not None else None
        out: list[list[Judgment] | None] = [None] * len(items)
        unsure, margins = [], [None] * len(items)
        for n in range(len(items)):
            js = cheap[n] if cheap is not None else []
            if js and all(j.outcome == "scored" for j in js) and len(js) >= 2:
                margins[n] = max(j.score for j in js) - min(j.score for j in js)
            if margins[n] is not None and margins[n] >= self.threshold:
                out[n] = [Judgment(prompt_id=j.prompt_id, candidate=j.candidate, judge=j.judge, outcome="scored",
                                   score=apply_map(self.score_map, j.score),
                                   details={"decided_by": "student", "student_score": j.score, "margin": margins[n]})
                          for j in js]
            else:
                unsure.append(n)
        if unsure:
            for n, js in zip(unsure, self._teach([items[n] for n in unsure])):
                for k, j in enumerate(js):
                    student_score = cheap[n][k].score if cheap is not None else None
                    j.details = {**j.details, "decided_by": "teacher", "student_score": student_score,
                                 "margin": margins[n]}
                out[n] = js
        return out

    def _teach(self, items: list[tuple[Prompt, list[str]]]) -> list[list[Judgment]]:
        if hasattr(self.teacher, "score_batch"):
            return self.teacher.score_batch(items)
        with ThreadPoolExecutor(max(1, getattr(self.teacher, "concurrency", 1))) as pool:
            return list(pool.map(lambda it: self.teacher.score(*it), items))


def build_cascade(cfg, build) -> CascadeJudge:
    """The cascade of section `cfg` (its student's model already a path, or still `distill:...` when the run
    has no distilled model yet); `build` makes a judge of a section (the teacher)."""
    from nash.distill import PREFIX, read_report, routing_threshold
    from nash.judges.reward_model import RewardModelJudge

    teacher = build(cfg.teacher)
    if cfg.student.model.startswith(PREFIX):
        return CascadeJudge(None, teacher, None)
    report = read_report(cfg.student.model)
    threshold, why = routing_threshold(cfg, report)
    student = RewardModelJudge(cfg.student) if threshold is not None and math.isfinite(threshold) else None
    return CascadeJudge(student, teacher, threshold if student else None,
                        report.get("score_map") if report else None, cfg.chunk_candidates, why)

"""The rules judge: the share of a prompt's verifiable constraints a response satisfies."""

from __future__ import annotations

from nash import constraints
from nash.errors import UserError
from nash.records import Judgment, Prompt


def check_prompts(prompts: list[Prompt], section: str, where: str) -> None:
    """A rules judge scores the share of a prompt's constraints met: a prompt without any cannot be judged."""
    from nash.prompts import name_prompts

    bare = [p for p in prompts if not p.constraints]
    if bare:
        raise UserError(f"{section}: a rules judge checks each prompt's constraints, but {len(bare)} {where} "
                        f"prompt(s) have none: " + name_prompts(bare, lambda p: "no 'constraints'")
                        + "; give each prompt a 'constraints' list or choose another judge")


class RulesJudge:
    name = "rules"
    concurrency = 1
    batch_requests = None  # nothing to batch: judging needs no chunks for it

    def score_batch(self, items: list[tuple[Prompt, list[str]]]) -> list[list[Judgment]]:
        return [self.score(prompt, candidates) for prompt, candidates in items]

    def score(self, prompt: Prompt, candidates: list[str]) -> list[Judgment]:
        if not prompt.constraints:
            raise ValueError(
                f"judge.kind=rules: prompt {prompt.id!r} has no constraints to check; "
                "give each prompt a 'constraints' list or choose another judge"
            )
        out = []
        for i, text in enumerate(candidates):
            passed = {constraints.label(c): constraints.check(c, text) for c in prompt.constraints}
            out.append(
                Judgment(
                    prompt_id=prompt.id,
                    candidate=i,
                    judge=self.name,
                    outcome="scored",
                    score=sum(passed.values()) / len(passed),
                    details={"passed": passed},
                )
            )
        return out

"""Judges: one protocol (`judges.base.Judge`), one module per judge family."""

from __future__ import annotations

from judges.base import Judge


def build_judge(cfg) -> Judge:
    """Build the judge named by `cfg.judge.kind`."""
    if cfg.judge.kind == "rules":
        from judges.rules import RulesJudge

        return RulesJudge()
    raise ValueError(f"judge.kind: unknown judge {cfg.judge.kind!r}")


__all__ = ["Judge", "build_judge"]

"""The judge protocol, and what every judge shares: usage accounting and the budget.

A judge scores the K candidates of one prompt (pointwise, as Self-Rewarding and DNO do),
returning one `Judgment` per candidate in order. A judge that computes on this machine may
also implement `score_batch(items)`: `score` of each (prompt, candidates) item, in order,
computed together, with `batch_requests` (the requests it batches in one pass) and
`prompt_requests(k)` (the requests of a prompt of k candidates), so that judging hands it
about one pass's worth of prompts at once. Judges that can also compare two
candidates directly implement `compare`. A candidate the judge could not score is a
`failed` judgment with the raw reply and the error, never a made-up score, so pair
selection leaves it out and the manifest counts it.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Protocol

from nash.records import Judgment, Prompt


class Judge(Protocol):
    name: str
    concurrency: int  # prompts judged at once

    def score(self, prompt: Prompt, candidates: list[str]) -> list[Judgment]:
        ...


class BatchJudge(Judge, Protocol):
    """A judge that batches across prompts: judging hands it chunks of about `batch_requests` requests."""

    batch_requests: int | None  # requests batched in one pass; None: judged prompt by prompt

    def score_batch(self, items: list[tuple[Prompt, list[str]]]) -> list[list[Judgment]]:
        ...

    def prompt_requests(self, k: int) -> int:
        ...


def request_cost(cfg, tokens_in: int, tokens_out: int) -> float:
    """USD for one request at the judge section's prices per million tokens."""
    return (tokens_in * cfg.price_input_per_mtok + tokens_out * cfg.price_output_per_mtok) / 1e6


class BudgetExhausted(RuntimeError):
    """Raised before a request that the judging budget no longer allows."""


@dataclass
class Budget:
    """Tokens and dollars spent by one judging stage, with optional limits. Thread-safe."""

    max_tokens: int | None = None
    max_usd: float | None = None
    tokens: int = 0
    usd: float = 0.0

    def __post_init__(self):
        self._lock = threading.Lock()

    def check(self) -> None:
        with self._lock:
            if self.max_tokens is not None and self.tokens >= self.max_tokens:
                raise BudgetExhausted(f"judge.budget_tokens={self.max_tokens} spent ({self.tokens} tokens)")
            if self.max_usd is not None and self.usd >= self.max_usd:
                raise BudgetExhausted(f"judge.budget_usd={self.max_usd} spent (${self.usd:.4f})")

    def add(self, tokens: int, usd: float) -> None:
        with self._lock:
            self.tokens += tokens
            self.usd += usd

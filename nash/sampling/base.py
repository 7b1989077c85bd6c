"""What every sampling backend shares: the protocol, its parameters and results, token counts."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from nash.models import load_tokenizer
from nash.supervisor import Progress

THROUGHPUT = ("sequences_per_second", "tokens_per_second", "engine_start_seconds")


@dataclass(frozen=True)
class Completion:
    text: str
    num_tokens: int


@dataclass(frozen=True)
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 96
    seed: int = 0


class Sampler(Protocol):
    def generate(
        self, prompts: list[str], params: SamplingParams, progress: Progress | None = None
    ) -> Sequence[list[Completion]]:
        """`params.n` completions for each prompt, in prompt order (a list, or a view of a journal on disk)."""
        ...


def throughput(sequences: int, tokens: int, seconds: float) -> dict:
    """Sequences and tokens per second of a generation that took `seconds`."""
    return {"sequences_per_second": round(sequences / seconds, 3) if sequences and seconds else None,
            "tokens_per_second": round(tokens / seconds, 1) if sequences and seconds else None}


class TokenCounter:
    """Token counts with the policy's tokenizer where it is on disk, else whitespace words."""

    def __init__(self, model_path: str):
        self.tokenizer = None
        try:
            self.tokenizer = load_tokenizer(model_path)
        except Exception:  # a name only the server knows
            pass

    def count_tokens(self, text: str) -> int:
        if self.tokenizer is None:
            return len(text.split())
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

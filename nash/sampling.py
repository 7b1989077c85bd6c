"""Sampling: K responses per prompt from a policy, through a backend chosen by config.

A sampler takes user prompts (plain text) and applies the policy's chat template itself,
so the same interface fits transformers, vLLM and an OpenAI-compatible server.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from tqdm.auto import tqdm

Progress = Callable[[int, int], None]  # (done, total)


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
    ) -> list[list[Completion]]:
        """Return `params.n` completions for each prompt, in prompt order."""
        ...


class InverseCDFSampler:
    """Logits processor that draws the next token by inverse CDF, one uniform per row.

    `generate(do_sample=True)` draws with `torch.multinomial`, which on a CPU fills an
    exponential variate per vocabulary entry: 95 ms of a 150 ms decode step for 64 rows of
    SmolLM2's 49k vocabulary. One uniform and a cumulative sum draw from the same categorical
    distribution. Returns scores that are -inf except at the drawn token, for greedy selection.
    """

    def __init__(self, temperature: float, top_p: float, generator):
        from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

        self.warpers = LogitsProcessorList([TemperatureLogitsWarper(temperature)]
                                           + ([TopPLogitsWarper(top_p)] if top_p < 1.0 else []))
        self.generator = generator

    def __call__(self, input_ids, scores):
        import torch

        scores = self.warpers(input_ids, scores)
        cdf = torch.softmax(scores.float(), dim=-1).cumsum_(dim=-1)
        u = torch.rand((scores.shape[0], 1), generator=self.generator, device=scores.device) * cdf[:, -1:]
        # right=True: a zero-probability token never holds the first cdf value above u
        token = torch.searchsorted(cdf, u, right=True).clamp_(max=scores.shape[-1] - 1)
        return torch.full_like(scores, float("-inf")).scatter_(1, token, 0.0)


class TransformersSampler:
    """Batched `generate()` on one device; sequences sorted by length to limit padding."""

    def __init__(self, model_path: str, dtype: str = "float32", batch_size: int = 64, device: str | None = None):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer = AutoTokenizer.from_pretrained(model_path, padding_side="left")
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, dtype))
        self.model.to(self.device).eval()
        self.batch_size = batch_size
        eos = self.model.generation_config.eos_token_id
        self.eos_ids = {self.tokenizer.eos_token_id} | set(eos if isinstance(eos, list) else [eos] if eos is not None else [])

    def chat_text(self, prompt: str) -> str:
        return self.tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )

    def generate(self, prompts, params, progress=None, show_progress=True):
        torch, tok = self.torch, self.tokenizer
        texts = [self.chat_text(p) for p in prompts]
        lengths = [len(ids) for ids in tok(texts, add_special_tokens=False)["input_ids"]]
        jobs = sorted(((i, k) for i in range(len(prompts)) for k in range(params.n)), key=lambda j: lengths[j[0]])
        out: list[list[Completion | None]] = [[None] * params.n for _ in prompts]
        greedy = params.temperature == 0.0
        bar = tqdm(total=len(jobs), desc="sampling", unit="seq", leave=False, disable=not show_progress)
        for b, start in enumerate(range(0, len(jobs), self.batch_size)):
            batch = jobs[start : start + self.batch_size]
            enc = tok([texts[i] for i, _ in batch], return_tensors="pt", padding=True, add_special_tokens=False)
            enc = enc.to(self.device)
            draw = None
            if not greedy:
                rng = torch.Generator(device=self.device).manual_seed(params.seed * 1_000_003 + b)
                draw = [InverseCDFSampler(params.temperature, params.top_p, rng)]
            with torch.inference_mode():
                gen = self.model.generate(
                    **enc,
                    max_new_tokens=params.max_new_tokens,
                    do_sample=False,  # greedy over the scores InverseCDFSampler leaves
                    logits_processor=draw,
                    temperature=None,
                    top_p=None,
                    top_k=None,
                    pad_token_id=tok.pad_token_id,
                )
            new = gen[:, enc["input_ids"].shape[1] :]
            for (i, k), ids in zip(batch, new):
                ids = ids.tolist()
                n_tok = next((j + 1 for j, t in enumerate(ids) if t in self.eos_ids), len(ids))
                out[i][k] = Completion(tok.decode(ids[:n_tok], skip_special_tokens=True).strip(), n_tok)
            bar.update(len(batch))
            if progress:
                progress(min(start + len(batch), len(jobs)), len(jobs))
        bar.close()
        return out


def build_sampler(backend: str, model_path: str, dtype: str, batch_size: int) -> Sampler:
    if backend == "transformers":
        return TransformersSampler(model_path, dtype=dtype, batch_size=batch_size)
    raise ValueError(f"sampling.backend: unknown backend {backend!r}")

"""The local judge backend: a causal LM on this machine writes the verdicts.

Used by `self` (the policy that sampled the candidates judges them, as in Self-Rewarding)
and `hf` (any local or hub causal LM). Requests of one prompt are generated as one batch.
"""

from __future__ import annotations

from judges.lm import Reply
from nash.sampling import SamplingParams, TransformersSampler


class LocalBackend:
    def __init__(self, model_path: str, dtype: str = "float32", batch_size: int = 16, seed: int = 0):
        self.identity = {"kind": "local", "model": model_path}
        self.sampler = TransformersSampler(model_path, dtype=dtype, batch_size=batch_size)
        self.seed = seed

    def complete(self, requests, temperature, max_tokens):
        texts = [m[-1]["content"] for m in requests]
        params = SamplingParams(n=1, temperature=temperature, max_new_tokens=max_tokens, seed=self.seed)
        completions = self.sampler.generate(texts, params, show_progress=False)
        tok = self.sampler.tokenizer
        return [
            Reply(text=c[0].text, tokens_in=len(tok(self.sampler.chat_text(t), add_special_tokens=False)["input_ids"]),
                  tokens_out=c[0].num_tokens)
            for t, c in zip(texts, completions)
        ]

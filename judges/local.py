"""The local judge backend: a causal LM on this machine writes the verdicts.

Used by `self` (the policy that sampled the candidates judges them, as in Self-Rewarding)
and `hf` (any local or hub causal LM). Requests of one prompt are generated as one batch.

`weighted` replies skip generation: the reply is prefilled with "Score: " and the score is
the probability-weighted mean of the scale's values from the next-token distribution (the
weighting G-Eval and AlpacaEval 2.0 use). A small model that cannot yet keep to the reply
format still gives a graded score, and one forward pass replaces a whole generation.
"""

from __future__ import annotations

from pathlib import Path

from judges.lm import Reply
from nash.sampling import SamplingParams, TransformersSampler

SCORE_PREFIXES = ("Score: ", "Score:")


class LocalBackend:
    def __init__(self, model_path: str, dtype: str = "float32", batch_size: int = 16, seed: int = 0):
        # A run directory can be deleted and made again at the same path: the weights' size and
        # modification time keep a new model at an old path from being served old replies.
        weights = sorted(Path(model_path).glob("*.safetensors")) if Path(model_path).is_dir() else []
        self.identity = {"kind": "local", "model": model_path,
                         "weights": [(w.name, w.stat().st_size, w.stat().st_mtime_ns) for w in weights]}
        self.sampler = TransformersSampler(model_path, dtype=dtype, batch_size=batch_size)
        self.seed = seed

    def _tokens_in(self, text: str) -> int:
        return len(self.sampler.tokenizer(self.sampler.chat_text(text), add_special_tokens=False)["input_ids"])

    def complete(self, requests, temperature, max_tokens, weighted: tuple[int, int] | None = None):
        texts = [m[-1]["content"] for m in requests]
        if weighted:
            return self._weighted(texts, *weighted)
        params = SamplingParams(n=1, temperature=temperature, max_new_tokens=max_tokens, seed=self.seed)
        completions = self.sampler.generate(texts, params, show_progress=False)
        return [Reply(text=c[0].text, tokens_in=self._tokens_in(t), tokens_out=c[0].num_tokens)
                for t, c in zip(texts, completions)]

    def _value_tokens(self, low: int, high: int) -> tuple[str, dict[int, int]]:
        """A reply prefix and, for each scale value, the one token that writes it after the prefix."""
        tok = self.sampler.tokenizer
        for prefix in SCORE_PREFIXES:
            base = tok.encode(prefix, add_special_tokens=False)
            ids = {}
            for v in range(low, high + 1):
                full = tok.encode(prefix + str(v), add_special_tokens=False)
                if len(full) == len(base) + 1 and full[: len(base)] == base:
                    ids[v] = full[-1]
            if len(ids) == high - low + 1:
                return prefix, ids
        raise ValueError("judge.weighted: this tokenizer does not write each score value as one token")

    def _weighted(self, texts: list[str], low: int, high: int) -> list[Reply]:
        torch, tok, model = self.sampler.torch, self.sampler.tokenizer, self.sampler.model
        prefix, ids = self._value_tokens(low, high)
        chats = [self.sampler.chat_text(t) + prefix for t in texts]
        out = []
        for start in range(0, len(chats), self.sampler.batch_size):
            enc = tok(chats[start : start + self.sampler.batch_size], return_tensors="pt", padding=True,
                      add_special_tokens=False).to(self.sampler.device)
            with torch.inference_mode():
                logits = model(**enc).logits[:, -1, :].float()
            probs = torch.softmax(logits, dim=-1)[:, list(ids.values())]
            mass = probs.sum(dim=-1)
            values = torch.tensor(list(ids), dtype=probs.dtype, device=probs.device)
            expected = (probs * values).sum(dim=-1) / mass
            for row, e, m in zip(enc["input_ids"], expected.tolist(), mass.tolist()):
                n_in = int((row != tok.pad_token_id).sum()) if tok.pad_token_id is not None else len(row)
                out.append(Reply(text=f"{prefix}{e:.4f}\n(weighted over {low}..{high}; probability on the scale {m:.3f})",
                                 tokens_in=n_in, tokens_out=1))
        return out

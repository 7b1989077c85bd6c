"""The local judge backend: a causal LM on this machine writes the verdicts.

Used by `self` (the policy that sampled the candidates judges them, as in Self-Rewarding)
and `hf` (any local or hub causal LM). The requests of one `complete` call (those of a chunk of
prompts: nash.judging) run `batch_size` at a time in one forward pass, whatever their prompts.

`weighted` replies skip generation: the reply is prefilled with "Score: " and the score is
the probability-weighted mean of the scale's values from the next-token distribution (the
weighting G-Eval and AlpacaEval 2.0 use). A small model that cannot yet keep to the reply
format still gives a graded score, and one forward pass replaces a whole generation.
"""

from __future__ import annotations

from pathlib import Path

from nash.judges.lm import Reply
from nash.sampling import SamplingParams
from nash.sampling.hf import TransformersSampler

SCORE_PREFIXES = ("Score: ", "Score:")


class LocalBackend:
    def __init__(self, model_path: str, dtype: str = "float32", batch_size: int = 16, seed: int = 0):
        self.identity = model_identity(model_path, "local", dtype)
        self.sampler = TransformersSampler(model_path, dtype=dtype, batch_size=batch_size)
        self.seed = seed

    def _tokens_in(self, text: str) -> int:
        return len(self.sampler.tokenizer(self.sampler.chat_text(text), add_special_tokens=False)["input_ids"])

    def complete(self, requests, temperature, max_tokens, weighted: tuple[int, int] | str | None = None):
        texts = [m[-1]["content"] for m in requests]
        if weighted == "pairwise":
            return self._weighted_choice(texts)
        if weighted:
            return self._weighted(texts, *weighted)
        params = SamplingParams(n=1, temperature=temperature, max_new_tokens=max_tokens, seed=self.seed)
        completions = self.sampler.generate(texts, params, show_progress=False)
        return [Reply(text=c[0].text, tokens_in=self._tokens_in(t), tokens_out=c[0].num_tokens)
                for t, c in zip(texts, completions)]

    def _option_tokens(self, prefixes, options, required) -> tuple[str, dict[str, int]]:
        return option_tokens(self.sampler.tokenizer, prefixes, options, required)

    def _next_token_probs(self, texts: list[str], prefix: str, ids: list[int]):
        """Per text: probabilities of `ids` as the next token after the prefilled reply, and tokens in."""
        torch, tok, model = self.sampler.torch, self.sampler.tokenizer, self.sampler.model
        chats = [self.sampler.chat_text(t) + prefix for t in texts]
        for start in range(0, len(chats), self.sampler.batch_size):
            enc = tok(chats[start : start + self.sampler.batch_size], return_tensors="pt", padding=True,
                      add_special_tokens=False).to(self.sampler.device)
            with torch.inference_mode():
                logits = model(**enc).logits[:, -1, :].float()
            probs = torch.softmax(logits, dim=-1)[:, ids]
            for row, pr in zip(enc["input_ids"], probs.tolist()):
                n_in = int((row != tok.pad_token_id).sum()) if tok.pad_token_id is not None else len(row)
                yield pr, n_in

    def _weighted(self, texts: list[str], low: int, high: int) -> list[Reply]:
        values = [str(v) for v in range(low, high + 1)]
        prefix, ids = self._option_tokens(SCORE_PREFIXES, values, values)
        return [weighted_score_reply(prefix, dict(zip(ids, pr)), n_in)
                for pr, n_in in self._next_token_probs(texts, prefix, list(ids.values()))]

    def _weighted_choice(self, texts: list[str]) -> list[Reply]:
        prefix, ids = self._option_tokens(CHOICE_PREFIXES, CHOICES, ("a", "b"))
        return [weighted_choice_reply(prefix, dict(zip(ids, pr)), n_in)
                for pr, n_in in self._next_token_probs(texts, prefix, list(ids.values()))]


CHOICE_PREFIXES, CHOICES = ("Better: ", "Better:"), ("a", "b", "tie")


def model_identity(model_path: str, kind: str, dtype: str) -> dict:
    # A run directory can be deleted and made again at the same path: the weights' size and
    # modification time keep a new model at an old path from being served old replies.
    weights = sorted(Path(model_path).glob("*.safetensors")) if Path(model_path).is_dir() else []
    return {"kind": kind, "model": model_path, "dtype": dtype,
            "weights": [(w.name, w.stat().st_size, w.stat().st_mtime_ns) for w in weights]}


def option_tokens(tok, prefixes, options, required) -> tuple[str, dict[str, int]]:
    """A reply prefix and, for each option, the one token that writes it after the prefix.

    A prefix without a trailing space is followed by the option's spaced token ("Better:" then
    " a"), as a model writes it: "Better:a" would read a token the model hardly ever writes there.
    """
    for prefix in prefixes:
        base = tok.encode(prefix, add_special_tokens=False)
        sep = "" if prefix.endswith(" ") else " "
        ids = {}
        for v in options:
            full = tok.encode(prefix + sep + v, add_special_tokens=False)
            if len(full) == len(base) + 1 and full[: len(base)] == base:
                ids[v] = full[-1]
        if all(r in ids for r in required):
            return prefix, ids
    raise ValueError(f"judge.weighted: this tokenizer does not write each of {required} as one token")


def weighted_score_reply(prefix: str, probs: dict[str, float], n_in: int) -> Reply:
    """The probability-weighted mean of the scale's values (`probs`: value -> next-token probability)."""
    mass = sum(probs.values())
    if not mass > 0:  # no probability on the scale (or NaN logits): a reply that does not parse
        return Reply(text=f"(no probability on the scale: {mass})", tokens_in=n_in, tokens_out=1)
    e = sum(p * int(v) for v, p in probs.items()) / mass
    low, high = min(map(int, probs)), max(map(int, probs))
    return Reply(text=f"{prefix}{e:.4f}\n(weighted over {low}..{high}; probability on the scale {mass:.3f})",
                 tokens_in=n_in, tokens_out=1)


def weighted_choice_reply(prefix: str, p: dict[str, float], n_in: int) -> Reply:
    """Pairwise: P(a) against P(b) (a tie token, where it is one token, counts half)."""
    mass = sum(p.values())
    if not mass > 0:
        return Reply(text=f"(no probability on the options: {mass})", tokens_in=n_in, tokens_out=1)
    p_a = (p["a"] + 0.5 * p.get("tie", 0.0)) / mass
    verdict = "a" if p_a > 0.5 else "b" if p_a < 0.5 else "tie"
    return Reply(text=f"{prefix}{verdict}\n(p_a={p_a:.6f}; probability on the options {mass:.3f})",
                 tokens_in=n_in, tokens_out=1)

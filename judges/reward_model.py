"""The `reward_model` judge: a sequence-classification model gives each candidate a scalar."""

from __future__ import annotations

import math

from nash.records import Judgment, Prompt


class RewardModelJudge:
    name = "reward_model"
    concurrency = 1

    def __init__(self, cfg):
        import torch

        from nash.models import load_reward_model, load_tokenizer
        from nash.policy import resolve_policy
        from nash.precision import resolve

        path = resolve_policy(cfg.model)
        self.precision = resolve(cfg.precision)
        self.torch = torch
        self.tokenizer = load_tokenizer(path)
        self.model = load_reward_model(path, self.precision.inference_dtype, self.precision.device)
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        if self.model.config.num_labels != 1:
            raise ValueError(f"judge.model: {cfg.model} has {self.model.config.num_labels} labels; a reward model has 1")
        self.cfg = cfg

    def _text(self, prompt: str, response: str) -> str:
        from nash.models import chat_text

        return chat_text(self.tokenizer, prompt, response)

    @property
    def batch_requests(self) -> int:
        return self.cfg.batch_size

    @staticmethod
    def prompt_requests(k: int) -> int:
        return k

    def score(self, prompt: Prompt, candidates: list[str]) -> list[Judgment]:
        return self.score_batch([(prompt, candidates)])[0]

    def score_batch(self, items: list[tuple[Prompt, list[str]]]) -> list[list[Judgment]]:
        """`score` of each item, the candidates of all of them scored `batch_size` at a time."""
        texts = [self._text(prompt.text, c) for prompt, candidates in items for c in candidates]
        scores = []
        for start in range(0, len(texts), self.cfg.batch_size):
            enc = self.tokenizer(texts[start : start + self.cfg.batch_size], return_tensors="pt", padding=True,
                                 truncation=True, max_length=self.cfg.max_length).to(self.precision.device)
            with self.torch.inference_mode():
                scores += self.model(**enc).logits[:, 0].float().tolist()
        out, at = [], 0
        for prompt, candidates in items:
            out.append([self._judgment(prompt, k, s) for k, s in enumerate(scores[at : at + len(candidates)])])
            at += len(candidates)
        return out

    def _judgment(self, prompt: Prompt, k: int, s: float) -> Judgment:
        if math.isfinite(s):
            return Judgment(prompt_id=prompt.id, candidate=k, judge=self.name, outcome="scored", score=s)
        return Judgment(prompt_id=prompt.id, candidate=k, judge=self.name, outcome="failed",
                        error=f"the reward model gave {s}, not a finite score")

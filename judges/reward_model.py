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

    def score(self, prompt: Prompt, candidates: list[str]) -> list[Judgment]:
        texts = [self._text(prompt.text, c) for c in candidates]
        scores = []
        for start in range(0, len(texts), self.cfg.batch_size):
            enc = self.tokenizer(texts[start : start + self.cfg.batch_size], return_tensors="pt", padding=True,
                                 truncation=True, max_length=self.cfg.max_length).to(self.precision.device)
            with self.torch.inference_mode():
                scores += self.model(**enc).logits[:, 0].float().tolist()
        return [
            Judgment(prompt_id=prompt.id, candidate=k, judge=self.name, outcome="scored", score=s)
            if math.isfinite(s) else
            Judgment(prompt_id=prompt.id, candidate=k, judge=self.name, outcome="failed",
                     error=f"the reward model gave {s}, not a finite score")
            for k, s in enumerate(scores)
        ]

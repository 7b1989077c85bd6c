"""The transformers backend: batched `generate()` in this process, on one device."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from tqdm.auto import tqdm

from nash.models import chat_text, load_causal_lm, load_tokenizer
from nash.precision import default_device
from nash.records import repair_jsonl
from nash.sampling.base import Completion, TokenCounter, throughput


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


class TransformersSampler(TokenCounter):
    """Batched `generate()` on one device; sequences sorted by length to limit padding.

    Loads its own left-padding tokenizer, which `count_tokens` uses.
    """

    def __init__(self, model_path: str, dtype: str = "float32", batch_size: int = 64, device: str | None = None,
                 journal: Path | None = None):
        import torch

        self.torch = torch
        self.device = device or default_device()
        self.tokenizer = load_tokenizer(model_path, padding_side="left")
        self.model = load_causal_lm(model_path, dtype, self.device)
        self.batch_size = batch_size
        self.model_path, self.dtype = model_path, dtype
        # Finished batches, so a killed stage resumes at the first unfinished one: each batch
        # draws from its own seed, so what it samples does not depend on the batches before it.
        self.journal = journal
        self.info: dict = {}
        eos = self.model.generation_config.eos_token_id
        self.eos_ids = {self.tokenizer.eos_token_id} | set(eos if isinstance(eos, list) else [eos] if eos is not None else [])

    def chat_text(self, prompt: str) -> str:
        return chat_text(self.tokenizer, prompt)

    def generate(self, prompts, params, progress=None, show_progress=True):
        torch, tok = self.torch, self.tokenizer
        texts = [self.chat_text(p) for p in prompts]
        lengths = [len(ids) for ids in tok(texts, add_special_tokens=False)["input_ids"]]
        jobs = sorted(((i, k) for i in range(len(prompts)) for k in range(params.n)), key=lambda j: lengths[j[0]])
        out: list[list[Completion | None]] = [[None] * params.n for _ in prompts]
        greedy = params.temperature == 0.0
        key = self._journal_key(texts, params)
        finished = self._finished_batches(key)
        bar = tqdm(total=len(jobs), desc="sampling", unit="seq", leave=False, disable=not show_progress)
        t0 = time.perf_counter()
        for b, start in enumerate(range(0, len(jobs), self.batch_size)):
            batch = jobs[start : start + self.batch_size]
            if b in finished:
                for (i, k), (text, n_tok) in zip(batch, finished[b]):
                    out[i][k] = Completion(text, n_tok)
                bar.update(len(batch))
                continue
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
            if self.journal:
                self._record_batch(key, b, [out[i][k] for i, k in batch])
            bar.update(len(batch))
            if progress:
                progress(min(start + len(batch), len(jobs)), len(jobs))
        bar.close()
        seconds = time.perf_counter() - t0
        toks = sum(c.num_tokens for cs in out for c in cs)
        self.info = {"backend": "transformers", "sequences": len(jobs), "tokens": toks,
                     "generate_seconds": round(seconds, 2), "reused_batches": len(finished),
                     **throughput(len(jobs), toks, seconds)}
        return out

    def _journal_key(self, texts: list[str], params) -> str:
        blob = json.dumps({"model": self.model_path, "dtype": self.dtype, "batch_size": self.batch_size,
                           "params": vars(params), "texts": texts}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()

    def _finished_batches(self, key: str) -> dict[int, list[tuple[str, int]]]:
        if not (self.journal and self.journal.is_file()):
            return {}
        repair_jsonl(self.journal)
        rows = (json.loads(line) for line in self.journal.read_text(encoding="utf-8").splitlines() if line)
        return {row["batch"]: row["completions"] for row in rows if row["key"] == key}

    def _record_batch(self, key: str, b: int, completions: list[Completion]) -> None:
        self.journal.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps({"key": key, "batch": b, "completions": [[c.text, c.num_tokens] for c in completions]})
        with open(self.journal, "a", encoding="utf-8") as f:
            f.write(line + "\n")

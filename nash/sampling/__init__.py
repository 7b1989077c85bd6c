"""Sampling: K responses per prompt from a policy, through the backend `sampling.backend` names.

A sampler takes user prompts (plain text) and applies the policy's chat template itself, so
one interface fits transformers (nash.sampling.hf), vLLM's offline engine in child processes
(nash.sampling.vllm) and an OpenAI-compatible server (nash.sampling.server).
"""

from __future__ import annotations

from pathlib import Path

from nash.sampling.base import THROUGHPUT, Completion, Progress, Sampler, SamplingParams, TokenCounter, throughput


def build_sampler(cfg, model_path: str, dtype: str, work_dir: Path | None = None) -> Sampler:
    """The sampler of `sampling.backend` (cfg: the sampling section); `work_dir` keeps shards and journals."""
    if cfg.backend == "transformers":
        from nash.sampling.hf import TransformersSampler

        return TransformersSampler(model_path, dtype=dtype, batch_size=cfg.batch_size,
                                   journal=work_dir / "batches.jsonl" if work_dir else None)
    if cfg.backend == "vllm":
        from nash.sampling.vllm import VLLMSampler

        return VLLMSampler(model_path, cfg.vllm, cfg.data_parallel, dtype, work_dir or Path(model_path) / ".nash-vllm")
    if cfg.backend == "openai":
        from nash.sampling.server import OpenAISampler

        return OpenAISampler(model_path, cfg.server, work_dir)
    raise ValueError(f"sampling.backend: unknown backend {cfg.backend!r}")


__all__ = ["THROUGHPUT", "Completion", "Progress", "Sampler", "SamplingParams", "TokenCounter", "build_sampler",
           "throughput"]

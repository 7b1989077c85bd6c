"""The vLLM backend: vLLM's offline engine, one child process per shard."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

from tqdm.auto import tqdm

from nash.sampling.base import Completion, SamplingParams, TokenCounter, throughput
from nash.supervisor import Child
from nash.vllm_engine import (
    WORKER,
    EngineFailed,
    engine_devices,
    engine_failure,
    vllm_engine_args,
    vllm_env,
    vllm_python,
)


class VLLMSampler(TokenCounter):
    """vLLM's offline engine, one child process per shard (nash/vllm_worker.py), nothing of vLLM here.

    Prompts are split into `data_parallel` contiguous shards, each sampled by its own engine on
    its own devices, with `SamplingParams(n=K)` so a prompt's K samples share its cached prefix.
    Each shard writes its file in `work_dir` with a `.done` marker and the job it answers; a
    re-run reuses finished shards of the same job and redoes the others. The engine processes
    die with the stage: on failure, Ctrl-C or exit their process groups are killed, and the
    worker asks the kernel to kill it if this process dies.
    """

    def __init__(self, model_path: str, cfg, data_parallel: int, dtype: str, work_dir: Path):
        super().__init__(model_path)
        self.model_path, self.cfg, self.shards, self.dtype = model_path, cfg, data_parallel, dtype
        self.work_dir = Path(work_dir)
        self.info: dict = {}

    def engine_args(self, seed: int, gpu: bool) -> dict:
        return vllm_engine_args(self.cfg, self.dtype, seed, gpu)

    @staticmethod
    def sampling_args(params: SamplingParams) -> dict:
        # Every parameter set, so no default of the engine or the model decides one.
        # vLLM refuses n > 1 when greedy; the K greedy answers are one answer K times
        greedy = params.temperature == 0
        return {"n": 1 if greedy else params.n, "temperature": params.temperature,
                "top_p": 1.0 if greedy else params.top_p, "top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0, "presence_penalty": 0.0,
                "frequency_penalty": 0.0, "max_tokens": params.max_new_tokens, "skip_special_tokens": True}

    def generate(self, prompts, params, progress=None, show_progress=True):
        devices = engine_devices(self.cfg, self.shards)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        bounds = [round(i * len(prompts) / self.shards) for i in range(self.shards + 1)]
        outs, pending = [], []
        for k in range(self.shards):
            out = self._shard(k, ".jsonl")
            job = {"model": self.model_path, "out": str(out),
                   "engine": self.engine_args(params.seed * 1000 + k, devices is not None),
                   "sampling": self.sampling_args(params), "seed": params.seed * 1_000_003,
                   "prompts": [{"index": i, "messages": [{"role": "user", "content": prompts[i]}]}
                               for i in range(bounds[k], bounds[k + 1])]}
            job_path, done = self._shard(k, ".job.json"), self._shard(k, ".jsonl.done")
            text = json.dumps(job, sort_keys=True)
            outs.append((out, done))
            if done.is_file() and out.is_file() and job_path.is_file() and job_path.read_text() == text:
                continue
            for stale in (out, done, self._shard(k, ".jsonl.partial")):
                stale.unlink(missing_ok=True)
            job_path.write_text(text)
            pending.append((k, job_path, len(job["prompts"])))
        if pending:
            self._run(pending, devices, len(prompts), progress, show_progress)
        completions: list[list[Completion] | None] = [None] * len(prompts)
        figures = []
        for out, done in outs:
            for line in out.read_text(encoding="utf-8").splitlines():
                row = json.loads(line)
                cs = [Completion(c["text"].strip(), c["num_tokens"]) for c in row["completions"]]
                completions[row["index"]] = (cs * params.n)[: params.n]
            figures.append(json.loads(done.read_text()))
        missing = [i for i, c in enumerate(completions) if c is None]
        if missing:
            raise EngineFailed(f"sampling: the vLLM shards left {len(missing)} prompts unanswered (first: {missing[0]})")
        self.info = summarize_shards(figures)
        return completions

    def _shard(self, k: int, suffix: str) -> Path:
        return self.work_dir / f"shard-{k:02d}-of-{self.shards:02d}{suffix}"

    def _run(self, pending, devices, total, progress, show_progress):
        python = vllm_python(self.cfg)
        base = total - sum(n for _, _, n in pending)  # prompts of the shards reused
        bar = tqdm(total=total, initial=base, desc="sampling (vllm)", unit="prompt", leave=False,
                   disable=not show_progress)
        done_by: dict[int, int] = {}
        env = vllm_env(self.cfg, devices is not None)

        def report(k, n):
            done_by[k] = n
            bar.n = base + sum(done_by.values())
            bar.refresh()
            if progress:
                progress(bar.n, total)

        # GPU shards run side by side, each on its own devices; CPU shards one after another, since
        # engines sharing cores gain nothing and their thread layout would change the numerics.
        waves = [pending] if devices is not None else [[p] for p in pending]
        try:
            for wave in waves:
                self._wave(wave, python, env, devices, report)
        finally:
            bar.close()

    def _wave(self, wave, python, env, devices, report):
        children, lock = [], threading.Lock()

        def on_progress(k):
            def f(done, _total):
                with lock:
                    report(k, done)
            return f

        try:
            for k, job_path, _ in wave:
                shard_env = dict(env)
                if devices is not None:
                    tp = self.cfg.tensor_parallel_size
                    shard_env["CUDA_VISIBLE_DEVICES"] = ",".join(devices[k * tp : (k + 1) * tp])
                children.append((k, Child([python, WORKER, str(job_path)], self._shard(k, ".log"), shard_env,
                                          on_progress(k)).pump_in_background()))
            deadline = time.monotonic() + self.cfg.start_timeout_s
            while any(c.poll() is None for _, c in children):
                if any(c.poll() not in (None, 0) for _, c in children):
                    break  # one shard failed: the others are stopped below
                if time.monotonic() > deadline:
                    raise EngineFailed(f"sampling.vllm.start_timeout_s: a shard ran past {self.cfg.start_timeout_s} s")
                time.sleep(0.2)
            for _, c in children:
                c.join_output()
            for k, c in children:
                if c.poll() not in (None, 0):
                    raise EngineFailed(engine_failure(f"shard {k}", c.log_path, c.returncode, c.tail))
        finally:
            for _, c in children:
                c.kill()


def summarize_shards(figures: list[dict]) -> dict:
    """The stage's throughput from its shards' figures (engines run side by side: the slowest sets the time)."""
    seqs, toks = sum(f["sequences"] for f in figures), sum(f["tokens"] for f in figures)
    gen = max(f["generate_seconds"] for f in figures)
    first = figures[0]
    return {"backend": "vllm", "vllm_version": first["vllm_version"], "engine_args": first["engine_args"],
            "sampling_params": first["sampling_params"], "shards": len(figures),
            "engine_start_seconds": max(f["engine_start_seconds"] for f in figures),
            "sequences": seqs, "tokens": toks, "generate_seconds": gen, **throughput(seqs, toks, gen)}

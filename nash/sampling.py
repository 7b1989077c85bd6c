"""Sampling: K responses per prompt from a policy, through a backend chosen by config.

A sampler takes user prompts (plain text) and applies the policy's chat template itself,
so the same interface fits transformers, vLLM and an OpenAI-compatible server.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from tqdm.auto import tqdm

from nash.records import repair_jsonl

Progress = Callable[[int, int], None]  # (done, total)
PROGRESS_TAG = "nash-sample-progress"  # the vLLM worker's progress lines
THROUGHPUT = ("sequences_per_second", "tokens_per_second", "engine_start_seconds")


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


def throughput(sequences: int, tokens: int, seconds: float) -> dict:
    """Sequences and tokens per second of a generation that took `seconds`."""
    return {"sequences_per_second": round(sequences / seconds, 3) if sequences and seconds else None,
            "tokens_per_second": round(tokens / seconds, 1) if sequences and seconds else None}


class _Tokens:
    """Token counts with the policy's tokenizer where it is on disk, else whitespace words."""

    def __init__(self, model_path: str):
        self.tokenizer = None
        try:
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        except Exception:  # a name only the server knows
            pass

    def count_tokens(self, text: str) -> int:
        if self.tokenizer is None:
            return len(text.split())
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])


class TransformersSampler(_Tokens):
    """Batched `generate()` on one device; sequences sorted by length to limit padding.

    Loads its own left-padding tokenizer, which `count_tokens` uses.
    """

    def __init__(self, model_path: str, dtype: str = "float32", batch_size: int = 64, device: str | None = None,
                 journal: Path | None = None):
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
        self.model_path, self.dtype = model_path, dtype
        # Finished batches, so a killed stage resumes at the first unfinished one: each batch
        # draws from its own seed, so what it samples does not depend on the batches before it.
        self.journal = journal
        self.info: dict = {}
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
        import hashlib

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


class EngineFailed(RuntimeError):
    pass


def vllm_engine_args(cfg, dtype: str, seed: int, gpu: bool) -> dict:
    """LLM()'s keyword arguments (and `vllm serve`'s flags) from a `sampling.vllm` section."""
    args = {"seed": seed, "dtype": dtype if cfg.dtype == "auto" else cfg.dtype,
            "tensor_parallel_size": cfg.tensor_parallel_size,
            "gpu_memory_utilization": cfg.gpu_memory_utilization or (0.85 if gpu else 0.3),
            "enforce_eager": (not gpu) if cfg.enforce_eager is None else cfg.enforce_eager,
            "generation_config": "vllm"}  # not the model's generation_config.json (vllm#15241)
    if not gpu:
        # Per-prompt seeds: when a chunked prefill discards a seeded request's token, vLLM rewinds
        # its generator, which CPU generators cannot do ("CPU Generator does not use offset").
        args["enable_chunked_prefill"] = False
    if cfg.max_model_len:
        args["max_model_len"] = cfg.max_model_len
    return {**args, **cfg.engine_args}


def visible_gpus() -> list[str] | None:
    """The CUDA devices this process may hand to engines, or None on a machine without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return None
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]


def vllm_python(cfg) -> str:
    python = cfg.python or sys.executable
    if os.sep in python and not Path(python).exists():
        raise EngineFailed(f"sampling.vllm.python: {python} does not exist (install it with `make vllm`)")
    return python


def vllm_env(cfg, gpu: bool) -> dict:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **cfg.env}
    if not gpu:
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    return env


WORKER = str(Path(__file__).with_name("vllm_worker.py"))


def engine_failure(what: str, log: Path, rc: int | None, tail) -> str:
    """One message for an engine that died: the config key most likely at fault, its status, its log's end."""
    lines = [t for t in tail if t.strip()]
    errors = [t for t in lines if re.search(r"\w(Error|Exception)\b.*:|error: ", t)]
    if errors:  # the engine's own error first: shutdown messages follow it in the log
        lines = [errors[-1]] + [t for t in lines if t != errors[-1]]
    key = "sampling.vllm"
    text = "\n".join(lines) if errors else ""  # a killed engine's log names no culprit
    if "No module named 'vllm'" in text:
        key = "sampling.vllm.python"
    elif any(s in text for s in ("does not appear to have", "not a valid model", "Repo id", "No such file",
                                 "is not a local folder")):
        key = "policy.model"
    elif any(s in text for s in ("unexpected keyword argument", "got an unexpected", "unrecognized arguments")):
        key = "sampling.vllm.engine_args"
    elif "max_model_len" in text:
        key = "sampling.vllm.max_model_len"
    elif re.search(r"out of memory|OutOfMemory|memory for the cache|KV cache|insufficient memory", text, re.I):
        key = "sampling.vllm.gpu_memory_utilization"
    how = f"exited with status {rc}"
    if rc == -signal.SIGKILL and not errors:
        how += " (SIGKILL: the kernel's out-of-memory killer, or a person)"
    return (f"{key}: the vLLM engine of {what} {how}; see {log}:\n  "
            + "\n  ".join(lines[:1] + lines[-11:] if errors else lines[-12:]))


def _pump(proc: subprocess.Popen, log, tail, on_progress=None) -> None:
    """Copy an engine's output to its log, keeping the last lines; progress lines go to `on_progress`."""
    for line in proc.stdout:
        if on_progress and line.startswith(PROGRESS_TAG):
            on_progress(int(line.split()[1]))
            continue
        log.write(line)
        log.flush()
        tail.append(line.rstrip())


def _kill_group(proc: subprocess.Popen) -> None:
    # The whole group, even when the worker itself is gone: its engine-core child may still live.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


class VLLMSampler(_Tokens):
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

    def _devices(self) -> list[str] | None:
        devices = visible_gpus()
        need = self.shards * self.cfg.tensor_parallel_size
        if devices is not None and len(devices) < need:
            raise EngineFailed(f"sampling.data_parallel: {self.shards} engines x sampling.vllm.tensor_parallel_size "
                               f"{self.cfg.tensor_parallel_size} need {need} GPUs; {len(devices)} visible")
        return devices

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
        devices = self._devices()
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
        procs, lock = [], threading.Lock()
        try:
            for k, job_path, _ in wave:
                shard_env = dict(env)
                if devices is not None:
                    tp = self.cfg.tensor_parallel_size
                    shard_env["CUDA_VISIBLE_DEVICES"] = ",".join(devices[k * tp : (k + 1) * tp])
                log = open(self._shard(k, ".log"), "a", encoding="utf-8")
                proc = subprocess.Popen([python, WORKER, str(job_path)], stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True, env=shard_env, start_new_session=True)
                procs.append((k, proc, log, deque(maxlen=30)))

            def on_progress(k):
                def f(n):
                    with lock:
                        report(k, n)
                return f

            threads = [threading.Thread(target=_pump, args=(p, log, tail, on_progress(k)), daemon=True)
                       for k, p, log, tail in procs]
            for t in threads:
                t.start()
            deadline = time.monotonic() + self.cfg.start_timeout_s
            while any(p.poll() is None for _, p, _, _ in procs):
                if any(p.poll() not in (None, 0) for _, p, _, _ in procs):
                    break  # one shard failed: the others are stopped below
                if time.monotonic() > deadline:
                    raise EngineFailed(f"sampling.vllm.start_timeout_s: a shard ran past {self.cfg.start_timeout_s} s")
                time.sleep(0.2)
            for t in threads:
                t.join(timeout=5)
            for k, p, _, tail in procs:
                if p.poll() not in (None, 0):
                    raise EngineFailed(engine_failure(f"shard {k}", self._shard(k, ".log"), p.returncode, tail))
        finally:
            for _, p, log, _ in procs:
                _kill_group(p)
                log.close()


def summarize_shards(figures: list[dict]) -> dict:
    """The stage's throughput from its shards' figures (engines run side by side: the slowest sets the time)."""
    seqs, toks = sum(f["sequences"] for f in figures), sum(f["tokens"] for f in figures)
    gen = max(f["generate_seconds"] for f in figures)
    first = figures[0]
    return {"backend": "vllm", "vllm_version": first["vllm_version"], "engine_args": first["engine_args"],
            "sampling_params": first["sampling_params"], "shards": len(figures),
            "engine_start_seconds": max(f["engine_start_seconds"] for f in figures),
            "sequences": seqs, "tokens": toks, "generate_seconds": gen, **throughput(seqs, toks, gen)}


class VLLMServer:
    """vLLM's OpenAI-compatible server for one policy, on loopback, for as long as a stage needs it.

    The self judge sends it many requests at once, so the engine batches them as it batches
    samples. It runs as the worker in `--serve` mode in its own process group, which is killed
    on close, failure or exit; it and its engine core die with this process.
    """

    NAME = "policy"  # the model name the server answers to

    def __init__(self, model_path: str, cfg, dtype: str, work_dir: Path, seed: int = 0):
        self.model_path, self.cfg, self.dtype, self.seed = model_path, cfg, dtype, seed
        self.work_dir = Path(work_dir)
        self.proc: subprocess.Popen | None = None
        self.base_url = ""
        self.info: dict = {}

    def start(self) -> VLLMServer:
        import socket
        import urllib.request

        python, devices = vllm_python(self.cfg), visible_gpus()
        env = vllm_env(self.cfg, devices is not None)
        if devices is not None:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(devices[: self.cfg.tensor_parallel_size])
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        engine = vllm_engine_args(self.cfg, self.dtype, self.seed, devices is not None)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        job_path, log_path = self.work_dir / "server.job.json", self.work_dir / "server.log"
        job_path.write_text(json.dumps({"model": self.model_path, "host": "127.0.0.1", "port": port,
                                        "served_model_name": self.NAME, "engine": engine}))
        self._log, tail = open(log_path, "a", encoding="utf-8"), deque(maxlen=30)
        t0 = time.monotonic()
        self.proc = subprocess.Popen([python, WORKER, "--serve", str(job_path)], stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)
        self._pump = threading.Thread(target=_pump, args=(self.proc, self._log, tail), daemon=True)
        self._pump.start()
        try:
            while True:
                if self.proc.poll() is not None:
                    self._pump.join(timeout=5)
                    raise EngineFailed(engine_failure("the judge's server", log_path, self.proc.returncode, tail))
                if time.monotonic() - t0 > self.cfg.start_timeout_s:
                    raise EngineFailed(f"sampling.vllm.start_timeout_s: the judge's server did not answer within "
                                       f"{self.cfg.start_timeout_s} s; see {log_path}")
                with contextlib.suppress(OSError):
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                        if r.status == 200:
                            break
                time.sleep(0.5)
        except BaseException:
            self.close()
            raise
        self.base_url = f"http://127.0.0.1:{port}/v1"
        self.info = {"backend": "vllm-server", "engine_args": engine, "engine_start_seconds": round(time.monotonic() - t0, 2)}
        return self

    def close(self) -> None:
        if self.proc is not None:
            _kill_group(self.proc)
            self._pump.join(timeout=5)
            self._log.close()
            self.proc = None

    def __enter__(self) -> VLLMServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


class OpenAISampler(_Tokens):
    """K samples per prompt from a server that already serves the policy, through the chat API's `n`.

    Requests run `concurrency` at a time; the client retries 429, 5xx, timeouts and dropped
    connections, and a reply that cannot be decoded is asked again the same number of times
    (`create_completion`). Finished prompts are journaled in
    `work_dir/server.jsonl`, so a re-run after a failure asks only for the others.
    """

    def __init__(self, model_path: str, cfg, work_dir: Path | None = None):
        import openai

        from judges.openai_judge import read_api_key

        super().__init__(model_path)
        self.cfg, self.model = cfg, cfg.model.replace("{policy}", model_path)
        self._key = read_api_key(cfg, "sampling.server")
        self.client = openai.OpenAI(api_key=self._key, base_url=cfg.base_url, timeout=cfg.timeout_s,
                                    max_retries=cfg.max_retries)
        self.journal = Path(work_dir) / "server.jsonl" if work_dir else None
        self.info: dict = {}

    def _ask(self, prompt: str, params: SamplingParams) -> list[Completion]:
        import openai

        from judges.openai_judge import UndecodableReply, create_completion, describe

        out: list[Completion] = []
        while len(out) < params.n:
            want = params.n - len(out)
            try:  # 429, 5xx, timeouts, dropped connections and undecodable replies are retried in there
                choices = create_completion(
                    self.client, self._key, model=self.model, messages=[{"role": "user", "content": prompt}], n=want,
                    temperature=params.temperature, top_p=params.top_p, max_tokens=params.max_new_tokens,
                    seed=params.seed).choices
            except (UndecodableReply, openai.APIConnectionError) as e:
                raise EngineFailed(f"sampling.server.base_url: {self.cfg.base_url} gave no usable reply: "
                                   f"{describe(e, self._key)}") from None
            except openai.APIError as e:
                raise EngineFailed(f"sampling.server: {describe(e, self._key)}") from None
            for c in choices[:want]:  # a server that ignores `n` answers once: ask again for the rest
                text = (c.message.content or "").strip()
                out.append(Completion(text, self.count_tokens(text)))
        return out

    def generate(self, prompts, params, progress=None, show_progress=True):
        from concurrent.futures import ThreadPoolExecutor

        done: dict[int, list[Completion]] = {}
        key = {"model": self.model, "base_url": self.cfg.base_url, "n": params.n, "temperature": params.temperature,
               "top_p": params.top_p, "max_tokens": params.max_new_tokens, "seed": params.seed}
        if self.journal and self.journal.is_file():
            repair_jsonl(self.journal)
            for line in self.journal.read_text(encoding="utf-8").splitlines():
                with contextlib.suppress(ValueError, KeyError):  # a line cut short by a crash
                    row = json.loads(line)
                    if row["key"] == key and row["prompt"] == prompts[row["index"]]:
                        done[row["index"]] = [Completion(**c) for c in row["completions"]]
        todo = [i for i in range(len(prompts)) if i not in done]
        bar = tqdm(total=len(prompts), initial=len(done), desc="sampling (server)", unit="prompt", leave=False,
                   disable=not show_progress)
        lock = threading.Lock()
        t0 = time.perf_counter()
        if self.journal:
            self.journal.parent.mkdir(parents=True, exist_ok=True)
        with open(self.journal, "a", encoding="utf-8") if self.journal else contextlib.nullcontext() as f:
            def one(i):
                cs = self._ask(prompts[i], params)
                with lock:
                    done[i] = cs
                    if f:
                        f.write(json.dumps({"key": key, "index": i, "prompt": prompts[i],
                                            "completions": [c.__dict__ for c in cs]}) + "\n")
                        f.flush()
                    bar.update(1)
                    if progress:
                        progress(len(done), len(prompts))

            with ThreadPoolExecutor(self.cfg.concurrency) as pool:
                for fut in [pool.submit(one, i) for i in todo]:
                    fut.result()
        bar.close()
        seconds = time.perf_counter() - t0
        seqs = len(todo) * params.n
        toks = sum(c.num_tokens for i in todo for c in done[i])
        self.info = {"backend": "openai", "base_url": self.cfg.base_url, "model": self.model, "sequences": seqs,
                     "tokens": toks, "generate_seconds": round(seconds, 2), "reused_prompts": len(prompts) - len(todo),
                     **throughput(seqs, toks, seconds)}
        return [done[i] for i in range(len(prompts))]


def build_sampler(cfg, model_path: str, dtype: str, work_dir: Path | None = None) -> Sampler:
    """The sampler of `sampling.backend` (cfg: the sampling section); `work_dir` keeps shards and journals."""
    if cfg.backend == "transformers":
        return TransformersSampler(model_path, dtype=dtype, batch_size=cfg.batch_size,
                                   journal=work_dir / "batches.jsonl" if work_dir else None)
    if cfg.backend == "vllm":
        return VLLMSampler(model_path, cfg.vllm, cfg.data_parallel, dtype, work_dir or Path(model_path) / ".nash-vllm")
    if cfg.backend == "openai":
        return OpenAISampler(model_path, cfg.server, work_dir)
    raise ValueError(f"sampling.backend: unknown backend {cfg.backend!r}")

"""The server backend: K samples per prompt from an OpenAI-compatible server that already
serves the policy (`vllm serve`, SGLang, TGI, llama.cpp)."""

from __future__ import annotations

import contextlib
import itertools
import json
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from tqdm.auto import tqdm

from nash.openai_client import UndecodableReply, create_completion, describe, make_client, read_api_key
from nash.records import lines_at, repair_jsonl
from nash.sampling.base import Completion, SamplingParams, TokenCounter, throughput
from nash.vllm_engine import EngineFailed


class OpenAISampler(TokenCounter):
    """K samples per prompt from a server that already serves the policy, through the chat API's `n`.

    Requests run `concurrency` at a time; the client retries 429, 5xx, timeouts and dropped
    connections, and a reply that cannot be decoded is asked again the same number of times
    (`create_completion`). Finished prompts are journaled in
    `work_dir/server.jsonl`, so a re-run after a failure asks only for the others.
    """

    def __init__(self, model_path: str, cfg, work_dir: Path | None = None):
        super().__init__(model_path)
        self.cfg, self.model = cfg, cfg.model.replace("{policy}", model_path)
        self._key = read_api_key(cfg, "sampling.server")
        self.client = make_client(self._key, cfg.base_url, cfg.timeout_s, cfg.max_retries)
        self.journal = Path(work_dir) / "server.jsonl" if work_dir else None
        self.info: dict = {}

    def _ask(self, prompt: str, params: SamplingParams) -> list[Completion]:
        import openai

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
        """The completions in prompt order. With a journal they stay on disk and are read back one
        prompt at a time (`Journaled`): a 100k-prompt shard's 500k completions are not held in memory."""
        from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

        done: dict[int, int | list[Completion]] = {}  # index -> journal offset, or the completions
        key = {"model": self.model, "base_url": self.cfg.base_url, "n": params.n, "temperature": params.temperature,
               "top_p": params.top_p, "max_tokens": params.max_new_tokens, "seed": params.seed}
        if self.journal and self.journal.is_file():
            repair_jsonl(self.journal)
            for offset, line in lines_at(self.journal):  # a stream: a resumed 100k-prompt shard
                with contextlib.suppress(ValueError, KeyError, IndexError):  # a line cut short by a crash
                    row = json.loads(line)
                    if row["key"] == key and row["prompt"] == prompts[row["index"]]:
                        done[row["index"]] = offset
        todo = [i for i in range(len(prompts)) if i not in done]
        bar = tqdm(total=len(prompts), initial=len(done), desc="sampling (server)", unit="prompt", leave=False,
                   disable=not show_progress)
        lock = threading.Lock()
        t0 = time.perf_counter()
        toks = 0
        if self.journal:
            self.journal.parent.mkdir(parents=True, exist_ok=True)
        with open(self.journal, "ab") if self.journal else contextlib.nullcontext() as f:
            def one(i):
                nonlocal toks
                cs = self._ask(prompts[i], params)
                with lock:
                    toks += sum(c.num_tokens for c in cs)
                    if f:
                        done[i] = f.tell()
                        f.write(json.dumps({"key": key, "index": i, "prompt": prompts[i],
                                            "completions": [c.__dict__ for c in cs]}).encode() + b"\n")
                        f.flush()
                    else:
                        done[i] = cs
                    bar.update(1)
                    if progress:
                        progress(len(done), len(prompts))

            with ThreadPoolExecutor(self.cfg.concurrency) as pool:  # a bounded number of prompts in flight
                queue = iter(todo)
                running = {pool.submit(one, i) for i in itertools.islice(queue, 2 * self.cfg.concurrency)}
                while running:
                    finished, running = wait(running, return_when=FIRST_COMPLETED)
                    for fut in finished:
                        fut.result()
                    running |= {pool.submit(one, i) for i in itertools.islice(queue, len(finished))}
        bar.close()
        seconds = time.perf_counter() - t0
        seqs = len(todo) * params.n
        self.info = {"backend": "openai", "base_url": self.cfg.base_url, "model": self.model, "sequences": seqs,
                     "tokens": toks, "generate_seconds": round(seconds, 2), "reused_prompts": len(prompts) - len(todo),
                     **throughput(seqs, toks, seconds)}
        if self.journal:
            return Journaled(self.journal, [done[i] for i in range(len(prompts))])
        return [done[i] for i in range(len(prompts))]


class Journaled(Sequence):
    """Completions in prompt order, read from the journal where `generate` wrote them."""

    def __init__(self, path: Path, offsets: list[int]):
        self.path, self.offsets = path, offsets

    def __len__(self) -> int:
        return len(self.offsets)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        with open(self.path, "rb") as f:
            return self._read(f, self.offsets[i])

    def __iter__(self):
        with open(self.path, "rb") as f:
            for offset in self.offsets:
                yield self._read(f, offset)

    @staticmethod
    def _read(f, offset: int) -> list[Completion]:
        f.seek(offset)
        return [Completion(**c) for c in json.loads(f.readline())["completions"]]

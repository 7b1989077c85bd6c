"""The `openai` judge backend: GPT-4 at api.openai.com or any OpenAI-compatible server
(`vllm serve`, llama.cpp server, Ollama) through `base_url`.

The key, the client, its retries and the scrubbing of the key from errors are
nash.openai_client's, shared with the server sampler and AlpacaEval's annotator.
"""

from __future__ import annotations

import math
import threading
from concurrent.futures import ThreadPoolExecutor

from nash.judges.lm import Reply
from nash.openai_client import create_completion, describe, make_client


class RequestFailed(RuntimeError):
    pass


class OpenAIBackend:
    def __init__(self, cfg, api_key: str):
        self.identity = {"kind": "openai", "model": cfg.model, "base_url": cfg.base_url}
        self._key = api_key
        self.client = make_client(api_key, cfg.base_url, cfg.timeout_s, cfg.max_retries)
        self.model = cfg.model
        self.concurrency = cfg.concurrency
        # Prompts are judged `concurrency` at a time and each may send several requests:
        # this bounds the requests in flight across all of them.
        self._in_flight = threading.BoundedSemaphore(cfg.concurrency)

    def _one(self, messages, temperature, max_tokens, logprobs=False):
        with self._in_flight:
            return self._request(messages, temperature, max_tokens, logprobs)

    def _request(self, messages, temperature, max_tokens, logprobs=False):
        try:
            extra = {"logprobs": True, "top_logprobs": 5} if logprobs else {}
            resp = create_completion(self.client, self._key, model=self.model, messages=messages,
                                     temperature=temperature, max_tokens=max_tokens, **extra)
            usage = resp.usage
            text = resp.choices[0].message.content or ""
            if logprobs:
                p_a = verdict_probability(resp.choices[0].logprobs)
                if p_a is not None:
                    text += f"\n(p_a={p_a:.6f}; from the verdict token's top_logprobs)"
            return Reply(
                text=text,
                tokens_in=usage.prompt_tokens if usage else 0,
                tokens_out=usage.completion_tokens if usage else 0,
            )
        except Exception as e:  # after the retries: recorded as a failed judgment
            return RequestFailed(describe(e, self._key))

    # Replies are handed to `on_reply(index, reply)` as each arrives, so the judge caches what it
    # paid for at once: a kill then loses only the requests in flight, not finished replies that
    # wait for the slowest of their batch.
    streams_replies = True

    def complete(self, requests, temperature, max_tokens, weighted=None, on_reply=None):
        # Weighted pairwise verdicts read the verdict token's top_logprobs, where the server returns them.
        logprobs = weighted == "pairwise"
        return self._each(requests, lambda m: self._one(m, temperature, max_tokens, logprobs), on_reply)

    def _each(self, requests, ask, on_reply=None):
        def one(i):
            reply = ask(requests[i])
            if on_reply is not None:
                on_reply(i, reply)
            return reply

        if len(requests) == 1:
            return [one(0)]
        with ThreadPoolExecutor(min(self.concurrency, len(requests))) as pool:
            return list(pool.map(one, range(len(requests))))


def verdict_probability(logprobs) -> float | None:
    """P(a) against P(b) (a `tie` token counts half) at the token after the reply's last "Better:"."""
    content = getattr(logprobs, "content", None) or []
    text, found = "", None
    for item in content:
        if text.rstrip().lower().endswith("better:") and item.token.strip().lower() in ("a", "b", "tie"):
            found = item
        text += item.token
    if found is None:
        return None
    mass = {"a": 0.0, "b": 0.0, "tie": 0.0}
    for alt in found.top_logprobs or []:
        key = alt.token.strip().lower()
        if key in mass:
            mass[key] += math.exp(alt.logprob)
    total = sum(mass.values())
    return (mass["a"] + 0.5 * mass["tie"]) / total if total > 0 else None

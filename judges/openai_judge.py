"""The `openai` judge backend: the OpenAI client against api.openai.com or any
OpenAI-compatible server (`vllm serve`, llama.cpp server, Ollama) through `base_url`.

Retries on 429, 5xx, timeouts and dropped connections are the client's own: exponential
backoff with jitter, honouring `Retry-After`. A 200 whose body cannot be decoded is asked again
by `create_completion`, as many times. The API key comes from the environment variable named
in `judge.api_key_env`, or from a Prefect Secret block named in `judge.api_key_secret`; it is
held by the client only and scrubbed from any error text that is recorded.
"""

from __future__ import annotations

import json
import math
import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from judges.lm import Reply


class MissingAPIKey(ValueError):
    pass


class RequestFailed(RuntimeError):
    pass


class UndecodableReply(RuntimeError):
    """Every try was answered with a body that is not a chat completion."""


class NotACompletion(ValueError):
    pass


# Between tries of an undecodable reply: BACKOFF_BASE_S doubling up to BACKOFF_CAP_S, less 0-50% jitter.
BACKOFF_BASE_S = 0.5
BACKOFF_CAP_S = 8.0


def read_api_key(cfg, section: str = "judge") -> str:
    if cfg.api_key_secret:
        from prefect.blocks.system import Secret

        return Secret.load(cfg.api_key_secret).get()
    key = os.environ.get(cfg.api_key_env)
    if key:
        return key
    if cfg.base_url:
        return "EMPTY"  # local OpenAI-compatible servers usually take any key
    raise MissingAPIKey(
        f"{section}.api_key_env: environment variable {cfg.api_key_env} is not set "
        f"(or set {section}.api_key_secret to a Prefect Secret block)"
    )


def scrub(text: str, key: str | None) -> str:
    """`text` with the API key masked, for anything recorded or raised."""
    return text.replace(key, "***") if key and key != "EMPTY" else text


def describe(e: BaseException, key: str | None) -> str:
    """`Type: message` of an error, with the cause the client's own message leaves out, key masked."""
    text = f"{type(e).__name__}: {e}"
    cause = e.__cause__
    if cause is not None and str(cause) and str(cause) not in text:
        text += f" ({type(cause).__name__}: {cause})"  # e.g. "Connection error. (RemoteProtocolError: ...)"
    return scrub(text, key)


def _completion(resp):
    choices = getattr(resp, "choices", None)
    if not isinstance(choices, list) or not choices or any(getattr(c, "message", None) is None for c in choices):
        body = resp.model_dump_json(exclude_unset=True) if hasattr(resp, "model_dump_json") else repr(resp)
        raise NotACompletion(f"a reply that is not a chat completion: {body[:200]}")
    return resp


def create_completion(client, key: str | None, **request):
    """`client.chat.completions.create(**request)`, asked again while the reply cannot be decoded.

    The client retries 429, 5xx, timeouts and dropped connections itself (`client.max_retries`),
    but it decodes a 200's body after its retry loop: a body cut short, one that is not JSON, or
    JSON that is not a chat completion would reach the caller at once. Those are asked again up to
    `max_retries` times, with exponential backoff and jitter, then raise UndecodableReply naming
    the last one. Other errors (400, 401, 404, the client's retries spent) pass through.
    """
    import openai

    tries = client.max_retries + 1
    for attempt in range(tries):
        try:
            return _completion(client.chat.completions.create(**request))
        except (json.JSONDecodeError, NotACompletion, openai.APIResponseValidationError) as e:
            if attempt + 1 == tries:
                raise UndecodableReply(f"no decodable reply in {tries} tries; the last: {describe(e, key)}") from None
            time.sleep(min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2**attempt) * random.uniform(0.5, 1.0))


class OpenAIBackend:
    def __init__(self, cfg, api_key: str):
        import openai

        self.identity = {"kind": "openai", "model": cfg.model, "base_url": cfg.base_url}
        self._key = api_key
        self.client = openai.OpenAI(api_key=api_key, base_url=cfg.base_url, timeout=cfg.timeout_s,
                                    max_retries=cfg.max_retries)
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

"""The policy judges itself through an OpenAI-compatible server: the `self` judge when
`sampling.backend` is `vllm` (a vLLM server started for the stage) or `openai` (the server at
`sampling.server`).

Weighted verdicts prefill the reply ("Score: ", "Better: ") with vLLM's
`continue_final_message` and read the next token's `top_logprobs`: the same expected score as
the local backend, over the scale's tokens among the server's top 20. Requests run
`judge.concurrency` at a time, so the engine batches them.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

from nash.judges.local import (
    CHOICE_PREFIXES,
    CHOICES,
    SCORE_PREFIXES,
    model_identity,
    option_tokens,
    weighted_choice_reply,
    weighted_score_reply,
)
from nash.judges.openai_judge import OpenAIBackend, RequestFailed
from nash.openai_client import create_completion, describe, read_api_key

TOP_LOGPROBS = 20  # vLLM's default max_logprobs, and OpenAI's limit


class ServedPolicyBackend(OpenAIBackend):
    def __init__(self, model_path: str, base_url: str, model: str, api_key: str, concurrency: int,
                 timeout_s: float = 600.0, max_retries: int = 3, server=None, dtype: str = "auto"):
        from nash.models import load_tokenizer

        cfg = SimpleNamespace(model=model, base_url=base_url, timeout_s=timeout_s, max_retries=max_retries,
                              concurrency=concurrency)
        super().__init__(cfg, api_key)
        self.identity = model_identity(model_path, "served", dtype)
        self.tokenizer = load_tokenizer(model_path)
        self.server = server

    def close(self) -> None:
        if self.server is not None:
            self.server.close()

    def complete(self, requests, temperature, max_tokens, weighted=None, on_reply=None):
        if weighted is None:
            return super().complete(requests, temperature, max_tokens, on_reply=on_reply)
        if weighted == "pairwise":
            prefix, ids = option_tokens(self.tokenizer, CHOICE_PREFIXES, CHOICES, ("a", "b"))
            reply = weighted_choice_reply
        else:
            values = [str(v) for v in range(weighted[0], weighted[1] + 1)]
            prefix, ids = option_tokens(self.tokenizer, SCORE_PREFIXES, values, values)
            reply = weighted_score_reply
        # The server names tokens by their text: after "Better:" option a is the token " a".
        options = {self.tokenizer.decode([i]): v for v, i in ids.items()}
        return self._each(requests, lambda m: self._weighted(m, prefix, options, reply), on_reply)

    def _weighted(self, messages, prefix, options: dict[str, str], reply):
        with self._in_flight:
            try:
                resp = create_completion(
                    self.client, self._key, model=self.model,
                    messages=[*messages, {"role": "assistant", "content": prefix}],
                    max_tokens=1, temperature=0.0, logprobs=True, top_logprobs=TOP_LOGPROBS,
                    extra_body={"continue_final_message": True, "add_generation_prompt": False})
                top = resp.choices[0].logprobs.content[0].top_logprobs
            except Exception as e:  # after the retries: a failed judgment, with its reason
                return RequestFailed(describe(e, self._key))
        probs = {v: 0.0 for v in options.values()}
        for alt in top:
            if alt.token in options:
                probs[options[alt.token]] += math.exp(alt.logprob)
        if sum(probs.values()) == 0:
            return RequestFailed(f"none of {list(options)} among the top {TOP_LOGPROBS} next tokens after {prefix!r}")
        return reply(prefix, probs, resp.usage.prompt_tokens if resp.usage else 0)


def served_policy_backend(sampling, model_path: str, dtype: str, concurrency: int, work_dir) -> ServedPolicyBackend:
    """The self judge's backend for `sampling.backend` vllm (a server started now) or openai."""
    if sampling.backend == "openai":
        s = sampling.server
        return ServedPolicyBackend(model_path, s.base_url, s.model.replace("{policy}", model_path),
                                   read_api_key(s, "sampling.server"), concurrency, s.timeout_s, s.max_retries,
                                   dtype=dtype)
    from nash.vllm_engine import VLLMServer

    server = VLLMServer(model_path, sampling.vllm, dtype, work_dir).start()
    try:
        return ServedPolicyBackend(model_path, server.base_url, VLLMServer.NAME, "EMPTY", concurrency,
                                   server=server, dtype=dtype)
    except BaseException:
        server.close()
        raise

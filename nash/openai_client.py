"""The OpenAI client as every part of nash uses it: the openai judge, the served self judge,
AlpacaEval's annotator and the server sampler.

- The key comes from the environment variable a section names (`api_key_env`) or from a Prefect
  Secret block (`api_key_secret`). It is held by the client only: it never enters a config, a
  Prefect parameter, a record or a log, and `scrub` masks it in any error text that is kept.
- The client retries 429, 5xx, timeouts and dropped connections itself (backoff with jitter,
  `Retry-After`). A 200 whose body cannot be decoded is asked again by `create_completion`.
"""

from __future__ import annotations

import json
import os
import random
import time

from nash.errors import UserError


class MissingAPIKey(UserError, ValueError):
    pass


class ServerUnreachable(UserError):
    pass


class UndecodableReply(RuntimeError):
    """Every try was answered with a body that is not a chat completion."""


class NotACompletion(ValueError):
    pass


# Between tries of an undecodable reply: BACKOFF_BASE_S doubling up to BACKOFF_CAP_S, less 0-50% jitter.
BACKOFF_BASE_S = 0.5
BACKOFF_CAP_S = 8.0


def read_api_key(cfg, section: str = "judge") -> str:
    """The key of a section with `api_key_env`, `api_key_secret` and `base_url`."""
    if cfg.api_key_secret:
        from prefect.blocks.system import Secret

        try:
            return Secret.load(cfg.api_key_secret).get()
        except ValueError as e:  # Prefect's "Unable to find block document named ..."
            raise MissingAPIKey(f"{section}.api_key_secret: Prefect Secret block {cfg.api_key_secret!r} "
                                f"cannot be read: {e}") from None
    key = os.environ.get(cfg.api_key_env)
    if key:
        return key
    if cfg.base_url:
        return "EMPTY"  # local OpenAI-compatible servers usually take any key
    raise MissingAPIKey(
        f"{section}.api_key_env: environment variable {cfg.api_key_env} is not set "
        f"(or set {section}.api_key_secret to a Prefect Secret block)"
    )


def make_client(api_key: str, base_url: str | None, timeout_s: float, max_retries: int):
    import openai

    return openai.OpenAI(api_key=api_key, base_url=base_url, timeout=timeout_s, max_retries=max_retries)


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
            time.sleep(min(BACKOFF_BASE_S * 2**attempt, BACKOFF_CAP_S) * random.uniform(0.5, 1.0))


def probe_server(client, section: str) -> None:
    """Ask the server for its model list, which costs nothing: a server that does not answer, or
    refuses the key, fails here instead of failing every paid request of a stage.

    Any other HTTP answer (a server without /models) shows that the server is there.
    """
    import openai

    try:
        client.with_options(max_retries=0, timeout=10.0).models.list()
    except openai.AuthenticationError as e:
        raise MissingAPIKey(f"{section}.api_key_env: {client.base_url} refused the key: {describe(e, client.api_key)}") from None
    except (openai.APIConnectionError, openai.APITimeoutError) as e:
        raise ServerUnreachable(f"{section}.base_url: no answer from {client.base_url} "
                                f"({describe(e, client.api_key)}); start the server or fix the URL") from None
    except openai.APIStatusError:
        pass

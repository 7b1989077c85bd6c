"""A small OpenAI-compatible chat-completions server on loopback, scripted by the tests.

`script` is a list of behaviours consumed one per request; when it is empty, `fault` (a function
of the user prompt, returning a behaviour or None) is asked, then the default responder answers.
Behaviours: ("ok", text), ("429", retry_after_s), ("500",), ("slow", seconds, text), ("hold", event, text) until the
test sets the event, ("401",),
and the replies that cannot be decoded: ("garbled",) a 200 whose JSON is cut off,
("invalid_json",) a 200 with an HTML page, ("not_completion",) a 200 with JSON but no `choices`,
("truncated",) a 200 whose connection closes half-way through the promised body, ("drop",) a
connection closed without a response, ("cut_headers",) one closed in the middle of the headers.
With `next_token` set, requests for `top_logprobs` get one token and those alternatives. Every
request body and header is recorded, with the behaviour it got (None: the default).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def default_reply(prompt: str) -> str:
    """Deterministic verdicts that follow the protocol the prompt asks for."""
    if "<id>_score" in prompt:  # batched rubric
        ids = re.findall(r"\[Candidate ([A-Z])\]", prompt)
        blocks = re.split(r"\[Candidate [A-Z]\]\n", prompt.split("[Candidates]")[1])[1:]
        obj = {}
        for cid, block in zip(ids, blocks):
            obj[f"{cid}_justification"] = "ok"
            obj[f"{cid}_score"] = 1 + len(block.split("\n\nReply with")[0].strip()) % 6
        return json.dumps(obj)
    if "Better:" in prompt:  # pairwise: the shorter output wins, whatever its position
        a = prompt.split("[Output (a)]\n")[1].split("\n\n[Output (b)]")[0]
        b = prompt.split("[Output (b)]\n")[1].split("\n\nWhich output")[0]
        return "Reasoning.\nBetter: " + ("a" if len(a) < len(b) else "b" if len(b) < len(a) else "tie")
    response = prompt.split("<response>")[1].split("</response>")[0] if "<response>" in prompt else prompt
    score = int(hashlib.sha256(response.encode()).hexdigest(), 16) % 6
    return f"The response is fine.\nScore: {score}"


def token_logprobs(text: str, confidence: float) -> list[dict]:
    """Per-token logprobs for `text`; a verdict token after "Better:" gets `confidence` on itself."""
    out, before = [], ""
    for tok in re.findall(r"\s*[^\s:]+|:", text):
        alts = [{"token": tok, "logprob": 0.0, "bytes": None}]
        verdict = tok.strip().lower()
        if before.rstrip().lower().endswith("better:") and verdict in ("a", "b"):
            other = "b" if verdict == "a" else "a"
            alts = [{"token": f" {verdict}", "logprob": math.log(confidence), "bytes": None},
                    {"token": f" {other}", "logprob": math.log(1 - confidence), "bytes": None}]
        out.append({"token": tok, "logprob": alts[0]["logprob"], "bytes": None, "top_logprobs": alts})
        before += tok
    return out


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):  # keep test output clean
        pass

    def _send(self, code: int, body: dict | str, headers: dict | None = None):
        data = (json.dumps(body) if isinstance(body, dict) else body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def _hang_up(self, kind: str):
        """Close the connection part-way through the body, before any reply, or in the headers."""
        self.close_connection = True
        if kind == "truncated":  # Content-Length promises more than is sent
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", "400")
            self.end_headers()
            self.wfile.write(b'{"id": "chatcmpl-test", "object": "chat.comp')
        elif kind == "cut_headers":
            self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Ty")

    def do_GET(self):  # the model list, which nash asks for before a stage starts
        srv = self.server.owner
        with srv.lock:
            srv.probes += 1
        if srv.models_status != 200:
            self._send(srv.models_status, {"error": {"message": "refused", "type": "invalid_request_error"}})
            return
        self._send(200, {"object": "list", "data": [{"id": "served", "object": "model", "owned_by": "test"}]})

    def do_POST(self):
        srv = self.server.owner
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
        user = next((m["content"] for m in reversed(body["messages"]) if m["role"] == "user"), "")
        with srv.lock:
            behaviour = srv.script.pop(0) if srv.script else srv.fault(user) if srv.fault else None
            srv.requests.append({"body": body, "headers": {k.lower(): v for k, v in self.headers.items()},
                                 "t": time.monotonic(), "behaviour": behaviour})
        if behaviour is None and srv.next_token is not None and body.get("top_logprobs"):  # a prefilled reply: its next token only
            top = [{"token": t, "logprob": math.log(p), "bytes": None} for t, p in srv.next_token(user).items()]
            choice = {"index": 0, "finish_reason": "length", "message": {"role": "assistant", "content": top[0]["token"]},
                      "logprobs": {"content": [{**top[0], "top_logprobs": top}]}}
            return self._send(200, {"id": "chatcmpl-test", "object": "chat.completion", "created": 0,
                                    "model": body["model"], "choices": [choice],
                                    "usage": {"prompt_tokens": srv.count_tokens(user), "completion_tokens": 1,
                                              "total_tokens": srv.count_tokens(user) + 1}})
        prompt = body["messages"][-1]["content"]
        if behaviour is None:
            behaviour = ("ok", srv.responder(prompt))
        kind = behaviour[0]
        if kind == "429":
            return self._send(429, {"error": {"message": "rate limited", "type": "rate_limit"}},
                              {"Retry-After": str(behaviour[1])})
        if kind == "500":
            return self._send(500, {"error": {"message": "boom", "type": "server_error"}})
        if kind == "401":
            key = self.headers.get("Authorization", "").removeprefix("Bearer ")
            return self._send(401, {"error": {"message": f"Incorrect API key provided: {key}", "type": "auth"}})
        if kind == "garbled":  # HTTP 200 with a body cut off mid-way
            return self._send(200, '{"id": "chatcmpl-test", "object": "chat.comp')
        if kind == "invalid_json":  # a proxy's error page
            return self._send(200, "<html><body><h1>502 Bad Gateway</h1></body></html>")
        if kind == "not_completion":
            return self._send(200, {"object": "error", "message": "upstream overloaded"})
        if kind in ("truncated", "drop", "cut_headers"):
            return self._hang_up(kind)
        if kind == "slow":
            time.sleep(behaviour[1])
            text = behaviour[2]
        elif kind == "hold":  # until the test sets the event
            behaviour[1].wait(60)
            text = behaviour[2]
        else:
            text = behaviour[1]
        n = body.get("n") or 1 if srv.honour_n else 1
        texts = [text] + [srv.responder(prompt) for _ in range(n - 1)]
        choices = [{"index": i, "finish_reason": "stop", "message": {"role": "assistant", "content": t}}
                   for i, t in enumerate(texts)]
        if body.get("logprobs") and srv.logprobs:
            choices[0]["logprobs"] = {"content": token_logprobs(text, srv.verdict_confidence)}
        self._send(200, {
            "id": "chatcmpl-test", "object": "chat.completion", "created": 0, "model": body["model"],
            "choices": choices,
            "usage": {"prompt_tokens": srv.count_tokens(prompt), "completion_tokens": srv.count_tokens(text),
                      "total_tokens": srv.count_tokens(prompt) + srv.count_tokens(text)},
        })


class _Server(ThreadingHTTPServer):
    request_queue_size = 128  # the judge opens up to judge.concurrency connections at once
    daemon_threads = True


class OpenAIServer:
    def __init__(self, responder=default_reply, count_tokens=lambda text: len(text.split())):
        self.responder = responder
        self.count_tokens = count_tokens
        self.script: list[tuple] = []
        self.logprobs = True  # answer `logprobs: true` requests with token log-probabilities
        self.honour_n = True  # False: one choice whatever `n` asks, as some servers do
        self.verdict_confidence = 0.8
        self.next_token = None  # user prompt -> {token: probability}: the reply to `top_logprobs` requests
        self.fault = None  # user prompt -> a behaviour, or None for the default reply (after `script`)
        self.requests: list[dict] = []
        self.models_status = 200  # the status of GET /models
        self.probes = 0  # GET /models requests
        self.lock = threading.Lock()
        self.httpd = _Server(("127.0.0.1", 0), _Handler)
        self.httpd.owner = self
        # a short poll: shutdown() waits for it
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()

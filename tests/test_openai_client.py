"""Transient faults on the OpenAI backends (judge, self judge on a served policy, sampler), through
the real OpenAI client against the scripted loopback server: a reply that cannot be decoded is
asked again like a 5xx, and only then recorded `failed`."""

import itertools
import random
from collections import Counter

import pytest

import nash.openai_client as openai_client
from nash.config import SamplingServerSection, load_config
from nash.judges import build_judge, close_judge
from nash.judging import judge_samples, outcome_counts
from nash.records import Prompt, Sample
from nash.sampling import SamplingParams
from nash.sampling.server import OpenAISampler
from tests.openai_server import OpenAIServer

PROMPT = Prompt(id="p1", text="Name a colour.")
CANDS = ["Red.", "Blue is a colour.", "Green, like grass in spring."]
# The client decodes a 200's body after its own retries: these three reach nash's retry loop.
DECODING = ["garbled", "invalid_json", "not_completion"]
# These the client sees as a dropped connection, and retries itself.
DROPPED = ["truncated", "drop", "cut_headers"]
KEY = "sk-test-do-not-leak-123"


@pytest.fixture
def server():
    with OpenAIServer() as s:
        yield s


@pytest.fixture(autouse=True)
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("NASH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    # Both backoffs run as they do in a round, ten times shorter: nash's for undecodable replies
    # and the client's own for 429, 5xx and dropped connections (0.5 s doubling to 8 s).
    monkeypatch.setattr(openai_client, "BACKOFF_BASE_S", 0.05)
    monkeypatch.setattr(openai_client, "BACKOFF_CAP_S", 0.8)
    monkeypatch.setattr("openai._base_client.INITIAL_RETRY_DELAY", 0.05)
    monkeypatch.setattr("openai._base_client.MAX_RETRY_DELAY", 0.8)


def judge_for(server, *sets):
    cfg = load_config(None, ["judge.kind=openai", f"judge.base_url={server.url}", "judge.max_retries=3",
                             "judge.timeout_s=5", *sets])
    return build_judge(cfg.judge)


def kinds(server) -> Counter:
    return Counter(r["behaviour"][0] if r["behaviour"] else "ok" for r in server.requests)


@pytest.mark.parametrize("fault", DECODING + DROPPED)
def test_an_undecodable_reply_is_asked_again(server, fault):
    judge = judge_for(server)
    server.script = [(fault,)]
    out = judge.score(PROMPT, CANDS[:1])
    assert (out[0].outcome, out[0].error) == ("scored", None)
    assert len(server.requests) == 2 and out[0].requests == 1
    assert server.requests[1]["t"] - server.requests[0]["t"] >= 0.025  # backed off first


def test_a_client_error_is_not_asked_again(server):
    server.script = [("401",)]
    out = judge_for(server).score(PROMPT, CANDS[:1])
    assert out[0].outcome == "failed" and out[0].error.startswith("RequestFailed: AuthenticationError")
    assert len(server.requests) == 1


def test_the_measured_fault_mix_leaves_no_failed_judgment(server, tmp_path):
    # As measured on a nightly judge server: 5% of replies a 200 with its body cut off, 15% 429s
    # (Retry-After: 0), 10% 500s. Each try of each request draws its fault from its own seed.
    tries = Counter()

    def fault(prompt):
        tries[prompt] += 1
        r = random.Random(f"{prompt}/{tries[prompt]}").random()
        return ("garbled",) if r < 0.05 else ("429", 0) if r < 0.20 else ("500",) if r < 0.30 else None

    server.fault = fault
    prompts = {f"p{i}": Prompt(id=f"p{i}", text=f"Question {i}?") for i in range(12)}
    samples = [Sample(prompt_id=pid, candidate=k, prompt=p.text, response=f"answer {k} to {pid}", num_tokens=4,
                      policy="iter_000") for pid, p in prompts.items() for k in range(4)]
    judge = judge_for(server, "judge.max_retries=5")
    judgments, _ = judge_samples(judge, prompts, samples, tmp_path / "j.jsonl")
    counts = outcome_counts(judgments)
    assert (counts["scored"], counts["failed"]) == (48, 0)
    served = kinds(server)
    assert served["ok"] == 48 and served["garbled"] >= 2 and served["429"] >= 5 and served["500"] >= 3


@pytest.mark.parametrize("fault, error", [
    ("garbled", "RequestFailed: UndecodableReply: no decodable reply in 3 tries; the last: JSONDecodeError: Unterminated string"),
    ("drop", "RequestFailed: APIConnectionError: Connection error. (RemoteProtocolError: Server disconnected without sending"),
])
def test_undecodable_past_max_retries_is_failed_uncached_and_asked_again(server, fault, error):
    bad = CANDS[1]
    server.fault = lambda prompt: (fault,) if bad in prompt else None
    judge = judge_for(server, "judge.max_retries=2", "judge.parse_retries=2")
    out = judge.score(PROMPT, CANDS)
    assert [j.outcome for j in out] == ["scored", "failed", "scored"]
    assert out[1].error.startswith(error) and out[1].score is None and out[1].raw is None
    assert KEY not in out[1].model_dump_json()
    assert kinds(server) == {"ok": 2, fault: 3}  # max_retries + 1 tries; a fault is not re-asked as a parse error
    import sqlite3

    with sqlite3.connect(judge.cache.path) as db:  # what another process reads from disk
        on_disk = db.execute("SELECT COUNT(*) FROM replies").fetchone()[0]
    assert len(judge.cache) == on_disk == 2  # only the replies that parsed

    server.fault = None  # the server recovers: a second run asks only for the failed judgment
    again = judge_for(server, "judge.max_retries=2").score(PROMPT, CANDS)
    assert [j.outcome for j in again] == ["scored"] * 3 and [j.cached for j in again] == [1, 0, 1]
    assert len(server.requests) == 5 + 1 and bad in server.requests[-1]["body"]["messages"][0]["content"]


def test_weighted_self_judge_on_a_served_policy_asks_again(server, tiny_model_dir):
    server.next_token = lambda prompt: {"4": 0.9, "2": 0.1}
    server.script = [("not_completion",), ("drop",), ("garbled",)]
    cfg = load_config(None, ["judge.kind=self", "sampling.backend=openai", f"sampling.server.base_url={server.url}",
                             "sampling.server.max_retries=2"])
    judge = build_judge(cfg.judge, tiny_model_dir, sampling=cfg.sampling)
    try:
        (out,) = judge.score(PROMPT, ["Red."])
    finally:
        close_judge(judge)
    assert out.outcome == "scored" and out.score == pytest.approx(4 * 0.9 + 2 * 0.1)
    # not_completion: asked again; drop: the client's own retry, which gets garbled: asked again; ok
    assert len(server.requests) == 4


def test_sampler_asks_again_through_every_fault(server, tiny_model_dir):
    count = itertools.count()
    server.responder = lambda prompt: f"Answer {next(count)}"
    server.script = [("truncated",), ("not_completion",), ("drop",), ("invalid_json",), ("cut_headers",)]
    cfg = SamplingServerSection(base_url=server.url, concurrency=1, max_retries=3, timeout_s=10)
    out = OpenAISampler(tiny_model_dir, cfg).generate(["Say hi."], SamplingParams(n=2, max_new_tokens=8),
                                                      show_progress=False)
    # each dropped connection is asked again by the client, each undecodable reply by nash
    assert [c.text for c in out[0]] == ["Answer 0", "Answer 1"] and len(server.requests) == 6

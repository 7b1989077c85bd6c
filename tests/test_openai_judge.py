"""The `openai` judge through the real OpenAI client against a scripted loopback server."""

import json
import time

import pytest

from nash.config import load_config
from nash.judges import build_judge
from nash.judging import judge_samples, outcome_counts
from nash.records import Prompt, Sample, read_jsonl
from tests.openai_server import OpenAIServer

PROMPT = Prompt(id="p1", text="Name a colour.")
CANDS = ["Red.", "Blue is a colour.", "Green, like grass in spring."]


@pytest.fixture
def server():
    with OpenAIServer() as s:
        yield s


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("NASH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-do-not-leak-123")


def judge_for(server, *sets):
    cfg = load_config(None, ["judge.kind=openai", f"judge.base_url={server.url}", "judge.max_retries=3",
                             "judge.timeout_s=5", *sets])
    return build_judge(cfg.judge)


def test_pointwise_scores_usage_and_cost(server):
    judge = judge_for(server, "judge.repeats=2")
    out = judge.score(PROMPT, CANDS)
    assert [j.outcome for j in out] == ["scored"] * 3
    assert all(0 <= j.score <= 5 and len(j.details["scores"]) == 2 for j in out)
    assert len(server.requests) == 6 and all(j.requests == 2 for j in out)
    assert server.requests[0]["body"]["model"] == "gpt-4-turbo"
    assert server.requests[0]["headers"]["authorization"] == "Bearer sk-test-do-not-leak-123"
    tokens_in = sum(j.tokens_in for j in out)
    tokens_out = sum(j.tokens_out for j in out)
    assert tokens_in > 0 and tokens_out > 0
    assert sum(j.cost_usd for j in out) == pytest.approx((tokens_in * 10 + tokens_out * 30) / 1e6)


def test_429_with_retry_after_and_500_are_retried(server):
    judge = judge_for(server)
    server.script = [("429", 1), ("500",)]
    out = judge.score(PROMPT, CANDS[:1])
    assert out[0].outcome == "scored"
    assert len(server.requests) == 3  # 429, 500, then the good reply
    assert server.requests[1]["t"] - server.requests[0]["t"] >= 0.9  # waited for Retry-After: 1


def test_slow_reply_times_out_and_is_retried(server):
    judge = judge_for(server, "judge.timeout_s=0.5")
    server.script = [("slow", 2.0, "Score: 4")]
    out = judge.score(PROMPT, CANDS[:1])
    assert out[0].outcome == "scored" and len(server.requests) == 2


def test_retries_exhausted_is_a_failed_judgment_not_a_preference(server):
    judge = judge_for(server, "judge.max_retries=1")
    server.script = [("500",), ("500",)]
    out = judge.score(PROMPT, CANDS[:1])
    assert out[0].outcome == "failed" and out[0].score is None
    assert "InternalServerError" in out[0].error


def test_malformed_json_is_reasked_then_recorded_with_raw_text(server):
    judge = judge_for(server, "judge.protocol=batched", "judge.parse_retries=1")
    server.script = [("ok", "{not json"), ("ok", '{"A_score": 5, "B_score": 2, "C_score": 9}')]
    out = judge.score(PROMPT, CANDS)
    assert len(server.requests) == 2
    # A and B parsed from the second reply; C's 9 is off the 6-point scale: failed, raw kept.
    assert [(j.outcome, j.score) for j in out] == [("scored", 5.0), ("scored", 2.0), ("failed", None)]
    assert out[2].raw == '{"A_score": 5, "B_score": 2, "C_score": 9}' and "C" in out[2].error
    assert out[0].raw == out[2].raw and out[1].raw is None  # the reply once, plus where it explains a failure
    assert sum(j.requests for j in out) == 2


def test_missing_scores_fail_only_those_candidates(server):
    judge = judge_for(server, "judge.protocol=batched", "judge.parse_retries=0")
    server.script = [("ok", 'Here: {"A_justification": "good", "A_score": 6, "C_score": "3"}')]
    out = judge.score(PROMPT, CANDS)
    assert [j.outcome for j in out] == ["scored", "failed", "scored"]
    assert out[1].error.startswith("ParseError: missing or invalid scores for B")


def test_pointwise_reply_without_score_is_failed_after_reasks(server):
    judge = judge_for(server, "judge.parse_retries=2")
    server.script = [("ok", "no verdict"), ("ok", "still none"), ("ok", "nothing")]
    out = judge.score(PROMPT, CANDS[:1])
    assert out[0].outcome == "failed" and out[0].raw == "nothing" and len(server.requests) == 3


def test_cache_second_run_makes_zero_requests(server):
    judge_for(server, "judge.protocol=batched").score(PROMPT, CANDS)
    first = len(server.requests)
    again = judge_for(server, "judge.protocol=batched").score(PROMPT, CANDS)
    assert first == 1 and len(server.requests) == first
    assert again[0].cached == 1 and again[0].requests == 0 and again[0].cost_usd == 0
    # Another model is another judge: its replies are not served from this cache.
    judge_for(server, "judge.protocol=batched", "judge.model=gpt-4o").score(PROMPT, CANDS)
    assert len(server.requests) == 2


def test_pairwise_counts_only_agreement(server):
    judge = judge_for(server, "judge.protocol=pairwise")
    c = judge.compare(PROMPT, "Short.", "A much longer answer.")
    assert (c.outcome, c.winner, c.requests) == ("preferred", 0, 2)
    # A judge that always names the first position disagrees with itself across orders: a tie.
    biased = OpenAIServer(responder=lambda p: "Better: a")
    with biased:
        j = judge_for(biased, "judge.protocol=pairwise", "judge.cache=false")
        assert j.compare(PROMPT, "Short.", "A much longer answer.").outcome == "tie"
        scores = j.score(PROMPT, CANDS)
        assert [s.score for s in scores] == [0.5, 0.5, 0.5]
    out = judge.score(PROMPT, CANDS)  # shortest wins all its comparisons
    assert [s.score for s in out] == [1.0, 0.5, 0.0]


def test_budget_stops_judging_and_keeps_what_was_judged(server, tmp_path):
    prompts = {f"p{i}": Prompt(id=f"p{i}", text=f"Question {i}?") for i in range(6)}
    samples = [Sample(prompt_id=pid, candidate=k, prompt=p.text, response=f"answer {k} to {pid}",
                      num_tokens=4, policy="iter_000") for pid, p in prompts.items() for k in range(2)]
    judge = judge_for(server, "judge.concurrency=1", "judge.budget_tokens=300")
    out_path = tmp_path / "judgments.jsonl"
    judgments, info = judge_samples(judge, prompts, samples, out_path)
    judged = {j.prompt_id for j in judgments}
    assert info["budget_stop"] and "judge.budget_tokens=300" in info["budget_stop"]
    assert 0 < len(judged) < 6 and info["unjudged_prompts"] == 6 - len(judged)
    assert len(read_jsonl(out_path, type(judgments[0]))) == 2 * len(judged)
    assert judge.budget.tokens >= 300
    counts = outcome_counts(judgments)
    assert counts["scored"] == 2 * len(judged) and counts["requests"] == len(server.requests)


def test_outcome_counts_in_a_resumed_stage(server, tmp_path):
    prompts = {"a": Prompt(id="a", text="Q?"), "b": Prompt(id="b", text="R?")}
    samples = [Sample(prompt_id=pid, candidate=k, prompt="x", response=f"{pid}{k}", num_tokens=1, policy="p")
               for pid in prompts for k in range(2)]
    server.script = [("500",)] * 8  # every try of the first request fails
    judge = judge_for(server, "judge.concurrency=1", "judge.max_retries=0", "judge.cache=false")
    judgments, _ = judge_samples(judge, prompts, samples, tmp_path / "j.jsonl")
    counts = outcome_counts(judgments)
    assert counts["failed"] >= 1 and counts["failed"] + counts["scored"] == 4
    lines = [json.loads(x) for x in (tmp_path / "j.jsonl").read_text().splitlines()]
    assert len(lines) == 4 and all("sk-test" not in json.dumps(x) for x in lines)


def test_api_key_is_scrubbed_from_recorded_errors(server):
    judge = judge_for(server, "judge.max_retries=0")
    server.script = [("401",)]
    out = judge.score(PROMPT, CANDS[:1])
    assert out[0].outcome == "failed" and "AuthenticationError" in out[0].error
    assert "sk-test-do-not-leak-123" not in out[0].model_dump_json() and "***" in out[0].error


def test_missing_api_key_names_the_variable(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY")
    cfg = load_config(None, ["judge.kind=openai"])
    with pytest.raises(ValueError, match="judge.api_key_env: environment variable OPENAI_API_KEY is not set"):
        build_judge(cfg.judge)


def test_requests_in_flight_never_exceed_concurrency(server, tmp_path):
    import threading

    active, peak, lock = [0], [0], threading.Lock()

    def slow_reply(prompt):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.05)
        with lock:
            active[0] -= 1
        return "Score: 3"

    server.responder = slow_reply
    prompts = {f"p{i}": Prompt(id=f"p{i}", text=f"Q{i}") for i in range(6)}
    samples = [Sample(prompt_id=pid, candidate=k, prompt="x", response=f"{pid}-{k}", num_tokens=1, policy="p")
               for pid in prompts for k in range(4)]
    judge = judge_for(server, "judge.concurrency=3", "judge.cache=false")
    judgments, _ = judge_samples(judge, prompts, samples, tmp_path / "j.jsonl")
    assert len(judgments) == 24 and len(server.requests) == 24
    assert 1 < peak[0] <= 3


def test_replies_are_cached_as_they_arrive_not_when_the_batch_ends(server):
    import threading
    import time

    judge = judge_for(server, "judge.concurrency=3")
    # The first request is held; the other two answer at once and are cached while it waits, so a
    # kill meanwhile would repay only the one in flight.
    release = threading.Event()
    server.script = [("hold", release, "Fine.\nScore: 4")]
    done = threading.Thread(target=judge.score, args=(PROMPT, CANDS))
    done.start()
    deadline = time.monotonic() + 30
    while len(judge.cache) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert done.is_alive() and len(judge.cache) == 2
    release.set()
    done.join()
    assert len(judge.cache) == 3

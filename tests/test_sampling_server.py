"""The openai sampling backend against a loopback OpenAI-compatible server."""

import itertools

import pytest

from nash.config import SamplingServerSection
from nash.sampling import SamplingParams
from nash.sampling.server import OpenAISampler
from nash.vllm_engine import EngineFailed
from tests.openai_server import OpenAIServer


def counter_responder():
    count = itertools.count()
    return lambda prompt: f"Answer {next(count)} to: {prompt}"


def sampler(server, tiny_model_dir, tmp_path=None, **kw):
    cfg = SamplingServerSection(base_url=server.url, concurrency=2, max_retries=2, timeout_s=10, **kw)
    return OpenAISampler(tiny_model_dir, cfg, tmp_path)


def test_k_samples_per_prompt_through_n(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-sampling-secret")
    with OpenAIServer(responder=counter_responder()) as server:
        s = sampler(server, tiny_model_dir, tmp_path)
        out = s.generate(["Say hi.", "Count to three."], SamplingParams(n=3, temperature=0.7, top_p=0.9,
                                                                         max_new_tokens=12, seed=5))
        assert [len(cs) for cs in out] == [3, 3]
        assert len({c.text for c in out[0]}) == 3 and all("Say hi." in c.text for c in out[0])
        assert all(c.num_tokens == s.count_tokens(c.text) > 0 for cs in out for c in cs)
        bodies = [r["body"] for r in server.requests]
        assert len(bodies) == 2 and {b["n"] for b in bodies} == {3}
        assert bodies[0]["model"] == tiny_model_dir  # {policy} becomes the policy's path
        assert {b["temperature"] for b in bodies} == {0.7} and {b["max_tokens"] for b in bodies} == {12}
        assert {b["seed"] for b in bodies} == {5} and {b["top_p"] for b in bodies} == {0.9}
        assert server.requests[0]["headers"]["authorization"] == "Bearer sk-sampling-secret"
        assert s.info["sequences"] == 6 and s.info["tokens_per_second"] > 0


def test_server_that_ignores_n_is_asked_again(tiny_model_dir):
    with OpenAIServer(responder=counter_responder()) as server:
        server.honour_n = False
        out = sampler(server, tiny_model_dir).generate(["Say hi."], SamplingParams(n=3, max_new_tokens=8))
        assert len(out[0]) == 3 and len({c.text for c in out[0]}) == 3
        assert [r["body"]["n"] for r in server.requests] == [3, 2, 1]


def test_transient_faults_are_retried(tiny_model_dir):
    with OpenAIServer(responder=counter_responder()) as server:
        server.script = [("500",), ("429", 0), ("garbled",), ("500",)]
        out = sampler(server, tiny_model_dir).generate(["Say hi."], SamplingParams(n=2, max_new_tokens=8))
        assert len(out[0]) == 2
        assert len(server.requests) == 5


def test_failure_names_the_key_keeps_answers_and_hides_the_api_key(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-sampling-secret")
    prompts = ["First prompt.", "Second prompt.", "Third prompt."]
    params = SamplingParams(n=2, max_new_tokens=8)
    with OpenAIServer(responder=counter_responder()) as server:
        # concurrency 1 through the script: the first prompt is answered, then every reply is garbled
        s = sampler(server, tiny_model_dir, tmp_path)
        s.cfg = s.cfg.model_copy(update={"concurrency": 1})
        server.script = [("ok", "a first answer")] + [("garbled",)] * 40
        with pytest.raises(EngineFailed, match=r"sampling\.server\.base_url") as err:
            s.generate(prompts, params)
        assert "sk-sampling-secret" not in str(err.value)
        asked = len(server.requests)
        server.script = []
        out = sampler(server, tiny_model_dir, tmp_path).generate(prompts, params)
        assert [len(cs) for cs in out] == [2, 2, 2]
        # the answered prompt is not asked again: 2 more prompts, one request each
        assert len(server.requests) == asked + 2
        assert out[0][0].text == "a first answer"
    assert "sk-sampling-secret" not in (tmp_path / "server.jsonl").read_text()


def test_missing_key_names_the_sampling_key(tiny_model_dir, monkeypatch):
    monkeypatch.delenv("NASH_TEST_KEY", raising=False)
    from nash.config import SamplingServerSection as S

    cfg = S(base_url=None, api_key_env="NASH_TEST_KEY")
    with pytest.raises(ValueError, match=r"sampling\.server\.api_key_env: environment variable NASH_TEST_KEY"):
        OpenAISampler(tiny_model_dir, cfg)

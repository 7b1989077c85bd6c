"""The self judge on a served policy (sampling.backend openai), against a loopback OpenAI server."""

import pytest

from nash.config import load_config
from nash.judges import build_judge, close_judge
from nash.judges.local import SCORE_PREFIXES, option_tokens
from nash.records import Prompt
from tests.openai_server import OpenAIServer


def served_cfg(url, *extra):
    return load_config(None, ["judge.kind=self", "sampling.backend=openai", f"sampling.server.base_url={url}",
                              "sampling.server.max_retries=0", *extra])


def test_weighted_self_judgment_reads_the_served_policys_next_token(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("NASH_CACHE", str(tmp_path))
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    tops = {"good": {"4": 0.5, "2": 0.1, "5": 0.1, " the": 0.2},  # the scale holds 0.7 of the mass
            "empty": {" the": 0.6, "Score": 0.4}}                # no score token among the top

    with OpenAIServer() as srv:
        srv.next_token = lambda prompt: tops["good" if "<response>good" in prompt.replace("\n", "") else "empty"]
        cfg = served_cfg(srv.url)
        judge = build_judge(cfg.judge, tiny_model_dir, sampling=cfg.sampling)
        try:
            good, empty = judge.score(Prompt(id="p", text="Say hi."), ["good", "nothing"])
        finally:
            close_judge(judge)

    assert good.outcome == "scored" and good.score == pytest.approx((4 * 0.5 + 2 * 0.1 + 5 * 0.1) / 0.7, abs=1e-4)
    assert "probability on the scale 0.700" in good.raw and good.tokens_in > 0
    assert empty.outcome == "failed" and "none of ['0', '1', '2', '3', '4', '5'] among the top 20" in empty.error
    assert empty.requests == 1  # a distribution is not re-asked: the same request gives the same one
    from transformers import AutoTokenizer

    prefix, _ = option_tokens(AutoTokenizer.from_pretrained(tiny_model_dir), SCORE_PREFIXES,
                              [str(v) for v in range(6)], [str(v) for v in range(6)])
    body = srv.requests[0]["body"]
    assert body["messages"][-1] == {"role": "assistant", "content": prefix}
    assert body["continue_final_message"] is True and body["add_generation_prompt"] is False
    assert body["max_tokens"] == 1 and body["top_logprobs"] == 20 and body["temperature"] == 0.0
    assert body["model"] == tiny_model_dir  # sampling.server.model "{policy}"


def test_weighted_pairwise_annotation_on_a_served_policy(tiny_model_dir, tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    from nash.judges.local import CHOICE_PREFIXES, CHOICES

    monkeypatch.setenv("NASH_CACHE", str(tmp_path))
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    prefix, ids = option_tokens(tok, CHOICE_PREFIXES, CHOICES, ("a", "b"))
    a, b = tok.decode([ids["a"]]), tok.decode([ids["b"]])  # the tokens as the server names them
    assert (prefix, a) == ("Better:", " a")  # this tokenizer writes " a" after "Better:"
    with OpenAIServer() as srv:
        # "brief" is preferred with probability 0.8 in whichever position it stands; the bare
        # letters are other tokens, and must not count
        srv.next_token = lambda p: ({a: 0.7, b: 0.175, "b": 0.125} if "[Output (a)]\nbrief" in p
                                    else {a: 0.175, b: 0.7, "a": 0.125})
        cfg = served_cfg(srv.url, "judge.protocol=pairwise")
        judge = build_judge(cfg.judge, tiny_model_dir, sampling=cfg.sampling)
        first = judge.compare(Prompt(id="p", text="Say hi."), "brief", "long answer")
        second = judge.compare(Prompt(id="p", text="Say hi."), "long answer", "brief")
    assert first.winner == 0 and first.details["p_a"] == pytest.approx(0.8)
    assert second.winner == 1 and second.details["p_a"] == pytest.approx(0.2)
    assert all(r["body"]["messages"][-1]["content"] == prefix for r in srv.requests)

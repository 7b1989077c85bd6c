"""judge_samples: chunks of prompts for judges that batch across prompts, the append-only file, resume."""

import pytest

from nash import judging
from nash.config import load_config
from nash.judges import build_judge
from nash.judging import batch_limits, chunks, judge_samples
from nash.records import Judgment, Prompt, Sample, read_jsonl

PROMPTS = {f"p{i}": Prompt(id=f"p{i}", text=f"Describe thing {i} briefly.") for i in range(5)}
SAMPLES = [Sample(prompt_id=pid, candidate=k, prompt=p.text, response=["ok", "a thing", "It is a thing, briefly.",
                                                                       "no"][k] + f" {pid}", num_tokens=3, policy="tiny")
           for pid, p in PROMPTS.items() for k in range(4)]


def _self_judge(tiny_model_dir, *overrides):
    from nash.precision import resolve

    cfg = load_config(None, ["judge.kind=self", "judge.cache=false", *overrides]).judge
    return build_judge(cfg, policy_path=tiny_model_dir, precision=resolve("fp32"))


def _calls(obj, name: str) -> list:
    """Wrap `obj.name`: the first argument of each call."""
    seen, f = [], getattr(obj, name)

    def wrapped(first, *a, **kw):
        seen.append(first)
        return f(first, *a, **kw)

    setattr(obj, name, wrapped)
    return seen


def test_chunks_hold_about_batch_requests_and_at_least_one_prompt():
    pids = list("abcde")
    assert list(chunks(zip(pids, [4] * 5), [(16, lambda k: k)])) == [list("abcd"), ["e"]]
    assert list(chunks(zip(pids, [4] * 5), [(16, lambda k: k * (k - 1))])) == [["a"], ["b"], ["c"], ["d"], ["e"]]
    assert list(chunks(zip(pids, [4] * 5), [(2, lambda k: k)])) == [[p] for p in pids]  # a prompt over the limit: alone
    assert list(chunks(zip(pids, [1, 1, 6, 1, 1]), [(8, lambda k: k)])) == [list("abc"), list("de")]
    # every limit holds: quality (k + 1 of 12) and a local LM (k of 16)
    assert list(chunks(zip(pids, [4] * 5), [(12, lambda k: k + 1), (16, lambda k: k)])) == [list("ab"), list("cd"), ["e"]]
    assert list(chunks(zip([], []), [(16, lambda k: k)])) == []


def test_only_local_judges_are_chunked(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("NASH_CACHE", str(tmp_path))
    monkeypatch.setenv("NASH_TEST_KEY", "k")
    local = _self_judge(tiny_model_dir, "judge.batch_size=12")
    assert [(n, f(4)) for n, f in batch_limits(local)] == [(12, 4)]
    assert batch_limits(build_judge(load_config(None, ["judge.kind=rules"]).judge)) == []
    default = build_judge(load_config(None, []).judge)  # composite of quality (64 texts a pass) and rules
    assert [(n, f(4)) for n, f in batch_limits(default)] == [(64, 5)]
    remote = ["kind: openai", "base_url: 'http://127.0.0.1:9/v1'", "api_key_env: NASH_TEST_KEY"]
    assert batch_limits(build_judge(load_config(None, [f"judge={{{', '.join(remote)}}}"]).judge)) == []
    mixed = load_config(None, [f"judge={{kind: composite, components: [{{kind: quality}}, {{{', '.join(remote)}}}]}}"])
    assert batch_limits(build_judge(mixed.judge)) == []  # a remote component keeps its concurrency


def test_local_judge_batches_requests_of_several_prompts(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("NASH_CACHE", str(tmp_path))
    judge = _self_judge(tiny_model_dir, "judge.batch_size=8")
    requests = _calls(judge.backend, "complete")
    writes = _calls(judging, "append_jsonl")
    progress = []
    judgments, info = judge_samples(judge, PROMPTS, SAMPLES, tmp_path / "j.jsonl", lambda d, t: progress.append((d, t)))
    # 4 candidates a prompt, 8 requests a pass: two prompts in each call of the backend.
    assert [len(r) for r in requests] == [8, 8, 4]
    assert [sorted({pid for m in r for pid, p in PROMPTS.items() if p.text in m[-1]["content"]}) for r in requests] \
        == [["p0", "p1"], ["p2", "p3"], ["p4"]]
    assert len(writes) == 3 and progress == [(2, 5), (4, 5), (5, 5)]
    assert info["unjudged_prompts"] == 0 and info["budget_stop"] is None
    assert info["records"] == len(SAMPLES) and info["counts"]["scored"] == len(SAMPLES)
    on_disk = read_jsonl(tmp_path / "j.jsonl", Judgment)
    assert [(j.prompt_id, j.candidate) for j in on_disk] == [(s.prompt_id, s.candidate) for s in SAMPLES]
    one_by_one = [j for pid in PROMPTS for j in judge.score(PROMPTS[pid], [s.response for s in SAMPLES
                                                                         if s.prompt_id == pid])]
    assert [j.score for j in on_disk] == pytest.approx([j.score for j in one_by_one], abs=1e-5)  # fp32
    assert all(j.outcome == "scored" for j in judgments)


def test_judge_samples_resumes_after_a_kill_in_the_second_chunk(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("NASH_CACHE", str(tmp_path))
    judge = _self_judge(tiny_model_dir, "judge.batch_size=8")
    out = tmp_path / "j.jsonl"
    score_batch = judge.score_batch

    def killed(items):
        if out.is_file():
            raise KeyboardInterrupt  # the stage killed while the second chunk is being judged
        return score_batch(items)

    judge.score_batch = killed
    with pytest.raises(KeyboardInterrupt):
        judge_samples(judge, PROMPTS, SAMPLES, out)
    assert [j.prompt_id for j in read_jsonl(out, Judgment)] == ["p0"] * 4 + ["p1"] * 4
    with open(out, "a", encoding="utf-8") as f:
        f.write('{"prompt_id": "p2", "candid')  # and a last line cut short

    judge.score_batch = score_batch
    asked = _calls(judge, "score_batch")
    judgments, info = judge_samples(judge, PROMPTS, SAMPLES, out)
    # The prompts judged in full are not judged again; the others are, in chunks as before.
    assert [[p.id for p, _ in items] for items in asked] == [["p2", "p3"], ["p4"]]
    on_disk = read_jsonl(out, Judgment)
    assert sorted((j.prompt_id, j.candidate) for j in on_disk) == sorted((s.prompt_id, s.candidate) for s in SAMPLES)
    assert len(judgments) == len(SAMPLES) and info["unjudged_prompts"] == 0
    straight, _ = judge_samples(_self_judge(tiny_model_dir, "judge.batch_size=8"), PROMPTS, SAMPLES, tmp_path / "s.jsonl")
    assert {(j.prompt_id, j.candidate): j.score for j in on_disk} == \
           pytest.approx({(j.prompt_id, j.candidate): j.score for j in straight}, abs=1e-5)


def test_judging_from_a_samples_file_keeps_nothing_and_counts_everything(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("NASH_CACHE", str(tmp_path))
    from nash.records import write_jsonl

    path = write_jsonl(tmp_path / "samples.jsonl", SAMPLES)
    out = tmp_path / "j.jsonl"
    judge = _self_judge(tiny_model_dir, "judge.batch_size=8")
    kept, info = judge_samples(judge, PROMPTS, path, out, keep=False)
    assert kept == [] and info["records"] == len(SAMPLES) and info["unjudged_prompts"] == 0
    # A kill in the middle of the last prompt's block of lines: that prompt alone is judged again.
    lines = out.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:-2]))
    asked = _calls(judge, "score_batch")
    _, again = judge_samples(judge, PROMPTS, path, out, keep=False)
    assert [[p.id for p, _ in items] for items in asked] == [["p4"]]
    assert again["records"] == len(SAMPLES) == len(read_jsonl(out, Judgment))
    assert again["counts"] == info["counts"] | {"cached": again["counts"]["cached"]}


def test_budget_stops_chunked_judging_after_the_chunk_that_spent_it(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("NASH_CACHE", str(tmp_path))
    judge = _self_judge(tiny_model_dir, "judge.batch_size=8", "judge.budget_tokens=1")
    judgments, info = judge_samples(judge, PROMPTS, SAMPLES, tmp_path / "j.jsonl")
    assert {j.prompt_id for j in judgments} == {"p0", "p1"}
    assert info["unjudged_prompts"] == 3 and "budget_tokens=1 spent" in info["budget_stop"]


def test_judgment_cache_survives_a_kill_and_imports_the_old_jsonl(tmp_path):
    import json
    import subprocess
    import sys

    from nash.judges.cache import JudgmentCache

    path = tmp_path / "judge.sqlite"
    # Old-format replies beside it are imported once, then set aside.
    path.with_suffix(".jsonl").write_text(json.dumps({"key": "old", "reply": {"text": "5"}}) + "\n" + '{"key": "cut')
    code = ("import os, sys; from nash.judges.cache import JudgmentCache\n"
            "c = JudgmentCache(sys.argv[1])\n"
            "for i in range(500): c.put(f'k{i}', {'text': str(i)})\n"
            "os.kill(os.getpid(), 9)\n")
    assert subprocess.run([sys.executable, "-c", code, str(path)]).returncode == -9
    cache = JudgmentCache(path)
    assert len(cache) == 501 and cache.get("k499") == {"text": "499"} and cache.get("old") == {"text": "5"}
    assert cache.get("missing") is None
    assert not path.with_suffix(".jsonl").exists() and path.with_suffix(".jsonl.imported").is_file()

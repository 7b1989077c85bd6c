"""`nash distill` (a reward model trained with TRL's RewardTrainer on the run's own judgments) and the
`cascade` judge that routes between it and the teacher."""

import json
import random

import pytest

from nash.config import load_config
from nash.distill import (
    _teacher_verdicts,
    distill,
    isotonic_map,
    prompt_pairs,
    resolve_cascade,
    student_report,
    thresholds,
)
from nash.judges import build_judge
from nash.judging import judge_samples
from nash.pairs import select_pairs
from nash.records import Judgment, Prompt, Sample, write_jsonl
from nash.registry import IterationDir, RunDir
from tests.openai_server import OpenAIServer

WORDS = ["river", "stone", "cloud", "paper", "light", "green", "table", "music", "bread", "north"]


# -- pairs, thresholds, report: pure functions on small inputs -------------------------


def test_pairs_from_scores_leave_out_ties_and_failures():
    verdicts = {0: (1.0, []), 1: (0.5, []), 2: (0.5, []), 3: (None, [])}
    assert prompt_pairs(verdicts, 0.0, 6) == [(0, 1, 0.5), (0, 2, 0.5)]  # 1 and 2 tie; 3 failed
    assert prompt_pairs(verdicts, 0.6, 6) == []
    assert prompt_pairs(verdicts, 0.0, 1) == [(0, 1, 0.5)]
    # Pairwise verdicts give pairs directly, from the winner's record only.
    direct = {0: (0.5, [1]), 1: (0.5, [2]), 2: (0.0, []), 3: (None, [])}
    assert prompt_pairs(direct, 0.0, 6) == [(0, 1, None), (1, 2, None)]


def test_teacher_verdicts_skip_what_the_student_decided(tmp_path):
    path = tmp_path / "judgments.jsonl"
    write_jsonl(path, [
        Judgment(prompt_id="a", candidate=0, judge="rules", outcome="scored", score=1.0,
                 details={"decided_by": "teacher"}),
        Judgment(prompt_id="a", candidate=1, judge="rules", outcome="failed", error="x"),
        Judgment(prompt_id="b", candidate=0, judge="reward_model", outcome="scored", score=0.9,
                 details={"decided_by": "student"}),
    ])
    v = _teacher_verdicts(path)
    assert v["a"] == {0: (1.0, []), 1: (None, [])} and "b" not in v


def test_thresholds_need_enough_prompts_and_take_ties_together():
    routes = [(3.0, True)] * 8 + [(2.0, True), (2.0, False)] + [(1.0, False)] * 10
    t = thresholds(routes, targets=(0.9, 0.8, 0.5), min_routed=5)
    assert t["0.9"] == {"threshold": 2.0, "coverage": 0.5, "agreement": 0.9, "prompts": 10}
    assert t["0.5"]["threshold"] == 2.0  # 9/20 at 1.0 falls below 0.5
    assert thresholds(routes, targets=(0.99,), min_routed=9)["0.99"] is None  # 3.0 covers only 8


def test_report_measures_accuracy_against_the_teachers_order():
    heldout = [{"prompt_id": f"p{i}", "candidates": [{"candidate": 0, "teacher": 1.0}, {"candidate": 1, "teacher": 0.0}],
                "pairs": [[0, 1]]} for i in range(20)]
    # The student agrees on 15 prompts with margin 2, disagrees on 5 with margin 0.5.
    student = {}
    for i in range(20):
        good = i < 15
        student[(f"p{i}", 0)], student[(f"p{i}", 1)] = (2.0, 0.0) if good else (0.0, 0.5)
    rep = student_report(heldout, student)
    assert rep["accuracy"] == 0.75 and 0.09 < rep["accuracy_se"] < 0.11
    assert rep["routing"]["thresholds"]["0.9"]["threshold"] == 2.0
    assert rep["routing"]["thresholds"]["0.9"]["coverage"] == 0.75
    m = rep["score_map"]
    assert m["x"] == sorted(m["x"]) and m["y"] == sorted(m["y"]) and m["y"][-1] == 1.0


def test_isotonic_map_is_monotone():
    m = isotonic_map([3.0, 1.0, 2.0, 4.0], [1.0, 0.0, 0.6, 0.4])
    assert m["x"] == [1.0, 2.0, 3.0, 4.0] and m["y"] == pytest.approx([0.0, 0.6, 0.7, 0.7])


# -- a run whose teacher prefers answers that begin "Yes" -------------------------------


def _teacher_score(text: str) -> float:
    return 1.0 if text.startswith("Yes") else 0.0


def _candidates(rng, n_prompts, start=0):
    out = []
    for p in range(start, start + n_prompts):
        for k in range(4):
            lead = "Yes" if (k + p) % 2 == 0 else "No"
            out.append(Sample(prompt_id=f"p{p}", candidate=k, prompt=f"Question {p}: is it {rng.choice(WORDS)}?",
                              response=f"{lead}, " + " ".join(rng.choice(WORDS) for _ in range(6)) + ".",
                              num_tokens=9, policy="iter_000"))
    return out


@pytest.fixture(scope="module")
def distilled(tmp_path_factory, tiny_model_dir):
    """A run of one complete iteration judged by a 'Yes' teacher, and its distilled reward model."""
    tmp = tmp_path_factory.mktemp("distill")
    cfg = load_config(None, [f"policy.model={tiny_model_dir}", "judge.kind=rules", "distill.learning_rate=3e-3",
                             "distill.epochs=4", "distill.batch_size=8", "distill.holdout=0.3",
                             "distill.max_length=64", "distill.precision=fp32", "run.name=taught"])
    run = RunDir.create(tmp, cfg)
    it = IterationDir(run, 1)
    it.path.mkdir()
    samples = _candidates(random.Random(0), 60)
    judgments = [Judgment(prompt_id=s.prompt_id, candidate=s.candidate, judge="rules", outcome="scored",
                          score=_teacher_score(s.response)) for s in samples]
    judgments[1] = Judgment(prompt_id="p0", candidate=1, judge="rules", outcome="failed", error="unparsable")
    write_jsonl(it.samples, samples)
    write_jsonl(it.judgments, judgments)
    it.update_manifest(status="complete")
    version = distill(run)
    return run, version


def _untrained_accuracy(tmp_path, tiny_model_dir, version):
    """The same backbone with a fresh head, scored on the same held-out pairs."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model.config.pad_token_id = tok.pad_token_id
    model.save_pretrained(tmp_path / "untrained")
    tok.save_pretrained(tmp_path / "untrained")
    judge = build_judge(load_config(None, ["judge.kind=reward_model", f"judge.model={tmp_path / 'untrained'}",
                                           "judge.precision=fp32"]).judge)
    held = [json.loads(line) for line in (version / "heldout.jsonl").read_text().splitlines()]
    scores = {}
    for g in held:
        js = judge.score(Prompt(id=g["prompt_id"], text=g["prompt"]), [c["response"] for c in g["candidates"]])
        scores.update({(g["prompt_id"], c["candidate"]): j.score for c, j in zip(g["candidates"], js)})
    return student_report(held, scores)["accuracy"]


def test_distilled_model_learns_the_teachers_order_on_held_out_prompts(distilled, tmp_path, tiny_model_dir):
    run, version = distilled
    report = json.loads((version / "report.json").read_text())
    assert version.name == "v001" and (version / "model" / "config.json").is_file()
    assert report["iterations"] == [1] and set(report["sources"]["iter_001"]) == {"judgments", "samples"}
    # p0 lost its failed candidate: 2 "Yes" x 1 "No" pairs there, 2 x 2 elsewhere; no pair from a tie.
    assert report["train_pairs"] + report["heldout_pairs"] == 59 * 4 + 2
    assert report["train"]["pairs_used"] == report["train_pairs"] and report["train"]["steps"] > 0
    pairs = [json.loads(line) for line in (version / "pairs.jsonl").read_text().splitlines()]
    assert all(p["chosen"].startswith("Yes") and p["rejected"].startswith("No") for p in pairs)
    held_ids = {json.loads(line)["prompt_id"] for line in (version / "heldout.jsonl").read_text().splitlines()}
    assert held_ids and not held_ids & {p["prompt_id"] for p in pairs}  # split by prompt
    before = _untrained_accuracy(tmp_path, tiny_model_dir, version)
    assert report["accuracy"] >= 0.9 and report["accuracy"] > before + 0.2, (before, report["accuracy"])
    assert report["routing"]["prompts"] == len(held_ids)


# -- the cascade -------------------------------------------------------------------------


@pytest.fixture
def judge_env(tmp_path, monkeypatch):
    monkeypatch.setenv("NASH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-do-not-leak-123")


def _cascade(run, server, threshold, *extra):
    cfg = load_config(None, ["judge.kind=cascade", "judge.student.kind=reward_model",
                             "judge.student.model=distill:latest", "judge.student.precision=fp32",
                             "judge.teacher.kind=openai", f"judge.teacher.base_url={server.url}",
                             "judge.teacher.max_retries=0", "judge.teacher.protocol=pointwise",
                             f"judge.threshold={threshold}", *extra])
    jcfg, info = resolve_cascade(run, cfg.judge)
    assert info == {"student": "distill/v001"}
    return build_judge(jcfg)


def _fresh(n=12):
    samples = _candidates(random.Random(1), n, start=100)
    prompts = {s.prompt_id: Prompt(id=s.prompt_id, text=s.prompt) for s in samples}
    return samples, prompts


def _margins(judge, samples, prompts):
    by = {}
    for s in samples:
        by.setdefault(s.prompt_id, []).append(s.response)
    return {pid: max(j.score for j in js) - min(j.score for j in js)
            for pid, js in zip(by, judge.student.score_batch([(prompts[pid], r) for pid, r in by.items()]))}


def test_cascade_routes_by_margin_and_records_the_deciding_judge(distilled, judge_env, tmp_path):
    run, _ = distilled
    samples, prompts = _fresh()
    with OpenAIServer() as server:
        probe = _cascade(run, server, 0.0)
        margins = _margins(probe, samples, prompts)
        ranked = sorted(margins.values())
        threshold = (ranked[5] + ranked[6]) / 2  # the 6 widest margins go to the student
        judge = _cascade(run, server, threshold)
        judged, info = judge_samples(judge, prompts, samples, tmp_path / "judgments.jsonl")
        asked = {r["body"]["messages"][0]["content"] for r in server.requests}

        confident = {pid for pid, m in margins.items() if m >= threshold}
        assert len(confident) == 6
        for j in judged:
            assert j.details["decided_by"] == ("student" if j.prompt_id in confident else "teacher")
            assert j.judge == ("reward_model" if j.prompt_id in confident else "openai")
            assert j.details["student_score"] is not None
        # The teacher saw the unsure prompts' candidates only, once each (pointwise).
        unsure_texts = {s.response for s in samples if s.prompt_id not in confident}
        assert len(server.requests) == len(unsure_texts) == 24
        assert all(any(t in a for a in asked) for t in unsure_texts)
        assert sum(j.requests for j in judged) == 24 and info["counts"]["scored"] == 48
        # Student scores are on the teacher's scale (the held-out map: 0..1 here).
        assert all(0.0 <= j.score <= 1.0 for j in judged if j.details["decided_by"] == "student")

        # The teacher's cache: judging again from nothing pays no request.
        again = _cascade(run, server, threshold)
        judged2, _ = judge_samples(again, prompts, samples, tmp_path / "judgments2.jsonl")
        assert len(server.requests) == 24 and sum(j.cached for j in judged2) == 24
        assert [j.score for j in judged2] == [j.score for j in judged]


def test_cascade_keeps_the_teachers_failures_and_budget(distilled, judge_env, tmp_path):
    run, _ = distilled
    samples, prompts = _fresh()
    with OpenAIServer() as server:
        # Every unsure prompt goes to the teacher (threshold above any margin); p100's replies are unparsable.
        server.fault = lambda prompt: ("ok", "I cannot say.") if "Question 100:" in prompt else None
        judge = _cascade(run, server, 1e9)
        judged, info = judge_samples(judge, prompts, samples, tmp_path / "judgments.jsonl")
        failed = [j for j in judged if j.outcome == "failed"]
        assert {j.prompt_id for j in failed} == {"p100"} and len(failed) == 4
        assert all(j.score is None and j.details["decided_by"] == "teacher" and j.details["student_score"] is not None
                   for j in failed)
        pairs, stats = select_pairs(samples, judged, 0.0, 0.1, "all")
        assert "p100" not in {p.prompt_id for p in pairs} and stats.failed_candidates == 4

        # A budget the teacher runs out of stops judging cleanly; what was judged is kept.
        server.fault = None
        poor = _cascade(run, server, 1e9, "judge.teacher.budget_usd=0.0001", "judge.chunk_candidates=8",
                        "judge.teacher.cache=false")
        before = len(server.requests)
        _, info = judge_samples(poor, prompts, samples, tmp_path / "budget.jsonl")
        assert info["budget_stop"] and "budget_usd" in info["budget_stop"]
        assert 0 < info["unjudged_prompts"] < len(prompts)
        assert len(server.requests) - before == 4 * (len(prompts) - info["unjudged_prompts"])


def test_cascade_without_a_distilled_model_asks_the_teacher(tmp_path, tiny_model_dir, judge_env):
    cfg = load_config(None, [f"policy.model={tiny_model_dir}", "run.name=fresh"])
    run = RunDir.create(tmp_path, cfg)
    jcfg = load_config(None, ["judge.kind=cascade", "judge.student.kind=reward_model",
                              "judge.student.model=distill:latest", "judge.teacher.kind=rules"]).judge
    resolved, info = resolve_cascade(run, jcfg)
    assert info["student"] is None and "no distilled model yet" in info["note"]
    samples = [Sample(prompt_id="a", candidate=k, prompt="Say hi in two words.", response=r, num_tokens=2,
                      policy="iter_000") for k, r in enumerate(["Hi there", "Hello to you all, friend"])]
    prompt = Prompt(id="a", text="Say hi in two words.", constraints=[{"kind": "max_words", "n": 2}])
    judged, _ = judge_samples(build_judge(resolved), {"a": prompt}, samples, tmp_path / "j.jsonl")
    assert [j.score for j in judged] == [1.0, 0.0] and all(j.details["decided_by"] == "teacher" for j in judged)
    with pytest.raises(Exception, match="v009"):
        resolve_cascade(run, jcfg.model_copy(update={"student": jcfg.student.model_copy(
            update={"model": "distill:v009"})}))


def test_preflight_names_a_missing_version_and_a_student_without_threshold(distilled, tiny_model_dir):
    from nash.distill import check_student
    from nash.errors import UserError

    run, version = distilled

    def section(model, *extra):
        return load_config(None, ["judge.kind=cascade", "judge.student.kind=reward_model",
                                  f"judge.student.model={model}", "judge.teacher.kind=rules", *extra]).judge

    check_student(run, section("distill:latest"))
    check_student(run, section(str(version / "model")))  # distilled by nash: its report gives the threshold
    with pytest.raises(UserError, match="v007"):
        check_student(run, section("distill:v007"))
    with pytest.raises(UserError, match="judge.threshold"):
        check_student(run, section(tiny_model_dir))
    check_student(run, section(tiny_model_dir, "judge.threshold=1.5"))

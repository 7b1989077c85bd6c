"""Promotion against the promoted policy: the paired test on constructed answer sets, through the
evaluate stage, its records, and what the next iteration trains from."""

import json
import random

import pytest

from nash import evaluation, gate, iteration
from nash.config import load_config
from nash.records import Sample, write_jsonl
from nash.registry import RunDir

N_EVAL = 60


@pytest.fixture(scope="module")
def gate_prompts(tmp_path_factory):
    train = [{"id": f"t{i}", "prompt": f"Describe thing {i} briefly.", "split": "train",
              "constraints": [{"kind": "max_words", "n": 6}, {"kind": "no_commas"}]} for i in range(12)]
    held = [{"id": f"e{i}", "prompt": f"Write about owls number {i}. Use the word remarkable.", "split": "eval",
             "topic": "owls", "constraints": [{"kind": "keyword", "word": "remarkable"}]} for i in range(N_EVAL)]
    path = tmp_path_factory.mktemp("gate") / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in train + held))
    return str(path)


GOOD = "Owls are remarkable birds that hunt quietly at night number {i}."
BAD = "ok"


def _answers(label, good_ids):
    return [Sample(prompt_id=f"e{i}", candidate=0, prompt="", policy=label, num_tokens=12 if i in good_ids else 1,
                   response=GOOD.format(i=i) if i in good_ids else BAD) for i in range(N_EVAL)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir, gate_prompts):
    """A run with iteration 1 trained and not yet evaluated."""
    overrides = [f"policy.model={tiny_model_dir}", f"prompts.source={gate_prompts}", "prompts.partition_size=6",
                 "sampling.n=4", "sampling.max_new_tokens=12", "eval.num_prompts=0", "eval.max_new_tokens=12",
                 "eval.drift_prompts=0", "train.batch_size=2", "train.max_length=96", "pairs.min_chosen_score=0.5",
                 "pairs.min_margin=0.5", "pairs.per_prompt=all", "judge.kind=rules", "train.epochs=1",
                 "run.name=gate"]
    run = RunDir.create(tmp_path_factory.mktemp("runs"), load_config(None, overrides))
    path = iteration.prepare(str(run.path))
    for stage in (iteration.sample, iteration.judge, iteration.select, iteration.train):
        stage(path)
    return run, run.iterations()[0]


def _evaluate_with(it, baseline_good, new_good, stage=None):
    """The evaluate stage on constructed held-out answers of π_0 and of the iteration."""
    import shutil

    shutil.rmtree(it.eval_dir, ignore_errors=True)
    shutil.rmtree(it.run.baseline_dir / "eval", ignore_errors=True)
    (it.run.baseline_dir / "eval").mkdir(parents=True)
    it.eval_dir.mkdir(parents=True)
    write_jsonl(it.run.baseline_dir / "eval" / "samples.jsonl", _answers("iter_000", baseline_good))
    write_jsonl(it.eval_dir / "samples.jsonl", _answers("iter_001", new_good))
    if stage:
        stage(str(it.path))
    else:
        evaluation.evaluate_iteration(it)
    return json.loads(it.metrics.read_text())


def test_a_clear_gain_is_promoted(trained):
    run, it = trained
    m = _evaluate_with(it, set(range(0, 60, 3)), set(range(N_EVAL)) - {1, 2})  # 20 good -> 58 good
    v = m["versus_promoted"]
    assert v["against"] == "iter_000"
    real = v["comparisons"]["substantive_pass_rate"]
    assert real["n"] == N_EVAL and real["mean"] == pytest.approx(38 / 60) and real["low"] > 0
    assert m["headline"]["promoted"] is True
    assert m["promotion"]["reason"].startswith("promoted: better than iter_000 (")
    assert "real pass rate +0.633" in m["promotion"]["reason"]


def test_a_clear_loss_is_refused(trained):
    run, it = trained
    m = _evaluate_with(it, set(range(N_EVAL)), set(range(0, 60, 2)))  # 60 good -> 30 good
    assert m["headline"]["promoted"] is False
    reason = m["promotion"]["reason"]
    assert reason.startswith("refused: worse than iter_000 (") and "real pass rate -0.500" in reason
    assert m["versus_promoted"]["comparisons"]["win_rate"]["high"] < 0


def test_a_tie_within_the_margin_is_refused(trained):
    run, it = trained
    # The same answers, but for one prompt each way: no figure moves beyond noise.
    base = set(range(0, 60, 2))
    m = _evaluate_with(it, base, (base - {0}) | {1})
    comps = m["versus_promoted"]["comparisons"]
    assert comps["substantive_pass_rate"]["mean"] == 0 and comps["substantive_pass_rate"]["low"] < 0
    assert m["headline"]["promoted"] is False
    assert m["promotion"]["reason"].startswith("refused: not better than iter_000 with 90% confidence")


def test_the_decision_is_recorded_and_a_refused_iteration_is_not_the_next_parent(trained, capsys, caplog):
    run, it = trained
    _evaluate_with(it, set(range(N_EVAL)), set(range(0, 60, 2)), stage=iteration.evaluate)  # a regression
    iteration.finalize(str(it.path))
    assert it.manifest()["status"] == "complete"
    assert not run.promoted_path.exists()
    head = json.loads(it.metrics.read_text())["headline"]
    assert head["promotion_reason"].startswith("refused: worse than iter_000")
    assert head["versus"]["against"] == "iter_000" and head["versus"]["promoted"] is False

    from nash.flows.cli import print_status

    print_status(run)
    out = capsys.readouterr().out
    assert "iter_001 refused: worse than iter_000" in out
    assert "promoted: none yet (π_0); the next iteration trains from π_0 (train.parent promoted)" in out

    # train.parent promoted (the default): the next iteration trains from π_0, not from the regression.
    caplog.set_level("INFO", logger="nash")
    nxt = iteration.prepare(str(run.path))
    assert "iter_002 trains from π_0, the promoted policy (train.parent promoted): iter_001 was not promoted" \
        in caplog.text
    parent = json.loads((run.path / "iter_002" / "manifest.json").read_text())["parent_policy"]
    assert parent["iteration"] == 0 and parent["rule"] == "promoted" and nxt.endswith("iter_002")
    assert run.parent_of_next("last").index == 1  # DNO's rule would have taken it


@pytest.mark.parametrize("seed", range(3))
def test_paired_interval_covers_the_truth_and_detects_what_it_reports(seed):
    rng = random.Random(seed)
    # Paired binary outcomes: 20% of prompts discordant, the new policy winning 3 in 4 of them.
    diffs = [(1.0 if rng.random() < 0.75 else -1.0) if rng.random() < 0.2 else 0.0 for _ in range(400)]
    c = gate.paired_interval(diffs, 0.9)
    assert c["low"] < 0.1 < c["high"]  # the true mean difference is 0.2 * (0.75 - 0.25)
    assert c["mde"] == pytest.approx(gate.detectable(400, c["sd"], 0.9))
    assert 0.04 < c["mde"] < 0.07


def test_a_gain_with_a_fall_inside_the_noise_is_promoted_and_one_beyond_the_margin_is_not():
    rng = random.Random(3)
    n = 384
    # Like the demo's third iteration: real pass rate up 10 points, the degenerate share 1 point worse.
    diffs = {"win_rate": [rng.choice([0.5, 0.5, 0.0, -0.5]) for _ in range(n)],
             "substantive_pass_rate": [1.0] * 48 + [-1.0] * 10 + [0.0] * (n - 58),
             "degenerate": [1.0] * 30 + [-1.0] * 34 + [0.0] * (n - 64)}
    comps = gate.head_to_head(diffs, list(diffs), 0.9)
    decision = gate.decide(comps, "iter_002", margin=0.05, confidence=0.9)
    assert comps["degenerate"]["mean"] < 0 < comps["degenerate"]["high"] and comps["degenerate"]["low"] > -0.05
    assert decision["promoted"] and decision["reason"].startswith("promoted: better than iter_002 (")
    # The same with a margin tighter than the intervals can resolve: refused, and the reason says why.
    tight = gate.decide(comps, "iter_002", margin=0.02, confidence=0.9)
    assert not tight["promoted"] and tight["reason"].startswith("refused: could be worse than iter_002 by more than 0.02")

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest
from prefect.testing.utilities import prefect_test_harness

from nash.config import load_config
from nash.records import Judgment, Sample, read_jsonl
from nash.registry import RunDir

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def prefect_server():
    with prefect_test_harness(server_startup_timeout=120):
        yield


async def _artifacts():
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        return await client.read_artifacts()


def test_round_flow_runs_iterations_as_subflows_with_artifacts(prefect_server, tmp_path, tiny_overrides, capsys):
    from nash.flows.cli import main
    from nash.flows.round import round_flow

    cfg = load_config(None, tiny_overrides + ["run.name=flowrun"])
    run = RunDir.create(tmp_path, cfg)
    manifests = round_flow(run_dir=str(run.path), iterations=2)
    assert [Path(m).parent.name for m in manifests] == ["iter_001", "iter_002"]
    assert all(it.complete for it in run.iterations())

    arts = asyncio.run(_artifacts())
    by_type = {}
    for a in arts:
        by_type.setdefault(a.type, []).append(a)
    tables = [a for a in by_type["table"] if a.key and a.key.startswith("nash-flowrun-iter")]
    assert {a.key for a in tables} == {"nash-flowrun-iter-001", "nash-flowrun-iter-002"}
    row = json.loads(tables[0].data)[0]
    assert {"pairs kept", "pass rate", "win rate", "LC win rate", "KL to π_0", "KL to π_t", "reward acc"} <= set(row)
    assert float(row["KL to π_t"]) >= 0 and row["loss"] != "-"
    summary = [a for a in by_type["markdown"] if a.key == "nash-flowrun-summary"]
    assert summary and "| 2 | complete |" in summary[0].data and "data:image/png;base64," in summary[0].data
    evals = [a for a in by_type["table"] if a.key == "nash-flowrun-eval"]
    assert any({r["iteration"] for r in json.loads(a.data)} == {1, 2} for a in evals)
    assert any(a.type == "progress" and a.data == 100.0 for a in arts)
    side = [a for a in by_type["markdown"] if a.key == "nash-flowrun-iter-002-samples"]
    assert side and all(f"| {name} |" in side[0].data for name in ("iter_000", "iter_001", "iter_002"))

    # The same answers in the terminal, and the degeneration report behind the gate.
    capsys.readouterr()
    assert main(["samples", "flowrun", "-n", "3", "--runs-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    it = run.iterations()[1]
    answers = read_jsonl(it.eval_dir / "samples.jsonl", Sample)
    assert "iter_002, 3 held-out prompts" in out
    assert out.count("iter_000") == 3 and out.count("iter_001") == 3 and out.count("iter_002") == 3 + 1
    assert " ".join(answers[0].response.split())[:60] in out
    assert main(["samples", "flowrun", "--iteration", "7", "--runs-dir", str(tmp_path)]) == 2
    metrics = json.loads(it.metrics.read_text())
    deg = metrics["degeneration"]
    assert set(deg) == {"policy", "initial"} and deg["policy"]["n"] == deg["initial"]["n"] == 5
    head = metrics["headline"]
    assert head["degenerate"] == deg["policy"]["degenerate"] and head["length_ratio"] > 0
    assert metrics["promotion"]["checks"][-1]["condition"] == "degenerate_rise <= 0.05"


@pytest.mark.slow  # 40-46 s; tests/test_distill.py keeps distillation and the cascade in the fast selection
def test_a_round_distills_between_iterations_for_the_cascade(prefect_server, tmp_path, tiny_overrides):
    """distill.every=1: iteration 1 has no student yet (the teacher judges), a reward model is distilled
    from it before iteration 2, whose cascade loads it, scores every candidate and records who decided."""
    from nash.flows.round import round_flow

    cfg = load_config(None, tiny_overrides + [
        "run.name=cascaded", "prompts.partition_size=10", "distill.every=1", "distill.holdout=0.4",
        "distill.precision=fp32", "distill.max_length=64", "judge.kind=cascade", "judge.student.kind=reward_model",
        "judge.student.model=distill:latest", "judge.student.precision=fp32", "judge.teacher.kind=rules",
        "judge.threshold=1e9",  # the student scores, the teacher decides: routing has tests of its own
        "eval.drift_prompts=0", "train.kl_prompts=0", "eval.retention=null"])
    run = RunDir.create(tmp_path, cfg)
    round_flow(run_dir=str(run.path), iterations=2)
    first, second = run.iterations()
    assert first.complete and second.complete
    assert first.manifest()["cascade"]["student"] is None
    report = json.loads((run.path / "distill" / "v001" / "report.json").read_text())
    assert report["iterations"] == [1]
    record = second.manifest()["cascade"]
    assert record["student"] == "distill/v001" and record["threshold"] == 1e9
    assert record["prompts_teacher"] == 10 and record["prompts_student"] == 0
    judged = read_jsonl(second.judgments, Judgment)
    assert all(j.details["decided_by"] == "teacher" and j.details["student_score"] is not None for j in judged)
    later = json.loads((run.path / "distill" / "v002" / "report.json").read_text())
    assert later["iterations"] == [1, 2]  # after iteration 2 too, for the next round
    arts = asyncio.run(_artifacts())
    assert any(a.key == "nash-cascaded-v001-distill" for a in arts)


@pytest.mark.slow
def test_cli_demo_iteration_on_the_embedded_default(tmp_path):
    """One real iteration of the embedded SmolLM2 through `nash run` and Prefect."""
    cmd = [sys.executable, "-m", "nash.flows.cli", "run", str(ROOT / "configs" / "default.yaml"),
           "--iterations", "1", "--runs-dir", str(tmp_path),
           "--set", "prompts.partition_size=16", "--set", "eval.num_prompts=16"]
    subprocess.run(cmd, check=True, cwd=ROOT, timeout=1800)
    status = subprocess.run([sys.executable, "-m", "nash.flows.cli", "status", "demo", "--runs-dir", str(tmp_path)],
                            check=True, cwd=ROOT, capture_output=True, text=True).stdout
    assert "complete" in status
    it = RunDir(tmp_path / "demo").iterations()[0]
    assert it.complete and (it.policy / "model.safetensors").is_file()


async def _flow_runs():
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        return await client.read_flow_runs()


def test_cli_iteration_with_the_openai_judge_never_leaks_the_key(
    prefect_server, tmp_path, tiny_overrides, monkeypatch, capsys, caplog
):
    from nash.flows.cli import main
    from tests.openai_server import OpenAIServer

    key = "sk-test-secret-4f1c9e"
    monkeypatch.setenv("OPENAI_API_KEY", key)
    monkeypatch.setenv("NASH_CACHE", str(tmp_path / "cache"))
    with OpenAIServer() as server:
        server.script = [("401",)]  # an error whose text echoes the key must be recorded scrubbed
        sets = [x for o in tiny_overrides + ["run.name=oa", "judge.kind=openai", f"judge.base_url={server.url}",
                                             "judge.max_retries=0", "pairs.min_chosen_score=1",
                                             "pairs.min_margin=1"] for x in ("--set", o)]
        assert main(["run", str(ROOT / "configs" / "default.yaml"), "--iterations", "1",
                     "--runs-dir", str(tmp_path / "runs"), *sets]) == 0
        assert server.requests and all(r["headers"]["authorization"] == f"Bearer {key}" for r in server.requests)
    run = RunDir(tmp_path / "runs" / "oa")
    it = run.iterations()[0]
    m = it.manifest()
    counts = m["judge_outcomes"]
    # Identical candidates are asked once: the rest are served from the cache.
    assert it.complete and counts["failed"] == 1 and counts["requests"] + counts["cached"] == 24
    assert m["judge_outcomes"]["cost_usd"] > 0
    spend = m["judge_spend"]
    assert spend["run"] == spend["iteration"] and spend["iteration"]["cost_usd"] > m["judge_outcomes"]["cost_usd"]
    # The key is in no file of the run, no log line, no artifact and no flow-run parameter.
    for path in run.path.rglob("*"):
        if path.is_file() and path.suffix in (".json", ".jsonl"):
            assert key not in path.read_text(), path
    out = capsys.readouterr()
    assert key not in out.out + out.err and key not in caplog.text
    assert key not in json.dumps([a.model_dump(mode="json") for a in asyncio.run(_artifacts())])
    assert key not in json.dumps([r.parameters for r in asyncio.run(_flow_runs())])
    failed = [j for j in read_jsonl(it.judgments, Judgment) if j.outcome == "failed"]
    assert "***" in failed[0].error


def test_api_key_from_a_prefect_secret_block(prefect_server, monkeypatch):
    from prefect.blocks.system import Secret

    from nash.openai_client import read_api_key

    Secret(value="sk-from-block-77").save("nash-judge-key", overwrite=True)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    cfg = load_config(None, ["judge.kind=openai", "judge.api_key_secret=nash-judge-key"])
    assert read_api_key(cfg.judge) == "sk-from-block-77"
    assert "sk-from-block" not in cfg.model_dump_json()  # the config names the block, never the key


def test_cli_reports_a_failed_iteration_in_one_line(prefect_server, tmp_path, tiny_overrides, capsys):
    from nash.flows.cli import main

    sets = [x for o in tiny_overrides + ["run.name=nopairs", "pairs.min_chosen_score=2"] for x in ("--set", o)]
    assert main(["run", str(ROOT / "configs" / "default.yaml"), "--iterations", "1",
                 "--runs-dir", str(tmp_path), *sets]) == 1
    err = capsys.readouterr().err
    assert "nash: error: iter_001 failed at train: RuntimeError: no pairs kept" in err and "to resume" in err


@pytest.mark.slow  # 75-150 s; tests/test_alpaca_eval.py keeps the annotation itself in the fast selection
def test_dno_recipe_evaluates_against_an_alpaca_eval_file(prefect_server, tmp_path, tiny_model_dir, monkeypatch,
                                                           capsys):
    """configs/dno_gpt4.yaml on the tiny model: the openai judge (loopback) annotates against a reference file."""
    from nash.flows.cli import main
    from nash.flows.round import summary_markdown
    from tests.openai_server import OpenAIServer, default_reply

    monkeypatch.setenv("OPENAI_API_KEY", "sk-dno-test")
    monkeypatch.setenv("NASH_CACHE", str(tmp_path / "cache"))
    gold = tmp_path / "gold.jsonl"
    gold.write_text("".join(json.dumps({"id": f"g{i}", "prompt": f"Tell me about thing {i}.",
                                        "reference": f"Thing {i} is a small, useful object."}) + "\n"
                            for i in range(20)))
    ref = tmp_path / "alpaca_eval_ref.jsonl"
    ref.write_text("".join(json.dumps({"instruction": f"Describe place {i}.", "output": f"Place {i} is quiet.",
                                       "generator": "gpt4_turbo"}) + "\n" for i in range(6)))

    def responder(prompt):  # batched: the longest candidate 6, the others 1; pairwise: the shorter output wins
        if "<id>_score" in prompt:
            blocks = prompt.split("[Candidates]")[1].split("[Candidate ")[1:]
            texts = {b[0]: b[3:].split("\n\nReply with")[0] for b in blocks}
            top = max(texts, key=lambda k: (len(texts[k]), k))
            return json.dumps({f"{k}_score": 6 if k == top else 1 for k in texts})
        return default_reply(prompt)

    with OpenAIServer(responder) as server:
        sets = [x for o in [f"policy.model={tiny_model_dir}", f"prompts.source={gold}", "prompts.partition_size=4",
                            "sampling.max_new_tokens=12", "train.batch_size=2", "train.max_length=96",
                            f"eval.reference={ref}", "eval.num_prompts=6", "eval.max_new_tokens=12",
                            f"judge.base_url={server.url}"] for x in ("--set", o)]
        assert main(["run", str(ROOT / "configs" / "dno_gpt4.yaml"), "--iterations", "2",
                     "--runs-dir", str(tmp_path / "runs"), *sets]) == 0
        eval_requests = [r for r in server.requests if "Better:" in r["body"]["messages"][-1]["content"]]
        capsys.readouterr()
        assert main(["eval", "dno-gpt4", "--iteration", "2", "--against", "iter_001",
                     "--runs-dir", str(tmp_path / "runs")]) == 0
        against = capsys.readouterr().out
    run = RunDir(tmp_path / "runs" / "dno-gpt4")
    it1, it2 = run.iterations()
    assert len(eval_requests) >= 6 * 2  # 6 reference instructions, both orders
    for it in (it1, it2):
        metrics = json.loads(it.metrics.read_text())
        head = metrics["headline"]
        assert head["against"] == "gpt4_turbo" and head["n"] + head["failed"] == 6
        usage = metrics["win_rate"]["usage"]  # identical answers in iteration 2 come from the judge cache
        assert head["win_rate"] is not None and usage["requests"] + usage["cached"] == 12
    assert it2.manifest()["pairs"]["replayed"]["iter_001"]["drawn"] > 0
    assert run.plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "data:image/png;base64," in summary_markdown(run)
    heads = [json.loads(it.metrics.read_text())["headline"] for it in (it1, it2)]
    assert all(h["promotion_reason"] and h["versus"]["against"] in ("iter_000", "iter_001") for h in heads)
    promoted = [h["iteration"] for h in heads if h["promoted"]]
    if promoted:
        assert json.loads(run.promoted_path.read_text())["iteration"] == promoted[-1]
    else:
        assert not run.promoted_path.exists()
    assert it2.manifest()["parent_policy"]["iteration"] == 1  # the recipe's train.parent: last
    capsys.readouterr()

    assert main(["eval", "dno-gpt4", "--runs-dir", str(tmp_path / "runs")]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert [r[0] for r in rows] == ["1", "2"] and all(r[1] == "gpt4_turbo" for r in rows)
    assert "LC win rate" in out and "KL to π_0" in out and f"plot: {run.plot_path}" in out

    rows = [line.split() for line in against.splitlines() if line.strip()[:1].isdigit()]
    assert [(r[0], r[1], r[2]) for r in rows] == [("2", "iter_001", "6")]
    assert json.loads((it2.eval_dir / "vs_iter_001" / "summary.json").read_text())["n"] == 6
    assert main(["eval", "dno-gpt4", "--against", "iter_009", "--runs-dir", str(tmp_path / "runs")]) == 2
    assert "--against iter_009" in capsys.readouterr().err

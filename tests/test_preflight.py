"""Everything that can fail before the first paid stage fails before it: one `nash: error:` line,
exit status 2, and no run directory, no samples."""

import json
import math
import socket
from pathlib import Path

import pytest

from nash.config import load_config
from nash.flows.cli import main
from nash.records import Judgment, RecordError, read_jsonl
from tests.openai_server import OpenAIServer

CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "default.yaml")


def _run(capsys, tmp_path, overrides):
    rc = main(["run", CONFIG, "--runs-dir", str(tmp_path / "runs"),
               *[a for o in overrides for a in ("--set", o)]])
    err = capsys.readouterr().err
    return rc, err


def _refused(capsys, tmp_path, overrides, *expected):
    rc, err = _run(capsys, tmp_path, overrides)
    lines = [line for line in err.splitlines() if line.startswith("nash: error:")]
    assert rc == 2 and len(lines) == 1, err
    for text in expected:
        assert text in lines[0], lines[0]
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("samples.jsonl"))
    assert not any((tmp_path / "runs").rglob("run.json")) if (tmp_path / "runs").exists() else True
    return lines[0]


def _prompts(tmp_path, rows, name="prompts.jsonl", encoding="utf-8"):
    path = tmp_path / name
    path.write_bytes("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode(encoding))
    return str(path)


def _rows(n=26, **extra):
    return [{"id": f"p{i}", "prompt": f"Describe thing {i} briefly.", "split": "eval" if i >= 20 else "train",
             "constraints": [{"kind": "no_commas"}], **extra} for i in range(n)]


def test_a_missing_judge_key_fails_before_anything_is_sampled(tmp_path, capsys, tiny_overrides, monkeypatch):
    monkeypatch.delenv("NASH_UNSET_KEY", raising=False)
    _refused(capsys, tmp_path, [*tiny_overrides, "judge.kind=openai", "judge.api_key_env=NASH_UNSET_KEY"],
             "judge.api_key_env: environment variable NASH_UNSET_KEY is not set")
    # The evaluation's annotator is checked too.
    _refused(capsys, tmp_path, [*tiny_overrides, "eval.judge.kind=openai", "eval.judge.api_key_env=NASH_UNSET_KEY"],
             "eval.judge.api_key_env: environment variable NASH_UNSET_KEY is not set")


def test_a_judge_server_that_does_not_answer_fails_before_sampling(tmp_path, capsys, tiny_overrides):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    _refused(capsys, tmp_path, [*tiny_overrides, "judge.kind=openai", f"judge.base_url=http://127.0.0.1:{port}/v1"],
             f"judge.base_url: no answer from http://127.0.0.1:{port}/v1")


def test_a_server_that_refuses_the_key_fails_before_sampling(tmp_path, capsys, tiny_overrides, monkeypatch):
    monkeypatch.setenv("NASH_TEST_KEY", "sk-wrong-7f3a")
    with OpenAIServer() as srv:
        srv.models_status = 401
        line = _refused(capsys, tmp_path, [*tiny_overrides, "judge.kind=openai", f"judge.base_url={srv.url}",
                                           "judge.api_key_env=NASH_TEST_KEY"], "judge.api_key_env:", "refused the key")
    assert "sk-wrong-7f3a" not in line


def test_a_rules_annotator_over_prompts_without_constraints_fails_before_sampling(tmp_path, capsys, tiny_overrides):
    rows = _rows()
    for r in rows[20:]:
        r.pop("constraints")
    src = _prompts(tmp_path, rows)
    line = _refused(capsys, tmp_path, [*tiny_overrides, f"prompts.source={src}", "eval.judge.kind=rules"],
                    "eval.judge.kind: a rules judge checks each prompt's constraints, but 5 evaluation prompt(s)")
    assert f"{src}:21 (id 'p20')" in line


def test_prompts_in_latin1_name_the_file_and_line(tmp_path, capsys, tiny_overrides):
    rows = _rows()
    rows[3]["prompt"] = "Décris le café."
    src = _prompts(tmp_path, rows, encoding="latin-1")
    _refused(capsys, tmp_path, [*tiny_overrides, f"prompts.source={src}"], f"{src}:4: not UTF-8", "prompts.source")


def test_duplicate_prompt_ids_name_both_lines(tmp_path, capsys, tiny_overrides):
    rows = _rows()
    rows[7]["id"] = "p2"
    src = _prompts(tmp_path, rows)
    _refused(capsys, tmp_path, [*tiny_overrides, f"prompts.source={src}"],
             f"{src}:8: prompt id 'p2' is already used at {src}:3")


def test_an_empty_prompt_names_its_line(tmp_path, capsys, tiny_overrides):
    rows = _rows()
    rows[5]["prompt"] = "   "
    src = _prompts(tmp_path, rows)
    _refused(capsys, tmp_path, [*tiny_overrides, f"prompts.source={src}"], f"{src}:6: 'prompt' is empty")


def test_prompts_too_long_for_training_or_the_context_name_their_lines(tmp_path, capsys, tiny_overrides):
    rows = _rows()
    rows[1]["prompt"] = "word " * 200
    src = _prompts(tmp_path, rows)
    line = _refused(capsys, tmp_path, [*tiny_overrides, f"prompts.source={src}", "prompts.partition_size=20", "run.iterations=1"],
                    "train.max_length: 1 training prompt(s)", f"{src}:2 (id 'p1')", "leave no room for an answer in 96")
    assert "tokens" in line
    # The tiny policy's context is 512 positions.
    _refused(capsys, tmp_path, [*tiny_overrides, "sampling.max_new_tokens=500"],
             "sampling.max_new_tokens:", "exceed the policy's context of 512")


def test_a_policy_directory_without_weights_or_tokenizer(tmp_path, capsys, tiny_overrides, tiny_model_dir):
    import shutil

    broken = tmp_path / "policy"
    shutil.copytree(tiny_model_dir, broken)
    for w in broken.glob("*.safetensors"):
        w.unlink()
    _refused(capsys, tmp_path, [*tiny_overrides, f"policy.model={broken}"],
             f"policy.model: {broken} has no weights (*.safetensors or pytorch_model*.bin)")
    shutil.rmtree(broken)
    shutil.copytree(tiny_model_dir, broken)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (broken / name).unlink()
    _refused(capsys, tmp_path, [*tiny_overrides, f"policy.model={broken}"], "has no a tokenizer")


def test_a_missing_vllm_interpreter_fails_before_sampling(tmp_path, capsys, tiny_overrides):
    _refused(capsys, tmp_path, [*tiny_overrides, "sampling.backend=vllm", "sampling.vllm.python=/no/such/python"],
             "sampling.vllm.python: /no/such/python does not exist")


def test_a_non_finite_score_is_never_recorded(tmp_path):
    with pytest.raises(ValueError, match="not a finite number"):
        Judgment(prompt_id="p", candidate=0, judge="j", outcome="scored", score=math.nan)
    path = tmp_path / "judgments.jsonl"
    good = Judgment(prompt_id="p", candidate=0, judge="j", outcome="scored", score=1.0).model_dump_json()
    path.write_text(good + "\n" + good.replace('"score":1.0', '"score":NaN') + "\n")
    with pytest.raises(RecordError, match=r"judgments.jsonl:2: score: .*not a finite number"):
        read_jsonl(path, Judgment)


def test_a_batched_reply_with_a_nan_score_is_a_failed_judgment(tmp_path, monkeypatch):
    from nash.judges import build_judge
    from nash.records import Prompt

    monkeypatch.setenv("NASH_CACHE", str(tmp_path))
    reply = '{"A_justification": "x", "A_score": NaN, "B_justification": "y", "B_score": 4}'
    with OpenAIServer() as srv:
        srv.script = [("ok", reply)] * 3
        cfg = load_config(None, ["judge.kind=openai", f"judge.base_url={srv.url}", "judge.protocol=batched"])
        out = build_judge(cfg.judge).score(Prompt(id="p", text="t"), ["a", "b"])
    assert [j.outcome for j in out] == ["failed", "scored"] and out[1].score == 4
    assert out[0].score is None and "missing or invalid scores for A" in out[0].error


def test_an_internal_error_keeps_its_traceback(tmp_path, monkeypatch, tiny_overrides):
    """Not a user error: it propagates (Python prints the traceback, exit status 1), not one line and 2."""
    import nash.preflight

    def broken(cfg, run):
        raise FileNotFoundError("/internal/file")

    monkeypatch.setattr(nash.preflight, "preflight", broken)
    with pytest.raises(FileNotFoundError, match="/internal/file"):
        main(["run", CONFIG, "--runs-dir", str(tmp_path), *[a for o in tiny_overrides
                                                                              for a in ("--set", o)]])


def test_a_config_file_in_latin1_names_its_line(tmp_path):
    from nash.config import ConfigError

    path = tmp_path / "mine.yaml"
    path.write_bytes("run:\n  name: caf\u00e9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"mine.yaml:2: not UTF-8"):
        load_config(path)

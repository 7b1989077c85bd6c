"""Failures and recovery: kill -9 inside each stage, then the same command; the run lock; rollback; retention."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nash.config import ConfigError, load_config
from nash.records import Judgment, Pair, Sample, read_jsonl, repair_jsonl
from nash.registry import IterationDir, RunDir, sha256_file
from nash.runlock import RunLocked, holder, run_lock
from tests.crash import ROOT, kill_when, lines, make_run, slow_reply, start, verdicts
from tests.openai_server import OpenAIServer


def test_kill_9_in_judging_training_and_annotation_then_resume(tmp_path, tiny_overrides):
    with OpenAIServer(responder=slow_reply) as server:
        ref = make_run(tmp_path / "runs", "straight", tiny_overrides, server.url)
        p = start(ref, tmp_path / "cache-straight")
        assert p.wait(timeout=600) == 0, p.stderr.read()[-3000:]
        paid_straight = len(server.requests)
        server.requests.clear()

        run = make_run(tmp_path / "runs", "killed", tiny_overrides, server.url)
        it = IterationDir(run, 1)
        cache = tmp_path / "cache-killed"
        # 0. Mid-sampling, after the first of three batches.
        p = start(run, cache)
        kill_when(p, lambda: lines(it.path / "sampling" / "batches.jsonl") >= 1, "sampling")
        assert not it.samples.exists()
        # 1. Mid-judging, with requests in flight.
        p = start(run, cache)
        kill_when(p, lambda: lines(it.judgments) >= 2, "judging")
        assert it.manifest()["stages"]["sample"]["reused_batches"] >= 1
        assert it.manifest()["stages"].get("judge", {}).get("status") != "complete"
        # A kill can cut the last line short: the resume repairs it.
        with open(it.judgments, "a") as f:
            f.write('{"prompt_id": "cut sh')
        # 2. Mid-training: after the trainer logged its first step.
        p = start(run, cache)
        kill_when(p, lambda: "'loss'" in ((it.path / "train.log").read_text() if (it.path / "train.log").is_file()
                                            else ""), "training")
        m = it.manifest()
        assert m["stages"]["judge"]["status"] == "complete" and "train" not in m["stages"]
        assert not it.policy.exists() or (it.policy / "config.json").is_file()  # complete or absent
        # 3. Mid-annotation of the evaluation.
        annotations = it.eval_dir / "vs_reference" / "judgments.jsonl"
        p = start(run, cache)
        kill_when(p, lambda: lines(annotations) >= 2, "annotation")
        assert "evaluate" not in it.manifest()["stages"]
        # 4. The same command again finishes the iteration.
        p = start(run, cache)
        assert p.wait(timeout=600) == 0, p.stderr.read()[-3000:]
        paid_killed = len(server.requests)

    straight = IterationDir(ref, 1)
    assert it.complete and "error" in it.manifest() and it.manifest()["error"] is None
    # No record twice, and the same verdicts, pairs, policy and held-out answers as the run never killed.
    for path in (it.judgments, annotations):
        recs = read_jsonl(path, Judgment)
        assert len({(j.prompt_id, j.candidate, j.other) for j in recs}) == len(recs), path
    assert verdicts(it.judgments) == verdicts(straight.judgments)
    assert verdicts(annotations) == verdicts(straight.eval_dir / "vs_reference" / "judgments.jsonl")
    for rel in ("samples.jsonl", "pairs.jsonl", "eval/samples.jsonl", "policy/model.safetensors"):
        assert sha256_file(it.path / rel) == sha256_file(straight.path / rel), rel
    assert len(read_jsonl(it.pairs, Pair)) > 0
    head, head0 = (json.loads(x.metrics.read_text())["headline"] for x in (it, straight))
    assert head["win_rate"] == head0["win_rate"] and head["n"] == head0["n"]
    # Paid again: at most the requests in flight at each of the two kills among requests (concurrency 4).
    assert paid_straight <= paid_killed <= paid_straight + 2 * 4, (paid_straight, paid_killed)


def test_repair_drops_only_a_last_line_cut_short(tmp_path, caplog):
    path = tmp_path / "samples.jsonl"
    good = Sample(prompt_id="p", candidate=0, prompt="q", response="r", num_tokens=1, policy="iter_000")
    path.write_text(good.model_dump_json() + "\n" + '{"prompt_id": "p", "cand')
    assert repair_jsonl(path, Sample) > 0
    assert read_jsonl(path, Sample) == [good] and "line 2 was cut short" in caplog.text
    path.write_text(good.model_dump_json() + "\n" + '{"prompt_id": "p"}\n')  # newline, but not a record
    repair_jsonl(path, Sample)
    assert read_jsonl(path, Sample) == [good]
    long = good.model_copy(update={"response": "x" * 200_000})  # longer than the tail that is read
    path.write_text(good.model_dump_json() + "\n" * 1 + (good.model_dump_json() + "\n") * 3000
                    + long.model_dump_json()[:-5])
    assert repair_jsonl(path, Sample) > 0 and len(read_jsonl(path, Sample)) == 3001
    path.write_text('{"bad": 1}\n' + good.model_dump_json() + "\n")  # not at the end: an error, kept
    assert repair_jsonl(path, Sample) == 0
    with pytest.raises(ValueError, match="samples.jsonl:1"):
        read_jsonl(path, Sample)


def test_second_writer_is_refused_and_a_dead_holders_lock_is_taken_over(tmp_path, caplog):
    run = RunDir.create(tmp_path, load_config(None, ["run.name=r"])).path
    holder_script = ("import sys, time; from nash.runlock import run_lock\n"
                     "with run_lock(sys.argv[1], 'nash run'):\n    print('held', flush=True); time.sleep(60)")
    p = subprocess.Popen([sys.executable, "-c", holder_script, str(run)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "held"
        with pytest.raises(RunLocked, match=rf"locked by pid {p.pid} on .* since "):
            with run_lock(run, "nash run"):
                pass
        # Through the CLI, a second `nash run` and a rollback: one line naming the holder, exit status 2,
        # before anything is loaded: on an empty cache the embedded model is not even converted.
        env = {**os.environ, "NASH_CACHE": str(tmp_path / "empty-cache")}
        outs = [subprocess.run([sys.executable, "-m", "nash.flows.cli", *cmd], cwd=ROOT, capture_output=True, text=True,
                               env=env)
                for cmd in (["run", "configs/default.yaml", "--runs-dir", str(tmp_path), "--set", "run.name=r"],
                            ["rollback", str(run), "--to", "0"])]
    finally:
        p.kill()
        p.wait()
    assert not (tmp_path / "empty-cache").exists()
    for out in outs:
        assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
        assert f"nash: error: run r is locked by pid {p.pid}" in out.stderr
    assert holder(run)["pid"] == p.pid  # the dead holder's note is still there...
    with run_lock(run, "nash run"):     # ...and the lock is taken over, saying so
        assert holder(run)["pid"] == os.getpid()
        with run_lock(run, "round"):     # re-entrant in one process: `nash run` and its round flow
            pass
        assert holder(run)["pid"] == os.getpid()
    assert f"took over the lock of pid {p.pid}" in caplog.text
    assert holder(run) is None


def test_keep_policies_validation():
    with pytest.raises(ConfigError, match="keep_policies"):
        load_config(None, ["run.keep_policies=0"])
    assert load_config(None, ["run.keep_policies=2"]).run.keep_policies == 2


@pytest.mark.slow  # half a minute; keeps the fast selection under 12 minutes on 2 cores
def test_rollback_then_retention(tmp_path, tiny_overrides, capsys):
    from nash import iteration
    from nash.flows.cli import main
    from nash.policy import resolve_policy

    cfg = load_config(None, [*tiny_overrides, "run.name=rb", "run.keep_policies=2", "pairs.replay=[0.5]",
                             "eval.promote_if=[]", "eval.drift_prompts=0", "train.kl_prompts=0"])
    run = RunDir.create(tmp_path, cfg)
    for _ in range(2):
        iteration.run_iteration(str(run.path))
    it1, it2 = run.iterations()
    assert json.loads(run.promoted_path.read_text())["iteration"] == 2

    assert main(["rollback", str(run.path), "--to", "1"]) == 0
    assert it2.status == "rolled_back" and it2.weights_on_disk  # set aside, not deleted
    assert it2.manifest()["rolled_back"]["from_status"] == "complete"
    assert json.loads(run.promoted_path.read_text())["iteration"] == 1
    out = capsys.readouterr().out
    assert "rolled_back" in out

    iteration.run_iteration(str(run.path))
    it3 = IterationDir(run, 3)
    m3 = it3.manifest()
    assert it3.complete and m3["parent_policy"] == {"iteration": 1, "path": str(it1.policy), "rule": "promoted"}
    assert (it3.path / "prompts.jsonl").read_text() != (it2.path / "prompts.jsonl").read_text()  # fresh prompts
    replayed = {p.iteration for p in read_jsonl(it3.pairs, Pair)} - {3}
    assert replayed <= {1} and m3["pairs"]["replayed"].keys() == {"iter_001"}, m3["pairs"]["replayed"]
    assert 2 not in [h["iteration"] for h in json.loads(it3.metrics.read_text())["table"]]
    # keep_policies=2 keeps iterations 1 and 3 (the lineage's last two); the rolled-back one's weights go.
    assert not it2.weights_on_disk and it2.manifest()["policy_deleted_at"]
    assert it2.samples.is_file() and it2.judgments.is_file() and it2.manifest()["files"]
    assert it1.weights_on_disk and it3.weights_on_disk and not (it2.path / "policy.deleting").exists()

    promoted = json.loads(run.promoted_path.read_text())["iteration"]
    run.prune_policies(1)  # a later `nash run` with run.keep_policies=1
    assert it3.weights_on_disk and it1.weights_on_disk == (promoted == 1)
    if promoted != 1:
        with pytest.raises(ConfigError, match="weights of iteration 1 were deleted by run.keep_policies"):
            run.rollback(1)
    with pytest.raises(ConfigError, match="not a complete iteration"):
        run.rollback(2)
    assert main(["status", str(run.path)]) == 0
    out = capsys.readouterr().out
    assert "rolled_back" in out and "deleted" in out
    assert resolve_policy(cfg.policy.model)  # π_0 stays the root of every lineage


def test_rejudge_asks_only_the_failed_judgments_again(tmp_path, tiny_overrides, monkeypatch, capsys):
    from nash import iteration
    from nash.flows.cli import main

    monkeypatch.setenv("NASH_CACHE", str(tmp_path / "cache"))
    with OpenAIServer() as server:
        cfg = load_config(None, [*tiny_overrides, "run.name=rj", "judge.kind=openai", f"judge.base_url={server.url}",
                                 "judge.max_retries=0", "judge.concurrency=1"])
        run = RunDir.create(tmp_path, cfg)
        path = iteration.prepare(str(run.path))
        iteration.sample(path)
        server.script = [("401",), ("401",)]  # not retried: two failed judgments
        iteration.judge(path)
        it = IterationDir.from_path(path)
        before = read_jsonl(it.judgments, Judgment)
        failed = [j for j in before if j.outcome == "failed"]
        assert len(failed) == 2 and it.manifest()["stages"]["judge"]["failed"] == 2
        iteration.select(path)
        asked = len(server.requests)

        assert main(["rejudge", str(run.path)]) == 0
        after = read_jsonl(it.judgments, Judgment)
        assert not [j for j in after if j.outcome == "failed"] and len(after) == len(before)
        # Only the failed candidates went to the server again; their prompts' other replies came from the cache.
        assert len(server.requests) - asked == 2
        assert {(j.prompt_id, j.candidate): j.score for j in before if j.outcome == "scored"}.items() <= \
            {(j.prompt_id, j.candidate): j.score for j in after}.items()
        stages = it.manifest()["stages"]
        assert stages["judge"]["failed"] == 0 and "select_pairs" not in stages  # redone by the next run
        assert "asked again for 2 failed judgment(s); now 0 failed" in capsys.readouterr().err

    for stage in (iteration.select, iteration.train, iteration.evaluate):
        stage(path)
    iteration.finalize(path)
    assert main(["rejudge", str(run.path)]) == 2  # complete: roll back instead
    assert "roll back to 0" in capsys.readouterr().err


def test_killed_nash_run_takes_prefects_temporary_server_with_it(tmp_path, tiny_overrides):
    log = tmp_path / "run.log"
    sets = [x for o in [*tiny_overrides, "run.name=eph"] for x in ("--set", o)]
    with open(log, "w") as out:
        p = subprocess.Popen([sys.executable, "-m", "nash.flows.cli", "run", "configs/default.yaml", "--iterations", "1",
                              "--runs-dir", str(tmp_path), *sets], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                             start_new_session=True)
    try:
        deadline, port = time.time() + 240, None
        while port is None:
            assert p.poll() is None and time.time() < deadline, log.read_text()[-2000:]
            found = re.search(r"Starting temporary server on http://127\.0\.0\.1:(\d+)", log.read_text())
            port = found and found.group(1)
            time.sleep(0.2)

        def servers():
            return [d.name for d in Path("/proc").iterdir() if d.name.isdigit() and _cmdline(d).startswith(
                sys.executable) and "uvicorn" in _cmdline(d) and f"--port {port}" in _cmdline(d)]

        while not servers():
            assert time.time() < deadline
            time.sleep(0.2)
    finally:
        p.kill()  # nash alone, not its group: what it started must die with it
        p.wait()
    deadline = time.time() + 10  # the kernel delivers the parent-death signal at once; allow a slow machine
    while servers() and time.time() < deadline:
        time.sleep(0.1)
    assert not servers(), "Prefect's temporary server outlived the killed `nash run`"


def _cmdline(proc: Path) -> str:
    try:
        return (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return ""

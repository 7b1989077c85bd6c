"""Failures and recovery: kill -9 inside each stage, then the same command; the run lock; rollback; retention.

The crash harness runs iterations in a child process of its own process group (the stages
without Prefect: what a stage writes does not depend on who calls it), kills the group with
SIGKILL at a chosen moment, checks that nothing of it is left running, and runs it again.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nash.config import ConfigError, load_config
from nash.records import Judgment, Pair, Sample, read_jsonl, repair_jsonl
from nash.registry import IterationDir, RunDir, sha256_file
from nash.runlock import RunLocked, holder, run_lock
from tests.openai_server import OpenAIServer, default_reply

ROOT = Path(__file__).resolve().parent.parent
DRIVER = "import sys; from nash.iteration import run_iteration; run_iteration(sys.argv[1])"


def slow_reply(prompt: str) -> str:
    time.sleep(0.25)  # keeps requests in flight long enough to kill among them
    return default_reply(prompt)


def make_run(tmp_path, name, overrides, server_url):
    cfg = load_config(ROOT / "configs" / "default.yaml", [
        *overrides, f"run.name={name}", "judge.kind=openai", f"judge.base_url={server_url}", "judge.concurrency=4",
        "judge.max_retries=0", "sampling.batch_size=8", "eval.drift_prompts=0", "train.kl_prompts=0"])
    return RunDir.create(tmp_path / "runs", cfg)


def start(run: RunDir, cache: Path) -> subprocess.Popen:
    env = {**os.environ, "NASH_CACHE": str(cache), "TQDM_DISABLE": "1"}
    return subprocess.Popen([sys.executable, "-c", DRIVER, str(run.path)], cwd=ROOT, env=env,
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def kill_when(proc: subprocess.Popen, ready, what: str, timeout: float = 300) -> None:
    """SIGKILL the process group once `ready()`; then nothing of it may be left, the worker included."""
    deadline = time.time() + timeout
    while not ready():
        assert proc.poll() is None, f"finished before {what}: {proc.stderr.read()[-2000:]}"
        assert time.time() < deadline, f"never reached {what}"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    # The train worker is in a session of its own: the kernel kills it with its parent. Checked at once:
    # an orphan would otherwise die too, but only at its next write to the closed pipe.
    deadline = time.time() + 0.5
    while time.time() < deadline and _workers(proc):
        time.sleep(0.1)
    assert not _workers(proc), f"processes outlived the killed stage ({what})"


def _workers(proc) -> list[int]:
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                cmd = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                stat = (p / "stat").read_text().split()
            except (FileNotFoundError, ProcessLookupError, PermissionError):
                continue
            if "nash.train_worker" in cmd and str(proc.args[-1]) in cmd and stat[2] != "Z":
                out.append(int(p.name))
    return out


def lines(path: Path) -> int:
    return path.read_text().count("\n") if path.is_file() else 0


def verdicts(path: Path) -> list[tuple]:
    return sorted((j.prompt_id, j.candidate, j.other, j.outcome, j.score, j.winner, j.raw)
                  for j in read_jsonl(path, Judgment))


def test_kill_9_in_judging_training_and_annotation_then_resume(tmp_path, tiny_overrides):
    with OpenAIServer(responder=slow_reply) as server:
        ref = make_run(tmp_path, "straight", tiny_overrides, server.url)
        p = start(ref, tmp_path / "cache-straight")
        assert p.wait(timeout=600) == 0, p.stderr.read()[-3000:]
        paid_straight = len(server.requests)
        server.requests.clear()

        run = make_run(tmp_path, "killed", tiny_overrides, server.url)
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
        # Through the CLI: one line naming the holder, exit status non-zero.
        out = subprocess.run([sys.executable, "-m", "flows.cli", "rollback", str(run), "--to", "0"], cwd=ROOT,
                             capture_output=True, text=True)
    finally:
        p.kill()
        p.wait()
    assert out.returncode != 0 and out.stderr.count("\n") == 1 and "nash: error:" in out.stderr
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

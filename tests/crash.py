"""The crash harness: iterations in a child process group, SIGKILL at a chosen moment, then again.

The child runs the stages without Prefect (what a stage writes does not depend on who calls
it). After the kill nothing of it may be left running, the training worker included: that
one lives in a session of its own and must die with its parent, not at its next write.
Used by tests/test_recovery.py and benchmarks/crash_resume.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from nash.config import load_config
from nash.records import Judgment, read_jsonl
from nash.registry import RunDir
from tests.openai_server import default_reply

ROOT = Path(__file__).resolve().parent.parent
DRIVER = "import sys; from nash.iteration import run_iteration; run_iteration(sys.argv[1])"


def slow_reply(prompt: str) -> str:
    time.sleep(0.25)  # keeps requests in flight long enough to kill among them
    return default_reply(prompt)


def make_run(runs_dir, name, overrides, server_url):
    cfg = load_config(ROOT / "configs" / "default.yaml", [
        *overrides, f"run.name={name}", "judge.kind=openai", f"judge.base_url={server_url}", "judge.concurrency=4",
        "judge.max_retries=0", "sampling.batch_size=8", "eval.drift_prompts=0", "train.kl_prompts=0"])
    return RunDir.create(runs_dir, cfg)


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



"""The one child-process supervisor: progress lines, the log and its tail, and a kill that takes
everything the child started."""

import os
import sys
import time

from nash.supervisor import PROGRESS_TAG, Child

SCRIPT = f"""
import subprocess, sys, time
grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
print("grandchild", grandchild.pid, flush=True)
for i in range(1, 4):
    print("{PROGRESS_TAG}", i, 3, flush=True)
    print("line", i, flush=True)
time.sleep(120)
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is dead
        return f.read().split(")")[-1].split()[0] != "Z"


def test_progress_goes_to_the_callback_and_the_rest_to_the_log(tmp_path):
    seen = []
    script = f"for i in range(1, 4):\n    print('{PROGRESS_TAG}', i, 3, flush=True)\n    print('line', i, flush=True)"
    with Child([sys.executable, "-c", script], tmp_path / "child.log",
               on_progress=lambda d, t: seen.append((d, t))) as child:
        assert child.follow() == 0
    assert seen == [(1, 3), (2, 3), (3, 3)]
    log = (tmp_path / "child.log").read_text()
    assert log.startswith("$ ") and log.endswith("line 1\nline 2\nline 3\n")  # the command, then the output
    assert list(child.tail)[-1] == "line 3"


def test_kill_takes_the_childs_own_children(tmp_path):
    child = Child([sys.executable, "-c", SCRIPT], tmp_path / "child.log").pump_in_background()
    deadline = time.monotonic() + 30
    while not any(t.startswith("line 3") for t in child.tail) and time.monotonic() < deadline:
        time.sleep(0.05)
    grandchild = int(next(t for t in child.tail if t.startswith("grandchild")).split()[1])
    assert child.poll() is None and _alive(grandchild)
    child.kill()
    deadline = time.monotonic() + 10
    while _alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert child.returncode is not None and not _alive(grandchild)


def test_the_vllm_worker_writes_the_supervisors_progress_tag():
    import ast
    from pathlib import Path

    worker = Path(__file__).resolve().parents[1] / "nash" / "vllm_worker.py"
    tags = [n.value.value for n in ast.parse(worker.read_text()).body
            if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", None) == "PROGRESS_TAG"]
    assert tags == [PROGRESS_TAG]

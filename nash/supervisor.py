"""The one supervisor of nash's child processes: vLLM engines, vLLM servers, training workers.

A child runs in a process group of its own, so it and everything it starts (an engine core,
accelerate's workers) are killed together on any way out of the stage: failure, Ctrl-C, exit.
The children also ask the kernel to kill them when this process dies (nash.lifeline, or the
vLLM worker's own prctl), so a SIGKILL of the stage leaves nothing behind. Their output goes to a
log file; `PROGRESS_TAG DONE TOTAL` lines are progress, not log.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
from collections import deque
from collections.abc import Callable
from pathlib import Path

Progress = Callable[[int, int], None]  # (done, total)
PROGRESS_TAG = "nash-progress"  # nash/vllm_worker.py writes the same tag (it cannot import nash)


class Child:
    """A command in its own process group, its output copied to `log_path`, its last lines kept."""

    def __init__(self, cmd: list[str], log_path: Path, env: dict | None = None,
                 on_progress: Progress | None = None, tail: int = 30):
        self.cmd, self.log_path, self.on_progress = cmd, Path(log_path), on_progress
        self.tail: deque[str] = deque(maxlen=tail)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "a", encoding="utf-8")
        self._log.write("$ " + " ".join(cmd) + "\n")
        self._log.flush()
        self._pump: threading.Thread | None = None
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                     start_new_session=True)

    def _copy(self) -> None:
        for line in self.proc.stdout:
            if line.startswith(PROGRESS_TAG):
                if self.on_progress:
                    done, total = map(int, line.split()[1:3])
                    self.on_progress(done, total)
                continue
            self._log.write(line)
            self._log.flush()  # readable while the child runs
            self.tail.append(line.rstrip())

    def pump_in_background(self) -> Child:
        self._pump = threading.Thread(target=self._copy, daemon=True)
        self._pump.start()
        return self

    def follow(self) -> int:
        """Copy the output in this thread until the child closes it; its exit status."""
        self._copy()
        return self.proc.wait()

    def poll(self) -> int | None:
        return self.proc.poll()

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode

    def join_output(self, timeout: float = 5.0) -> None:
        if self._pump is not None:
            self._pump.join(timeout=timeout)

    def kill(self) -> None:
        """Kill the whole group, even when the child itself is gone: what it started may still live."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self.join_output()
        if not self._log.closed:
            self._log.close()

    def __enter__(self) -> Child:
        return self

    def __exit__(self, *exc) -> None:
        self.kill()

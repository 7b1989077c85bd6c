"""A child process that dies with its parent, so a killed stage leaves nothing running.

Without this, SIGKILL to nash (OOM killer, `kill -9`, a scheduler's timeout) leaves the
trainer training on, holding its memory, and a resumed stage would start a second one.
nash/vllm_worker.py carries its own copy: it runs under another interpreter without nash.
"""

from __future__ import annotations

import os
import signal
import sys


def die_with_parent() -> None:
    """Ask the kernel for SIGKILL when the parent dies (Linux; elsewhere a no-op)."""
    if sys.platform.startswith("linux"):
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() == 1:  # the parent died before prctl took effect
            os._exit(1)


if __name__ == "__main__":
    # `python -m nash.lifeline CMD ...`: CMD, dying with the process that started it (survives exec).
    die_with_parent()
    os.execvp(sys.argv[1], sys.argv[1:])

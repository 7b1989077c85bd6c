"""One writer per run: an exclusive lock on `RUN/lock` while iterations, evaluations or a rollback write.

The kernel holds the lock (flock), so it goes away with its holder however that holder dies;
the file also names the holder (host, pid, command, since when) for the message a refused
writer prints. Finding the file filled in but unlocked means the last holder died: the lock
is taken over with a line saying so. The file is emptied, never deleted, on release:
deleting it would let a writer that opened the old file and one that creates a new one both
hold "the" lock.

Within one process the lock is re-entrant, so `nash run` can take it before its flow starts
(and refuse at once) while the round flow, which scheduled rounds run on their own, takes it
again.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from nash.errors import UserError

log = logging.getLogger("nash")

_held: dict[str, list] = {}  # resolved lock path -> [open file, depth]
_guard = threading.Lock()


class RunLocked(UserError, RuntimeError):
    """Another process is writing this run."""


def lock_path(run_path: str | Path) -> Path:
    return Path(run_path) / "lock"


def holder(run_path: str | Path) -> dict | None:
    """Who holds (or last held) the run's lock, as the file says; None if nobody wrote it."""
    try:
        text = lock_path(run_path).read_text(encoding="utf-8").strip()
        return json.loads(text) if text else None
    except (FileNotFoundError, ValueError):
        return None


def describe(h: dict | None) -> str:
    if not h:
        return "an unknown process"
    return f"pid {h.get('pid')} on {h.get('host')} since {h.get('since')} ({h.get('command', '?')})"


@contextmanager
def run_lock(run_path: str | Path, purpose: str):
    """Hold the run's lock for `purpose`; raise RunLocked naming the holder if another process has it."""
    path = lock_path(run_path)
    key = str(path.resolve())
    with _guard:
        if key in _held:
            _held[key][1] += 1
        else:
            created = not path.parent.exists()
            path.parent.mkdir(parents=True, exist_ok=True)
            f = open(path, "a+", encoding="utf-8")  # noqa: SIM115  (held for the lock's lifetime)
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.close()
                raise RunLocked(f"run {Path(run_path).name} is locked by {describe(holder(run_path))}: "
                                f"one writer per run ({path})") from None
            previous = holder(run_path)
            if previous:
                log.warning("nash: took over the lock of %s, which is no longer running", describe(previous))
            f.seek(0)
            f.truncate()
            f.write(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "purpose": purpose,
                                "command": " ".join(sys.argv[:4]), "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}))
            f.flush()
            os.fsync(f.fileno())
            _held[key] = [f, 1, created]
    try:
        yield
    finally:
        with _guard:
            _held[key][1] -= 1
            if _held[key][1] == 0:
                f, _, created = _held.pop(key)
                f.seek(0)
                f.truncate()
                f.flush()
                # A run refused before anything was written leaves no directory behind.
                if created and [p.name for p in path.parent.iterdir()] == [path.name]:
                    path.unlink()
                    path.parent.rmdir()
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)
                f.close()

"""What a benchmark ran on, and how much of the machine it really had.

On a shared virtual machine the hypervisor can take CPU time away ("steal"): wall-clock
figures then measure the neighbours as much as nash. Every benchmark records the steal
share of its interval and the CPU seconds its processes used, so two runs can be told
comparable or not.
"""

from __future__ import annotations

import os
import platform
import resource
import time
from pathlib import Path


def describe() -> str:
    model, flags = platform.processor() or platform.machine(), set()
    info = Path("/proc/cpuinfo")
    if info.is_file():
        for line in info.read_text().splitlines():
            if line.startswith("model name") and ":" in line:
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and ":" in line:
                flags = set(line.split(":", 1)[1].split())
    extra = [f for f in ("avx512_bf16", "amx_bf16") if f in flags]
    return f"{model}, {os.cpu_count()} cores" + (f" ({', '.join(extra)})" if extra else "") + \
        f", Python {platform.python_version()}"


def _cpu_ticks() -> tuple[int, int] | None:
    """(all ticks, steal ticks) from /proc/stat, or None off Linux."""
    stat = Path("/proc/stat")
    if not stat.is_file():
        return None
    fields = [int(x) for x in stat.read_text().splitlines()[0].split()[1:]]
    return sum(fields[:8]), fields[7]


class Interval:
    """Wall seconds, CPU seconds of finished child processes, and the hypervisor's steal share."""

    def __enter__(self):
        self.t0, self.ticks0 = time.time(), _cpu_ticks()
        self.ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        return self

    def __exit__(self, *exc):
        self.wall = time.time() - self.t0
        ru = resource.getrusage(resource.RUSAGE_CHILDREN)
        self.cpu = (ru.ru_utime - self.ru0.ru_utime) + (ru.ru_stime - self.ru0.ru_stime)
        ticks = _cpu_ticks()
        self.steal = None
        if ticks and self.ticks0 and ticks[0] > self.ticks0[0]:
            self.steal = (ticks[1] - self.ticks0[1]) / (ticks[0] - self.ticks0[0])
        return False

    def record(self) -> dict:
        return {"wall_seconds": round(self.wall, 1), "child_cpu_seconds": round(self.cpu, 1),
                "steal_share": None if self.steal is None else round(self.steal, 3)}

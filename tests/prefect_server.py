"""A real `prefect server start` on loopback, with its scheduler, and a served `nash serve`.

Used by the scheduling tests and by benchmarks/schedule_overlap.py. Both child processes run in
their own process groups and are killed as groups on exit, so nothing outlives the caller.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=10)


def _query(method: str, url: str, **kwargs) -> httpx.Response:
    """The test's own reads of the server. Its SQLite answers late while a round trains on the
    same 2 cores, so a slow answer is waited for, not taken as a failure of what is tested."""
    for attempt in range(3):
        try:
            return httpx.request(method, url, timeout=30, **kwargs)
        except httpx.TimeoutException:
            if attempt == 2:
                raise
            time.sleep(2)


class PrefectServer:
    """`prefect server start` with its own home and SQLite database under `home`.

    `scheduler_loop_seconds` shortens the scheduler service's loop (60 s by default) so a
    deployment registered after start-up gets its runs within seconds; the cron itself is real.
    """

    def __init__(self, home: Path, scheduler_loop_seconds: float = 5, startup_timeout: float = 120):
        self.home = Path(home)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/api"
        self.log_path = self.home / "server.log"
        self.scheduler_loop_seconds = scheduler_loop_seconds
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen | None = None
        self.children: list[subprocess.Popen] = []

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update({
            "PREFECT_HOME": str(self.home),
            "PREFECT_API_URL": self.url,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_SERVER_UI_ENABLED": "false",
            "PREFECT_SERVER_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{self.home / 'prefect.db'}",
            "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": str(self.scheduler_loop_seconds),
            "PYTHONUNBUFFERED": "1",
        })
        return env

    def __enter__(self) -> PrefectServer:
        self.home.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(self.port)],
            env=self.env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=self.home)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prefect server exited {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.__exit__(None, None, None)
        raise TimeoutError(f"prefect server did not answer in {self.startup_timeout} s:\n{self.log_tail()}")

    def __exit__(self, *exc) -> None:
        for child in self.children:
            _stop(child)
        _stop(self.proc)

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:]) if self.log_path.exists() else ""

    def start(self, argv: list[str], log_name: str, cwd: Path | None = None, env: dict | None = None
              ) -> subprocess.Popen:
        """A child process pointed at this server, stopped with the server."""
        log = open(self.home / log_name, "w")
        proc = subprocess.Popen(argv, env={**self.env(), **(env or {})}, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, cwd=cwd or ROOT)
        self.children.append(proc)
        return proc

    def flow_runs(self, deployment_name: str | None = None) -> list[dict]:
        body: dict = {"sort": "EXPECTED_START_TIME_ASC", "limit": 200}
        if deployment_name:
            body["deployments"] = {"name": {"any_": [deployment_name]}}
        r = _query("POST", f"{self.url}/flow_runs/filter", json=body)
        r.raise_for_status()
        return r.json()

    def deployment(self, flow_name: str, deployment_name: str) -> dict | None:
        r = _query("GET", f"{self.url}/deployments/name/{flow_name}/{deployment_name}")
        return r.json() if r.status_code == 200 else None

    def states(self, flow_run_id: str) -> list[dict]:
        """Every state a flow run went through, oldest first."""
        r = _query("GET", f"{self.url}/flow_run_states/", params={"flow_run_id": flow_run_id})
        r.raise_for_status()
        return sorted(r.json(), key=lambda s: s["timestamp"])

    def logs(self, flow_run_id: str) -> list[dict]:
        """A flow run's log records as the server has them (its own lines, not its subflows')."""
        body = {"logs": {"flow_run_id": {"any_": [flow_run_id]}}, "sort": "TIMESTAMP_ASC", "limit": 200}
        r = _query("POST", f"{self.url}/logs/filter", json=body)
        r.raise_for_status()
        return r.json()

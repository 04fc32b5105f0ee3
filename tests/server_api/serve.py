"""`facefl serve --workers N` as a real process group (uvicorn's supervisor and its worker processes)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

import httpx

from simulator.server import free_port
from tests.conftest import ADMIN, SECRET

ROOT = Path(__file__).resolve().parents[2]


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


class ServeProcess:
    """Runs ``python -m facefl.cli serve`` in a new session, so that the whole group can be SIGKILLed."""

    def __init__(self, work_dir: Path, db_url: str, *, workers: int, **env: str) -> None:
        self.work_dir = work_dir
        self.db_url = db_url
        self.workers = workers
        self.extra_env = env
        self.port: int | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 120.0, *, same_port: bool = False) -> ServeProcess:
        """Start (or restart: ``same_port`` keeps the address that devices already use)."""
        self.work_dir.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("FACEFL_")}
        env.update(
            {
                "FACEFL_ADMIN_TOKEN": ADMIN,
                "FACEFL_ENROLLMENT_SECRET": SECRET,
                "FACEFL_MIN_RETRY_AFTER_S": "0.05",
                "FACEFL_MAX_RETRY_AFTER_S": "0.5",
                "FACEFL_TICK_INTERVAL_S": "0.2",
                "FACEFL_REGISTER_RATE_PER_S": "0",  # fleets register all at once from one address
                "FACEFL_REGISTER_GLOBAL_RATE_PER_S": "0",
                "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p),
                **self.extra_env,
            }
        )
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        if not (same_port and self.port is not None):
            self.port = free_port()
        self._log = open(self.work_dir / "serve.log", "ab")  # noqa: SIM115 - closed in kill()/stop()
        cmd = [sys.executable, "-m", "facefl.cli", "serve", "--workers", str(self.workers),
               "--port", str(self.port), "--db", self.db_url, "--data-dir", str(self.work_dir / "data"),
               "--log-level", "warning"]  # fmt: skip
        self.proc = subprocess.Popen(
            cmd,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=self.work_dir,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        with httpx.Client(timeout=2.0) as http:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"serve exited ({self.proc.returncode}):\n{self.log_tail()}")
                with contextlib.suppress(httpx.TransportError):
                    healthy = http.get(f"{self.base_url}/v1/health").status_code == 200
                    if healthy and (self.workers == 1 or len(self.worker_pids()) >= self.workers):
                        return self
                time.sleep(0.2)
        self.kill()
        raise RuntimeError(f"serve not healthy in {timeout} s:\n{self.log_tail()}")

    def worker_pids(self) -> list[int]:
        """The uvicorn worker processes (spawned children, not multiprocessing's resource tracker)."""
        if self.proc is None:
            return []
        return [
            p
            for p in _children(self.proc.pid)
            if "multiprocessing" in _cmdline(p) and "resource_tracker" not in _cmdline(p)
        ]

    def kill(self) -> None:
        """SIGKILL the whole process group: supervisor and every worker, no shutdown of any kind."""
        proc, self.proc = self.proc, None
        if proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        self._close()

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=30)
        if proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # stragglers of our own group only
            proc.wait(timeout=30)
        self._close()

    def _close(self) -> None:
        log, self._log = self._log, None
        if log is not None:
            log.close()

    def log_tail(self, n: int = 4000) -> str:
        try:
            return (self.work_dir / "serve.log").read_text(errors="replace")[-n:]
        except OSError:
            return ""

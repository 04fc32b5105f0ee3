"""Start and stop a real facefl server (uvicorn subprocess on 127.0.0.1) for a simulation run."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

import httpx

from facefl.devmode import DEV_ADMIN_TOKEN, DEV_ENROLLMENT_SECRET
from server_api.serving import uvicorn_options

__all__ = ["LocalServer", "ServerStartError", "free_port"]

_PROJECT_ROOT = Path(__file__).resolve().parent.parent


class ServerStartError(RuntimeError):
    """The server process exited or did not become healthy in time."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class LocalServer:
    """``python -m uvicorn APP --factory`` on a free 127.0.0.1 port, as a context manager, with the HTTP
    parser and event loop of ``facefl serve`` (:mod:`server_api.serving`) whatever APP is.

    By default APP is the facefl server, in dev mode with its SQLite database and blob store under
    ``work_dir`` (unless ``database_url`` is given) and a short pace-steering floor, so that simulated
    devices do not idle. Inherited ``FACEFL_*`` variables are dropped: the server sees exactly the
    settings given here (plus ``extra_env``). Output goes to ``work_dir/server.log``. Tests and
    benchmarks use the same class (``kill()`` for crash tests, ``pid`` for CPU accounting).
    """

    def __init__(
        self,
        work_dir: str | Path,
        *,
        database_url: str | None = None,
        admin_token: str = DEV_ADMIN_TOKEN,
        enrollment_secret: str = DEV_ENROLLMENT_SECRET,
        min_retry_after_s: float = 0.2,
        startup_timeout_s: float = 60.0,
        extra_env: dict[str, str] | None = None,
        app: str = "server_api.app:create_app",
        app_dir: str | Path | None = None,
        health_path: str = "/v1/health",
        log_name: str = "server.log",
    ) -> None:
        self.work_dir = Path(work_dir)
        self.database_url = database_url or f"sqlite:///{(self.work_dir / 'server.db').resolve()}"
        self.data_dir = self.work_dir / "blobs"
        self.admin_token = admin_token
        self.enrollment_secret = enrollment_secret
        self.min_retry_after_s = min_retry_after_s
        self.startup_timeout_s = startup_timeout_s
        self.extra_env = dict(extra_env or {})
        self.app = app
        self.app_dir = Path(app_dir) if app_dir is not None else None
        self.health_path = health_path
        self.log_path = self.work_dir / log_name
        self.host = "127.0.0.1"
        self.port: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None

    @property
    def base_url(self) -> str:
        if self.port is None:
            raise RuntimeError("server not started")
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("FACEFL_")}
        env.update(
            {
                "FACEFL_DEV_MODE": "1",
                "FACEFL_DATABASE_URL": self.database_url,
                "FACEFL_DATA_DIR": str(self.data_dir.resolve()),
                "FACEFL_ADMIN_TOKEN": self.admin_token,
                "FACEFL_ENROLLMENT_SECRET": self.enrollment_secret,
                "FACEFL_MIN_RETRY_AFTER_S": str(self.min_retry_after_s),
                # a simulated fleet registers all at once from 127.0.0.1: registration limits off
                # (extra_env may turn them back on)
                "FACEFL_REGISTER_RATE_PER_S": "0",
                "FACEFL_REGISTER_GLOBAL_RATE_PER_S": "0",
                "PYTHONPATH": os.pathsep.join(p for p in (str(_PROJECT_ROOT), env.get("PYTHONPATH")) if p),
            }
        )
        env.update(self.extra_env)
        return env

    def start(self) -> LocalServer:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        env = self._env()
        last_error = "not started"
        for _attempt in range(3):  # a port picked as free can be taken before uvicorn binds it
            self.port = free_port()
            self._spawn(env)
            try:
                self._wait_healthy()
                return self
            except ServerStartError as exc:
                last_error = str(exc)
                self.stop()
        raise ServerStartError(f"{last_error}\n--- server log tail ---\n{self.log_tail()}")

    def uvicorn_options(self) -> list[str]:
        """The HTTP parser and event loop options (a benchmark may serve another stack)."""
        return uvicorn_options()

    def _spawn(self, env: dict[str, str]) -> None:
        self._log_file = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        cmd = [sys.executable, "-m", "uvicorn", self.app, "--factory",
               "--host", self.host, "--port", str(self.port), "--log-level", "warning",
               *self.uvicorn_options()]  # fmt: skip
        if self.app_dir is not None:
            cmd += ["--app-dir", str(self.app_dir)]
        self._proc = subprocess.Popen(
            cmd, env=env, stdout=self._log_file, stderr=subprocess.STDOUT, cwd=self.work_dir
        )

    def restart(self) -> LocalServer:
        """Start again on the same port, database and blob store (after :meth:`kill` or :meth:`stop`),
        so that clients holding the old URL reconnect; retried while the port is still being released."""
        if self.port is None:
            raise RuntimeError("server never started")
        self.stop()  # a no-op after kill()
        last_error = "not started"
        for _attempt in range(5):
            self._spawn(self._env())
            try:
                self._wait_healthy()
                return self
            except ServerStartError as exc:
                last_error = str(exc)
                self.stop()
                time.sleep(0.5)
        raise ServerStartError(f"restart failed: {last_error}\n--- server log tail ---\n{self.log_tail()}")

    def _wait_healthy(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + self.startup_timeout_s
        url = f"{self.base_url}{self.health_path}"
        with httpx.Client(timeout=httpx.Timeout(2.0)) as http:
            while time.monotonic() < deadline:
                if self._proc.poll() is not None:
                    raise ServerStartError(f"server exited with status {self._proc.returncode}")
                with contextlib.suppress(httpx.TransportError):
                    if http.get(url).status_code == 200:
                        return
                time.sleep(0.1)
        raise ServerStartError(f"server not healthy after {self.startup_timeout_s:g} s")

    def stop(self) -> None:
        """SIGTERM (graceful shutdown), SIGKILL after 10 s."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        self._close_log()

    def kill(self) -> None:
        """SIGKILL: no graceful shutdown (crash-safety tests)."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        self._close_log()

    def _close_log(self) -> None:
        log, self._log_file = self._log_file, None
        if log is not None:
            log.close()

    def log_tail(self, max_chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")[-max_chars:]
        except OSError:
            return ""

    def __enter__(self) -> LocalServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

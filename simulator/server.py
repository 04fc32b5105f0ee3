"""Start and stop a real facefl server (uvicorn subprocess on 127.0.0.1) for a simulation run."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

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
    """``python -m uvicorn server_api.app:create_app --factory`` on a free port, as a context manager.

    The server runs in dev mode with its SQLite database and blob store under ``work_dir`` (unless
    ``database_url`` is given) and a short pace-steering floor, so that simulated devices do not idle.
    Its output goes to ``work_dir/server.log``.
    """

    def __init__(
        self,
        work_dir: str | Path,
        *,
        database_url: str | None = None,
        admin_token: str = "dev-admin-token",
        enrollment_secret: str = "dev-enrollment-secret",
        min_retry_after_s: float = 0.2,
        startup_timeout_s: float = 60.0,
        extra_env: dict[str, str] | None = None,
    ) -> None:
        self.work_dir = Path(work_dir)
        self.database_url = database_url or f"sqlite:///{(self.work_dir / 'server.db').resolve()}"
        self.data_dir = self.work_dir / "blobs"
        self.admin_token = admin_token
        self.enrollment_secret = enrollment_secret
        self.min_retry_after_s = min_retry_after_s
        self.startup_timeout_s = startup_timeout_s
        self.extra_env = dict(extra_env or {})
        self.log_path = self.work_dir / "server.log"
        self.port: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file: object | None = None

    @property
    def base_url(self) -> str:
        if self.port is None:
            raise RuntimeError("server not started")
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> LocalServer:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        env.update(
            {
                "FACEFL_DEV_MODE": "1",
                "FACEFL_DATABASE_URL": self.database_url,
                "FACEFL_DATA_DIR": str(self.data_dir.resolve()),
                "FACEFL_ADMIN_TOKEN": self.admin_token,
                "FACEFL_ENROLLMENT_SECRET": self.enrollment_secret,
                "FACEFL_MIN_RETRY_AFTER_S": str(self.min_retry_after_s),
                "PYTHONPATH": os.pathsep.join(p for p in (str(_PROJECT_ROOT), env.get("PYTHONPATH")) if p),
            }
        )
        env.update(self.extra_env)
        last_error = "not started"
        for _attempt in range(3):  # a port picked as free can be taken before uvicorn binds it
            self.port = free_port()
            log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
            self._log_file = log
            cmd = [
                sys.executable, "-m", "uvicorn", "server_api.app:create_app", "--factory",
                "--host", "127.0.0.1", "--port", str(self.port), "--log-level", "warning",
            ]  # fmt: skip
            self._proc = subprocess.Popen(
                cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=self.work_dir
            )
            try:
                self._wait_healthy()
                return self
            except ServerStartError as exc:
                last_error = str(exc)
                self.stop()
        raise ServerStartError(f"{last_error}\n--- server log tail ---\n{self.log_tail()}")

    def _wait_healthy(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + self.startup_timeout_s
        url = f"{self.base_url}/v1/health"
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
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        log, self._log_file = self._log_file, None
        if log is not None:
            log.close()  # type: ignore[attr-defined]

    def log_tail(self, max_chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")[-max_chars:]
        except OSError:
            return ""

    def __enter__(self) -> LocalServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

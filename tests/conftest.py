"""Shared fixtures: settings on a temporary SQLite file, a fresh PostgreSQL database, live servers."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from server_api.settings import Settings

ADMIN = "test-admin-token"
SECRET = "test-enrollment-secret"
REPO = Path(__file__).resolve().parent.parent


def make_settings(tmp_path: Path, url: str | None = None, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "database_url": url or f"sqlite:///{tmp_path / 'facefl.db'}",
        "data_dir": tmp_path / "data",
        "admin_token": ADMIN,
        "enrollment_secret": SECRET,
        "min_retry_after_s": 0.05,
        "tick_interval_s": 0.1,
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh, uniquely named PostgreSQL database (dropped afterwards); skipped without a server URL."""
    base = os.environ.get("FACEFL_TEST_DATABASE_URL")
    if not base:
        pytest.skip("FACEFL_TEST_DATABASE_URL is not set")
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    from server_api.db import normalize_url

    admin_url = make_url(normalize_url(base))
    name = f"facefl_test_{uuid.uuid4().hex[:12]}"
    engine = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield admin_url.set(database=name).render_as_string(hide_password=False)
    finally:
        with engine.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        engine.dispose()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LiveServer:
    """A real uvicorn process on 127.0.0.1 (stop = SIGTERM, kill = SIGKILL)."""

    def __init__(self, tmp_path: Path, url: str | None = None, port: int | None = None, **env: str) -> None:
        self.port = port or free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.env = {
            **os.environ,
            "FACEFL_DATABASE_URL": url or f"sqlite:///{tmp_path / 'facefl.db'}",
            "FACEFL_DATA_DIR": str(tmp_path / "data"),
            "FACEFL_ADMIN_TOKEN": ADMIN,
            "FACEFL_ENROLLMENT_SECRET": SECRET,
            "FACEFL_MIN_RETRY_AFTER_S": "0.05",
            "FACEFL_TICK_INTERVAL_S": "0.2",
            **env,
        }
        self.log = tmp_path / f"server-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60.0) -> LiveServer:
        cmd = [sys.executable, "-m", "uvicorn", "server_api.app:create_app", "--factory",
               "--host", "127.0.0.1", "--port", str(self.port), "--log-level", "warning"]  # fmt: skip
        self.proc = subprocess.Popen(
            cmd, env=self.env, cwd=REPO, stdout=self.log.open("ab"), stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"server exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}"
                )
            try:
                if httpx.get(f"{self.base_url}/v1/health", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"server did not become healthy:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None


@pytest.fixture
def live_server(tmp_path: Path) -> Iterator[LiveServer]:
    server = LiveServer(tmp_path).start()
    try:
        yield server
    finally:
        server.stop()

"""Shared fixtures: settings on a temporary SQLite file, a fresh PostgreSQL database, live servers (one per
database backend and test module: ``server``)."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from server_api.settings import Settings
from simulator.server import LocalServer

# Under `pytest -n 2` (make test) each worker gets one core: one intra-op thread for torch and for the
# servers and simulators it starts (they inherit the variable), instead of 2 x 2 threads on 2 cores.
if os.environ.get("PYTEST_XDIST_WORKER") and "OMP_NUM_THREADS" not in os.environ:
    os.environ["OMP_NUM_THREADS"] = "1"
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)

ADMIN = "test-admin-token"
SECRET = "test-enrollment-secret"


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
    from server_api.db import scratch_database

    with scratch_database(base, "facefl_test") as url:
        yield url


class LiveServer(LocalServer):
    """The test configuration of the simulator's LocalServer: test tokens, fast deadline checks."""

    def __init__(self, tmp_path: Path, url: str | None = None, **env: str) -> None:
        super().__init__(
            tmp_path,
            database_url=url,
            admin_token=ADMIN,
            enrollment_secret=SECRET,
            min_retry_after_s=0.05,
            extra_env={"FACEFL_TICK_INTERVAL_S": "0.2", **env},
        )


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """One live server per database backend for the module that asks for it (its tests make their own
    tasks and devices); the PostgreSQL one runs on a fresh scratch database, skipped without
    FACEFL_TEST_DATABASE_URL. A module's own ``server`` fixture, where it has one, takes precedence."""
    with contextlib.ExitStack() as stack:
        url = None
        if request.param == "postgres":
            base = os.environ.get("FACEFL_TEST_DATABASE_URL")
            if not base:
                pytest.skip("FACEFL_TEST_DATABASE_URL is not set")
            from server_api.db import scratch_database

            url = stack.enter_context(scratch_database(base, "facefl_test"))
        live = LiveServer(tmp_path_factory.mktemp("server"), url)
        live.start()
        stack.callback(live.stop)
        yield live


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """With FACEFL_FORBID_SKIPS=1 (set by .ci/run) a skipped test fails: in CI every dependency is
    installed, PostgreSQL runs and ../shared/data is present, so a skip means something is missing."""
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if report.skipped and os.environ.get("FACEFL_FORBID_SKIPS") == "1" and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped in CI, where nothing may be: {reason}"

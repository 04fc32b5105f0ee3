"""Fixtures of the server tests that call the services directly: settings on a migrated temporary SQLite
file and a ServiceContext over them (closed afterwards)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from server_api.db import upgrade
from server_api.services.context import ServiceContext
from server_api.settings import Settings
from tests.conftest import make_settings


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    s = make_settings(tmp_path)
    upgrade(s.database_url)
    return s


@pytest.fixture
def ctx(settings: Settings) -> Iterator[ServiceContext]:
    context = ServiceContext.from_settings(settings)
    try:
        yield context
    finally:
        context.close()

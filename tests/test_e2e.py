"""End to end: a real uvicorn server on 127.0.0.1 with a real database, 4 SDK devices x 2 rounds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from device_sdk import AdminClient
from simulator import SimulationConfig, simulate
from tests.conftest import ADMIN, SECRET, LiveServer

pytestmark = pytest.mark.slow


def _run(tmp_path: Path, url: str | None) -> None:
    server = LiveServer(tmp_path, url).start()
    try:
        result = simulate(
            SimulationConfig(
                devices=4,
                rounds=2,
                model="small",
                data="synthetic",
                ids_per_device=4,
                images_per_id=8,
                heldout_ids=20,
                server=server.base_url,
                admin_token=ADMIN,
                enrollment_secret=SECRET,
                workers=2,
                seed=3,
                progress=False,
                work_dir=str(tmp_path / "sim"),
            )
        )
        assert [r.status for r in result.rounds] == ["aggregated", "aggregated"]
        assert all(r.reports == 4 for r in result.rounds)
        with AdminClient(server.base_url, ADMIN, timeout=30) as admin:
            versions = admin.list_models(task_id=result.task_id)
            # the initial version and exactly one new version per round, each the parent of the next
            assert len(versions) == 3
            assert [v.parent_version for v in versions] == [
                None,
                versions[0].version,
                versions[1].version,
            ]
            first = admin.download_model(versions[0].version)
            last = admin.download_model(versions[-1].version)
        changed = sum(not np.array_equal(first[k], last[k]) for k in first)
        assert changed > len(first) // 2, "the global weights should change after two rounds of training"
        assert result.rounds[-1].model_version == versions[-1].version
        assert result.rounds[-1].heldout_accuracy > 2 * result.chance_accuracy
    finally:
        server.stop()


def test_e2e_sqlite(tmp_path: Path) -> None:
    _run(tmp_path, None)


@pytest.mark.postgres
def test_e2e_postgres(tmp_path: Path, pg_url: str) -> None:
    _run(tmp_path, pg_url)

"""Device-job backends: the Ray backend runs a real simulation (skipped without the 'ray' extra)."""

from __future__ import annotations

from pathlib import Path

import pytest

from simulator.backends import make_backend, ray_available
from simulator.run import SimulationConfig, simulate


def test_unknown_backend_is_refused() -> None:
    with pytest.raises(ValueError, match="--backend must be one of local, ray"):
        make_backend("dask", 2)


@pytest.mark.slow
@pytest.mark.skipif(not ray_available(), reason="needs the 'ray' extra")
def test_ray_backend_runs_a_real_round(tmp_path: Path) -> None:
    cfg = SimulationConfig(
        devices=3, rounds=1, ids_per_device=2, images_per_id=4, heldout_ids=4, workers=2, batch_size=8,
        backend="ray", progress=False, work_dir=str(tmp_path),
    )  # fmt: skip
    result = simulate(cfg, log=lambda _msg: None)
    (r,) = result.rounds
    assert r.status == "aggregated" and r.reports == 3 and r.jobs == {"uploaded": 3}, (r, result.errors)
    assert r.model_version > 1

"""A registry-only algorithm through the simulator and a real server: FedAdam, 2 rounds."""

from __future__ import annotations

from pathlib import Path

import pytest

from simulator import SimulationConfig, simulate


@pytest.mark.slow
def test_simulate_fedadam_two_rounds(tmp_path: Path) -> None:
    cfg = SimulationConfig(
        devices=3, rounds=2, ids_per_device=2, images_per_id=4, heldout_ids=4, workers=2, batch_size=8,
        algorithm="fedadam", extra_hyperparams={"server_lr": 0.01, "tau": 0.001},
        progress=False, work_dir=str(tmp_path),
    )  # fmt: skip
    result = simulate(cfg, log=lambda _msg: None)
    assert [r.status for r in result.rounds] == ["aggregated", "aggregated"], result.errors
    assert [r.model_version for r in result.rounds] == [2, 3]
    assert all(r.reports == 3 for r in result.rounds)

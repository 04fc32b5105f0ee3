"""Worker processes per training slot (--overlap): more processes than slots, never more trainings at once
than slots; the simulator's close wait and the round's peak count of trainings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from simulator.backends import make_backend
from simulator.cli import main
from simulator.config import SimulationConfig
from simulator.report import peak_trainings
from simulator.worker import JobResult


def _windows(*windows: tuple[float, float] | None) -> list[JobResult]:
    return [JobResult(device_index=i, status="uploaded", train_window=w) for i, w in enumerate(windows)]


def test_peak_trainings_counts_overlapping_windows_only() -> None:
    assert peak_trainings([]) == 0
    assert peak_trainings(_windows(None, (0.0, 1.0))) == 1
    # one ends as the next begins: one at a time
    assert peak_trainings(_windows((0.0, 1.0), (1.0, 2.0), (2.0, 3.0))) == 1
    assert peak_trainings(_windows((0.0, 2.0), (1.0, 3.0), (1.5, 1.6), (2.5, 4.0))) == 3


def test_overlap_must_be_positive(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--overlap", "0"])
    assert "--overlap" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--overlap must be >= 1"):
        SimulationConfig(overlap=0).validate()


def test_overlap_is_for_the_local_backend_only() -> None:
    with pytest.raises(ValueError, match="--overlap applies to --backend local only"):
        SimulationConfig(overlap=2, backend="ray").validate()
    with pytest.raises(ValueError, match="overlap"):
        make_backend("ray", 2, overlap=2)
    with pytest.raises(ValueError, match="overlap must be >= 1"):
        make_backend("local", 1, overlap=0)


@pytest.mark.slow
def test_two_processes_share_one_training_slot_in_a_real_round(tmp_path: Path) -> None:
    out = tmp_path / "result.json"
    argv = (
        "--devices 6 --rounds 2 --model tiny --ids-per-device 2 --images-per-id 3 --heldout-ids 2 "
        f"--workers 1 --overlap 2 --seed 3 --no-progress --work-dir {tmp_path} --json {out}"
    )
    assert main(argv.split()) == 0
    result = json.loads(out.read_text())
    assert result["errors"] == []
    assert result["config"]["overlap"] == 2
    for r in result["rounds"]:
        assert r["status"] == "aggregated" and r["reports"] == 6 and r["jobs"] == {"uploaded": 6}
        # two processes, one slot: their trainings never ran at the same time
        assert r["peak_trainings"] == 1
        assert "train_wait" in r["job_seconds"] and len(r["device_train_s"]) == 6

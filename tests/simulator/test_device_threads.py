"""Many devices per worker process (--device-threads): batches of jobs, run in threads that share the
process's connection pool, registered in parallel; a small real run (tiny model, real server)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from simulator.cli import main
from simulator.run import JOBS_PER_THREAD, device_batches
from simulator.worker import DataSpec, DeviceJob


def _jobs(n: int) -> list[DeviceJob]:
    spec = DataSpec("synthetic", (0, 1), 8, 2)
    return [DeviceJob("http://127.0.0.1:9", 1, i, f"/nonexistent/{i}", spec, 1, i) for i in range(n)]


def test_without_threads_every_job_is_its_own_batch() -> None:
    batches = device_batches(_jobs(5), 1)
    assert [[j.device_index for j in b.jobs] for b in batches] == [[0], [1], [2], [3], [4]]
    assert all(b.threads == 1 for b in batches)


def test_with_threads_batches_hold_consecutive_jobs_and_cover_every_job_once() -> None:
    n = 2 * JOBS_PER_THREAD * 3 + 5
    batches = device_batches(_jobs(n), 3)
    assert [len(b.jobs) for b in batches] == [JOBS_PER_THREAD * 3, JOBS_PER_THREAD * 3, 5]
    assert [j.device_index for b in batches for j in b.jobs] == list(range(n))
    assert all(b.threads == 3 for b in batches)


def test_the_option_must_be_positive(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--device-threads", "0"])
    assert "--device-threads" in capsys.readouterr().err


def test_threaded_devices_all_report_in_a_real_round(tmp_path: Path) -> None:
    out = tmp_path / "result.json"
    argv = (
        "--devices 9 --rounds 2 --model tiny --ids-per-device 2 --images-per-id 2 --heldout-ids 2 "
        f"--workers 1 --device-threads 4 --seed 2 --no-progress --work-dir {tmp_path} --json {out}"
    )
    assert main(argv.split()) == 0
    result = json.loads(out.read_text())
    assert result["errors"] == []
    for r in result["rounds"]:
        assert r["status"] == "aggregated" and r["reports"] == 9 and r["jobs"] == {"uploaded": 9}
    # registered in parallel: every device has its own credentials, none lost or shared
    (run_dir,) = tmp_path.glob("run-*")
    creds = [json.loads((run_dir / "devices" / str(i) / "credentials.json").read_text()) for i in range(9)]
    assert len({c["device_id"] for c in creds}) == 9

"""The throughput benchmark runs end to end in --quick mode (speed is measured, never asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "server_throughput.py"


def _positive(section: dict, *path: str) -> float:
    value = section
    for key in path:
        value = value[key]
    assert isinstance(value, int | float) and value > 0, f"{'.'.join(path)} = {value!r}"
    return float(value)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_quick_benchmark_writes_json_and_prints_table(tmp_path: Path) -> None:
    out = tmp_path / "x.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--json", str(out), "--workdir", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]

    # the table was printed: header, separator, and one row per metric
    assert "metric" in proc.stdout and "ratio (facefl/baseline)" in proc.stdout
    for label in ("check-in, new assignment: req/s", "uploads/s", "GB/s"):
        assert label in proc.stdout

    result = json.loads(out.read_text())
    assert {"checkin", "upload", "aggregation", "table", "meta"} <= result.keys()
    assert result["meta"]["mode"] == "quick" and result["meta"]["database"] == "sqlite"

    ck = result["checkin"]
    for phase in ("facefl_new_assignment", "facefl_rotate_token", "facefl_register_device", "baseline"):
        for key in ("req_per_s", "p50_ms", "p99_ms"):
            _positive(ck, phase, key)
        assert ck[phase]["requests"] == ck["devices_per_repeat"] * ck["repeats"]

    up = result["upload"]
    assert _positive(up, "payload_bytes") > 3_000_000  # a real ~4 MB mobilefacenet delta
    for variant in ("facefl", "baseline_fsync", "baseline_no_fsync"):
        for key in ("req_per_s", "p50_ms", "p99_ms", "mb_per_s"):
            _positive(up, variant, key)
    agg_round = up["round_aggregation"]
    for key in ("end_to_end_s", "server_aggregation_s", "end_to_end_gb_per_s"):
        _positive(agg_round, key)
    assert agg_round["reports"] == up["warmup_uploads"] + up["uploads_per_repeat"] * up["repeats"]
    assert agg_round["result_version"] is not None

    agg = result["aggregation"]
    for name in ("weighted_mean_files", "weighted_mean_memory", "numpy_add_floor", "load_file_only"):
        _positive(agg, name, "gb_per_s")
    _positive(agg, "updates")

    rows = result["table"]
    assert rows
    for row in rows:
        if "CPU" in row["metric"] and row["facefl"] is None:  # process CPU time is read from Linux /proc
            continue
        assert row["facefl"] > 0 and row["baseline"] > 0 and row["ratio"] > 0, row

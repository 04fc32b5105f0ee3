"""The simulator's secure-aggregation options: their checks, the task policy they make, the report's
stage column, and a real run where a device vanishes after sharing and the protocol recovers."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from simulator.cli import add_arguments, config_from_args, main
from simulator.config import SECAGG_CLIP_NORM, SECAGG_STAGE_TIMEOUT_S, SimulationConfig
from simulator.faults import FaultConfig
from simulator.report import RoundResult, SimulationResult
from simulator.run import simulate


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--secagg-clip-norm", "1"], "--secagg-clip-norm needs --secure-aggregation"),
        (["--secagg-stage-timeout", "5"], "--secagg-stage-timeout needs --secure-aggregation"),
        (
            ["--algorithm", "fedface", "--ids-per-device", "1", "--secure-aggregation"],
            "--secure-aggregation: fedface's server reads each update on its own",
        ),
        (
            ["--devices", "4", "--min-reports", "1", "--secure-aggregation"],
            "--secure-aggregation needs --min-reports >= 2 (got 1;",
        ),
        (["--secure-aggregation", "--corrupt", "0.2"], "--corrupt: the server cannot see values"),
        (
            ["--secure-aggregation", "--update-encoding", "int8"],
            "--secure-aggregation quantizes updates for the protocol itself",
        ),
        (
            ["--devices", "6", "--workers", "3", "--secure-aggregation"],
            "--workers (3) must be >= --target-reports (6)",
        ),
    ],
)
def test_incompatible_secagg_options_exit_2_with_a_clear_message(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_malformed_secagg_values_are_argparse_errors(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["--secagg-clip-norm", "0"], ["--secagg-stage-timeout", "-1"]):
        with pytest.raises(SystemExit) as info:
            main(["--secure-aggregation", *argv])
        assert info.value.code == 2
    assert "expected a positive number" in capsys.readouterr().err


def _config(argv: list[str]) -> SimulationConfig:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return config_from_args(parser.parse_args(argv)).validate()


def test_secagg_options_make_the_task_policy_and_run_every_device_at_once() -> None:
    assert _config(["--devices", "5"]).secagg_policy() is None
    cfg = _config(["--devices", "7", "--workers", "2", "--target-reports", "2", "--secure-aggregation"])
    assert cfg.secagg_policy() == {"clip_norm": SECAGG_CLIP_NORM, "stage_timeout_s": SECAGG_STAGE_TIMEOUT_S}
    assert cfg.workers == 2  # given, and enough for the target
    cfg = _config(["--devices", "7", "--secure-aggregation", "--secagg-clip-norm", "2.5"])
    assert cfg.workers is not None and cfg.workers >= 7  # default: the whole cohort at once
    options = ["--secagg-stage-timeout", "4", "--round-timeout-s", "10"]
    cfg = _config(["--devices", "3", "--secure-aggregation", *options])
    assert cfg.secagg_policy() == {"clip_norm": SECAGG_CLIP_NORM, "stage_timeout_s": 4.0}
    assert cfg.round_wait_s() == 10.0 + 3 * 4.0  # the deadline, then three stages at most


def test_the_table_shows_the_stages_reached_and_why_a_round_was_abandoned() -> None:
    cfg = _config(["--devices", "4", "--secure-aggregation"])
    ok = RoundResult(
        round=1, round_id=1, status="aggregated", reports=3, assigned=4, dropped=1, model_version=2,
        wall_s=1.0, mb_uploaded=0.1, heldout_accuracy=0.5,
        secagg={"keys": 4, "shares": 4, "masked": 3, "reveal": 3},
    )  # fmt: skip
    lost = RoundResult(
        round=2, round_id=2, status="abandoned", reports=1, assigned=4, dropped=3, model_version=2,
        wall_s=1.0, mb_uploaded=0.1, heldout_accuracy=0.5,
        secagg={"keys": 4, "shares": 4, "masked": 1, "reveal": 0},
        abandoned_reason="secure aggregation: 1 masked updates, 2 needed",
    )  # fmt: skip
    result = SimulationResult(config=cfg, rounds=[ok, lost], initial_heldout_accuracy=0.2, total_wall_s=2.0)
    lines = result.table().splitlines()
    header = next(line for line in lines if line.strip().startswith("round"))
    assert header.split()[-1] == "keys/shares/masked/reveal"
    rows = [line.split() for line in lines if line.strip()[:1].isdigit()]
    assert [row[-1] for row in rows] == ["4/4/3/3", "4/4/1/0"]
    assert "round 2 abandoned: secure aggregation: 1 masked updates, 2 needed" in lines
    assert result.to_json()["rounds"][0]["secagg"] == {"keys": 4, "shares": 4, "masked": 3, "reveal": 3}
    plain = SimulationResult(
        config=_config(["--devices", "4"]), rounds=[ok], initial_heldout_accuracy=0.2, total_wall_s=1.0
    )
    assert "keys/shares" not in plain.table()


@pytest.mark.slow
def test_secure_round_aggregates_although_a_device_vanishes_after_sharing(tmp_path: Path) -> None:
    devices, p = 4, 0.2

    def vanishing(seed: int) -> list[int]:
        plan = FaultConfig(dropout=p, seed=seed)
        return [d for d in range(devices) if plan.decide(1, d).kind == "dropout"]

    # exactly one dropout, and it is the one that goes on to share before vanishing ("train")
    seed = next(
        s
        for s in range(500)
        if len(vanishing(s)) == 1
        and FaultConfig(dropout=p, seed=s).decide(1, vanishing(s)[0]).drop_after == "train"
    )
    out = tmp_path / "result.json"
    cfg = SimulationConfig(
        devices=devices, rounds=1, model="small", ids_per_device=1, images_per_id=2, heldout_ids=2,
        batch_size=2, seed=seed, dropout=p, min_reports=2, round_timeout_s=30.0, progress=False,
        work_dir=str(tmp_path), json_path=str(out), secure_aggregation=True, secagg_stage_timeout_s=2.0,
    ).validate()  # fmt: skip
    result = simulate(cfg, log=lambda _msg: None)
    (r,) = result.rounds
    # all four advertised keys and sent shares; the dropout never sent its masked update, and the
    # survivors' reveals let the server remove the masks they added for it: the round aggregated
    assert r.status == "aggregated", (r, result.errors)
    assert r.secagg == {"keys": 4, "shares": 4, "masked": 3, "reveal": 3}
    assert r.reports == 3 and r.vanished == 1 and r.jobs == {"uploaded": 3, "dropped": 1}
    assert r.model_version > 1 and not result.errors
    assert r.mb_uploaded > 0
    saved = json.loads(out.read_text())
    assert saved["config"]["secure_aggregation"] is True
    assert saved["rounds"][0]["secagg"]["masked"] == 3

"""The simulator's differential-privacy options: their checks, the task policy they make, and the
epsilon column of the results table and JSON."""

from __future__ import annotations

import argparse

import pytest

from simulator.cli import add_arguments, config_from_args, main
from simulator.config import SimulationConfig
from simulator.report import RoundResult, SimulationResult


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--dp-noise-multiplier", "1"], "--dp-noise-multiplier needs --dp-clip-norm"),
        (
            ["--devices", "4", "--dp-clip-norm", "1", "--dp-population", "3"],
            "--dp-population (3) cannot be below --target-reports (4)",
        ),
        (
            ["--algorithm", "fedface", "--ids-per-device", "1", "--dp-clip-norm", "1"],
            "fedface uploads per-device tensors",
        ),
        (
            ["--dp-clip-norm", "1", "--dp-noise-multiplier", "0", "--dp-epsilon-budget", "3"],
            "--dp-epsilon-budget needs --dp-noise-multiplier > 0",
        ),
        (["--dp-clip-norm", "1", "--dp-delta", "0.5"], "--dp-delta must be in (0, 0.1)"),
    ],
)
def test_bad_dp_options_exit_2_with_a_clear_message(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def _config(argv: list[str]) -> SimulationConfig:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return config_from_args(parser.parse_args(argv)).validate()


def test_dp_options_make_the_task_policy_with_defaults() -> None:
    assert _config(["--devices", "5"]).dp_policy() is None
    cfg = _config(["--devices", "5", "--target-reports", "2", "--dp-clip-norm", "0.5"])
    assert cfg.dp_policy() == {
        "clip_norm": 0.5,
        "noise_multiplier": 1.0,
        "delta": 1e-5,
        "population": 5,  # the simulated devices
        "epsilon_budget": None,
    }
    options = "--dp-clip-norm 2 --dp-noise-multiplier 0.8 --dp-population 1000 --dp-delta 1e-6"
    cfg = _config([*options.split(), "--dp-epsilon-budget", "4"])
    assert cfg.dp_policy() == {
        "clip_norm": 2.0,
        "noise_multiplier": 0.8,
        "delta": 1e-6,
        "population": 1000,
        "epsilon_budget": 4.0,
    }


def _round(
    number: int, epsilon: float | None, delta: float | None, status: str = "aggregated"
) -> RoundResult:
    return RoundResult(
        round=number, round_id=number, status=status, reports=3, assigned=3, dropped=0,
        model_version=number + 1, wall_s=1.0, mb_uploaded=0.1, heldout_accuracy=0.5,
        epsilon=epsilon, delta=delta,
    )  # fmt: skip


def test_the_table_and_json_show_the_epsilon_spent_after_each_round() -> None:
    cfg = _config(["--devices", "3", "--dp-clip-norm", "1"])
    result = SimulationResult(
        config=cfg,
        rounds=[_round(1, 1.234567, 1e-5), _round(2, None, None, "abandoned"), _round(3, 2.5, 1e-5)],
        initial_heldout_accuracy=0.25,
        total_wall_s=3.0,
        stopped="privacy_budget_exhausted",
    )
    lines = result.table().splitlines()
    header = next(line for line in lines if line.strip().startswith("round"))
    assert header.split()[-1] == "epsilon"
    rows = [line.split() for line in lines if line.strip()[:1].isdigit()]
    assert [row[-1] for row in rows] == ["1.23", "-", "2.5"]
    assert "the task stopped after 3 round(s): privacy_budget_exhausted" in lines
    data = result.to_json()
    assert [r["epsilon"] for r in data["rounds"]] == [1.234567, None, 2.5]
    assert data["stopped"] == "privacy_budget_exhausted"
    # no noise: epsilon is infinite (null from the server), shown as inf
    no_noise = SimulationResult(
        config=cfg, rounds=[_round(1, None, 1e-5)], initial_heldout_accuracy=0.2, total_wall_s=1.0
    )
    assert [line.split()[-1] for line in no_noise.table().splitlines() if line.strip()[:1].isdigit()] == [
        "inf"
    ]


def test_without_dp_there_is_no_epsilon_column() -> None:
    result = SimulationResult(
        config=_config(["--devices", "3"]), rounds=[_round(1, None, None)], initial_heldout_accuracy=0.2,
        total_wall_s=1.0,
    )  # fmt: skip
    assert "epsilon" not in result.table()

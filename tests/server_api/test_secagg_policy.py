"""A round's secure-aggregation parameters from a task's policy (pure: server_api.secagg_policy)."""

from __future__ import annotations

import math
from typing import Any

import pytest

from facefl.secagg import fixedpoint
from server_api.secagg_policy import assignment_info, dp_noise_stddev
from server_api.task_schemas import RoundPolicy


def _policy(**extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "target_reports": 8,
        "min_reports": 4,
        "over_selection": 1.25,
        "max_sample_weight": 50,
    }
    body["secure_aggregation"] = {"clip_norm": 2.0, "max_neighbours": 6}
    return RoundPolicy.model_validate(body).model_dump() | extra  # policy.dp is read raw, defensively


def test_no_secure_aggregation_no_info() -> None:
    assert assignment_info(RoundPolicy().model_dump()) is None


def test_hand_computed_parameters() -> None:
    info = assignment_info(_policy())
    assert info is not None
    # 8 * 1.25 = 10 assignments; bound = 50 * 2.0; scale = (2^31 - 1 - 10) / (10 * 100)
    assert (info.max_devices, info.bound, info.noise_stddev) == (10, 100.0, 0.0)
    assert info.scale == (2**31 - 1 - 10) / 1000
    assert (info.clip_norm, info.max_sample_weight, info.max_neighbours, info.modulus_bits) == (
        2.0,
        50,
        6,
        32,
    )


def test_distributed_dp_noise_from_the_raw_policy() -> None:
    # noise_multiplier 1.5 * clip 2.0 / sqrt(min_reports 4) = 1.5 per device and coordinate
    assert dp_noise_stddev({"dp": {"noise_multiplier": 1.5, "clip_norm": 2.0}}, 4) == 1.5
    info = assignment_info(_policy(dp={"noise_multiplier": 1.5, "clip_norm": 2.0}))
    assert info is not None and info.noise_stddev == 1.5
    # DP-FedAvg's equal weights: every device's weight is 1, so the sum's sensitivity is the clip norm
    assert (info.max_sample_weight, info.clip_norm) == (1, 2.0)
    assert info.bound == 2.0 + fixedpoint.NOISE_SIGMAS * 1.5  # the fixed point makes room for the noise
    tighter = assignment_info(_policy(dp={"noise_multiplier": 1.0, "clip_norm": 0.5}))
    assert tighter is not None and (tighter.clip_norm, tighter.noise_stddev) == (0.5, 0.25)


@pytest.mark.parametrize(
    "dp",
    [None, "on", {}, {"noise_multiplier": "1"}, {"noise_multiplier": True, "clip_norm": 1.0},
     {"noise_multiplier": math.inf, "clip_norm": 1.0}, {"noise_multiplier": -1.0, "clip_norm": 1.0},
     {"noise_multiplier": 1.0}],
)  # fmt: skip
def test_malformed_dp_means_no_noise(dp: Any) -> None:
    assert dp_noise_stddev({"dp": dp}, 4) == 0.0

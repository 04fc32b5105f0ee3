"""A round's secure-aggregation parameters as a pure function of the task's policy (no I/O): what every
device of the round is told in its assignment, and what the server dequantizes with."""

from __future__ import annotations

import math
from typing import Any

from facefl.secagg import fixedpoint
from server_api.round_policy import max_assignments
from server_api.schemas import SecAggInfo


def dp_noise_stddev(policy: dict[str, Any], min_reports: int) -> float:
    """Distributed DP: each of at least ``min_reports`` surviving devices adds N(0, sigma^2) per coordinate
    so that their sum carries the central mechanism's noise_multiplier * clip_norm. Read defensively from
    the task's raw ``policy["dp"]`` (0 when absent or malformed)."""
    dp = policy.get("dp")
    if not isinstance(dp, dict):
        return 0.0
    multiplier, clip = dp.get("noise_multiplier"), dp.get("clip_norm")
    numbers = [v for v in (multiplier, clip) if isinstance(v, int | float) and not isinstance(v, bool)]
    if len(numbers) != 2 or not all(math.isfinite(v) and v >= 0 for v in numbers):
        return 0.0
    return float(numbers[0]) * float(numbers[1]) / math.sqrt(max(1, min_reports))


def assignment_info(policy: dict[str, Any]) -> SecAggInfo | None:
    """None when the task does not ask for secure aggregation."""
    config = policy.get("secure_aggregation")
    if not config:
        return None
    clip_norm = float(config["clip_norm"])
    max_weight = int(policy["max_sample_weight"])
    noise = dp_noise_stddev(policy, int(policy["min_reports"]))
    dp = policy.get("dp")
    if isinstance(dp, dict) and isinstance(dp.get("clip_norm"), int | float):
        # DP-FedAvg on the devices: equal weights (the sum's sensitivity is the clip norm) and dp's clip
        clip_norm, max_weight = min(clip_norm, float(dp["clip_norm"])), 1
    devices = max_assignments(int(policy["target_reports"]), float(policy["over_selection"]))
    bound = fixedpoint.coordinate_bound(clip_norm=clip_norm, max_weight=max_weight, noise_stddev=noise)
    return SecAggInfo(
        clip_norm=clip_norm,
        max_sample_weight=max_weight,
        noise_stddev=noise,
        max_devices=devices,
        bound=bound,
        scale=fixedpoint.quantization_scale(max_devices=devices, bound=bound),
        modulus_bits=fixedpoint.MODULUS_BITS,
        max_neighbours=int(config["max_neighbours"]),
        stage_timeout_s=float(config["stage_timeout_s"]),
    )

"""A task's differential privacy (``policy.dp``): the noised round delta and the (epsilon, delta) spent.

The mechanism and the accountant are :mod:`facefl.privacy`; this module reads the task's stored policy
(a plain dict) and applies them. Central DP: the server sees each update, clips it and adds the noise.
Under secure aggregation (``policy.secure_aggregation``, another module's) the server sees only the sum,
so the devices add the noise themselves (distributed DP) and the server adds none; the accounting is the
same. Every aggregated round counts, a version held back by the release gate included (it was computed
and stored); an abandoned round releases nothing and costs nothing.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from facefl import update_files
from facefl.privacy import accountant, dp
from server_api.schemas import PrivacyOut


@dataclass(frozen=True)
class DpPolicy:
    """``policy.dp`` of a stored task (validated at creation by task_schemas.DifferentialPrivacy)."""

    clip_norm: float
    noise_multiplier: float
    delta: float
    sampling_rate: float  # q = target_reports / population
    epsilon_budget: float | None

    def epsilon(self, rounds: int) -> float:
        return accountant.epsilon_spent(self.sampling_rate, self.noise_multiplier, rounds, self.delta)


def dp_policy(policy: Mapping[str, Any]) -> DpPolicy | None:
    """The task's DP settings; None when ``policy.dp`` is absent or null (DP off)."""
    config = policy.get("dp")
    if not config:
        return None
    budget = config.get("epsilon_budget")
    return DpPolicy(
        clip_norm=float(config["clip_norm"]),
        noise_multiplier=float(config["noise_multiplier"]),
        delta=float(config["delta"]),
        sampling_rate=int(policy["target_reports"]) / int(config["population"]),
        epsilon_budget=None if budget is None else float(budget),
    )


def server_adds_noise(policy: Mapping[str, Any]) -> bool:
    """False under secure aggregation: the devices add the noise, the server never sees one update."""
    return not policy.get("secure_aggregation")


def may_open_round(policy: Mapping[str, Any], aggregated_rounds: int) -> bool:
    """Whether one more round keeps the task within its epsilon budget (always without one)."""
    settings = dp_policy(policy)
    if settings is None or settings.epsilon_budget is None:
        return True
    return settings.epsilon(aggregated_rounds + 1) <= settings.epsilon_budget


def spent(policy: Mapping[str, Any], aggregated_rounds: int) -> PrivacyOut | None:
    """What the task's releases so far cost: (epsilon, delta) after ``aggregated_rounds`` DP rounds."""
    settings = dp_policy(policy)
    if settings is None:
        return None
    return PrivacyOut(
        epsilon=finite_or_none(settings.epsilon(aggregated_rounds)),
        delta=settings.delta,
        rounds=aggregated_rounds,
        epsilon_budget=settings.epsilon_budget,
        noise_added_by="server" if server_adds_noise(policy) else "devices",
    )


def finite_or_none(value: float) -> float | None:
    """JSON has no infinity: an infinite epsilon (no noise) is reported as null."""
    return value if np.isfinite(value) else None


def dp_delta(
    paths: Sequence[str | Path],
    norms: Sequence[float],
    settings: DpPolicy,
    *,
    exclude: Collection[str] = (),
) -> dict[str, np.ndarray]:
    """The released delta of a plain (central DP) round: each update scaled by min(1, C / its norm) (the
    norm the intake stored: no extra pass over the blobs), the equal-weight mean streamed with memory
    O(model), then noise N(0, (zC / n)^2) on every coordinate, which is N(0, (zC)^2) on the sum divided
    by n. Under secure aggregation the devices do this and the masked path aggregates instead."""
    factors = dp.clip_factors(norms, settings.clip_norm)
    mean = update_files.mean_of_files(paths, [1.0] * len(paths), factors=factors, exclude=exclude)
    std = dp.noise_std_of_mean(settings.clip_norm, settings.noise_multiplier, len(paths))
    return dp.add_gaussian_noise(mean, std, dp.secure_rng())

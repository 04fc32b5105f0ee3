"""The privacy accountant of DP-FedAvg: (epsilon, delta) spent after some rounds.

Each aggregated round is one Poisson-subsampled Gaussian mechanism (McMahan et al., "Learning
differentially private recurrent language models", ICLR 2018): every device of the task's stated
population takes part with probability ``q = target_reports / population``, its clipped update has L2
sensitivity ``C``, and the sum carries Gaussian noise of standard deviation ``z C``. Rounds compose; the
Renyi-DP accountant of ``dp_accounting`` (Mironov 2017; Mironov, Talwar and Zhang 2019 for the subsampled
Gaussian) turns the composition into the smallest epsilon for the given delta, with the conversion of
Canonne, Kamath and Steinke (2020), tighter than the classic ``rdp - log(delta) / (order - 1)``.

Adjacency is add-or-remove one device (all of a device's images: user-level privacy).
"""

from __future__ import annotations

import functools
import logging
import math
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from dp_accounting.rdp import RdpAccountant


def _check(sampling_rate: float, noise_multiplier: float, rounds: int) -> None:
    if not 0.0 < sampling_rate <= 1.0:
        raise ValueError(f"sampling_rate must be in (0, 1], got {sampling_rate}")
    if not (noise_multiplier >= 0.0 and math.isfinite(noise_multiplier)):
        raise ValueError(f"noise_multiplier must be a finite number >= 0, got {noise_multiplier}")
    if rounds < 0:
        raise ValueError(f"rounds must be >= 0, got {rounds}")


class _DropExcludedOrders(logging.Filter):
    """dp_accounting warns (through absl) on every call when its series for a fractional order does not
    converge (large sampling rates) and leaves that order out: epsilon, the minimum over the other
    orders, is still a valid upper bound, so the warning is noise in a server's log."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Excluding this order" not in record.getMessage()


def _accountant(sampling_rate: float, noise_multiplier: float, rounds: int) -> RdpAccountant:
    # imported on first use: dp_accounting loads scipy (seconds), which only a DP task needs
    import dp_accounting
    from dp_accounting.rdp import RdpAccountant

    absl_log = logging.getLogger("absl")
    if not any(isinstance(f, _DropExcludedOrders) for f in absl_log.filters):
        absl_log.addFilter(_DropExcludedOrders())

    accountant = RdpAccountant()
    event = dp_accounting.PoissonSampledDpEvent(
        sampling_rate, dp_accounting.GaussianDpEvent(noise_multiplier)
    )
    accountant.compose(event, rounds)
    return accountant


@functools.lru_cache(maxsize=4096)
def epsilon_spent(sampling_rate: float, noise_multiplier: float, rounds: int, delta: float) -> float:
    """Epsilon of ``rounds`` rounds at sampling rate ``q`` and noise multiplier ``z`` for ``delta``.

    0.0 for no round; ``math.inf`` for ``z == 0`` (clipping without noise gives no finite guarantee) and
    wherever the accountant cannot compute a finite bound (degenerate inputs such as ``z = 1e-300``).
    Cached: the server asks for the same few values on every task view and round."""
    _check(sampling_rate, noise_multiplier, rounds)
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    if rounds == 0:
        return 0.0
    if noise_multiplier == 0.0:
        return math.inf
    try:
        with np.errstate(all="ignore"):  # a degenerate input overflows to inf: handled here, not a warning
            epsilon = float(_accountant(sampling_rate, noise_multiplier, rounds).get_epsilon(delta))
    except (ArithmeticError, ValueError):  # extreme inputs (e.g. z = 1e-300): no finite guarantee claimed
        return math.inf
    return epsilon if not math.isnan(epsilon) else math.inf


def rdp_curve(
    sampling_rate: float, noise_multiplier: float, rounds: int
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The composed Renyi-DP guarantee: (orders, RDP at each order) of ``rounds`` rounds."""
    _check(sampling_rate, noise_multiplier, rounds)
    accountant = _accountant(sampling_rate, noise_multiplier, rounds)
    return tuple(float(a) for a in accountant.orders), tuple(float(r) for r in accountant.rdp)


def rounds_within_budget(
    sampling_rate: float, noise_multiplier: float, delta: float, epsilon_budget: float, limit: int
) -> int:
    """The most rounds (at most ``limit``) whose epsilon stays within ``epsilon_budget``.

    Epsilon grows with the number of rounds, so a binary search over [0, limit]."""
    if not epsilon_budget > 0:
        raise ValueError(f"epsilon_budget must be > 0, got {epsilon_budget}")
    low, high = 0, limit  # epsilon_spent(low) <= budget always (0 rounds spend 0)
    while low < high:
        mid = (low + high + 1) // 2
        if epsilon_spent(sampling_rate, noise_multiplier, mid, delta) <= epsilon_budget:
            low = mid
        else:
            high = mid - 1
    return low

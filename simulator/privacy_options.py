"""The simulator's privacy options: differential privacy (the task's ``policy.dp``) and secure
aggregation (``policy.secure_aggregation``); docs/privacy.md says what each protects."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

__all__ = ["add_privacy_arguments", "privacy_options"]

_Parse = Callable[[str], Any]


def add_privacy_arguments(
    parser: argparse.ArgumentParser, positive_int: _Parse, positive_float: _Parse, non_negative_float: _Parse
) -> None:
    """Add the DP and secure-aggregation option groups (the value parsers are the CLI's)."""
    from .config import SECAGG_CLIP_NORM, SECAGG_STAGE_TIMEOUT_S

    d = parser.add_argument_group("differential privacy (the task's policy.dp: DP-FedAvg, docs/privacy.md)")
    d.add_argument(
        "--dp-clip-norm",
        type=positive_float,
        default=None,
        metavar="C",
        help="turn DP on: every update is clipped to L2 norm C, the server adds Gaussian noise to the sum",
    )
    d.add_argument(
        "--dp-noise-multiplier",
        type=non_negative_float,
        default=None,
        metavar="Z",
        help="noise standard deviation Z x C on the sum (1.0; 0: clipping only, no finite epsilon)",
    )
    d.add_argument(
        "--dp-population",
        type=positive_int,
        default=None,
        help="devices the accountant assumes (sampling rate target / population; default --devices)",
    )
    d.add_argument(
        "--dp-delta", type=positive_float, default=None, help="the delta of (epsilon, delta) (1e-5)"
    )
    d.add_argument(
        "--dp-epsilon-budget",
        type=positive_float,
        default=None,
        metavar="EPS",
        help="stop the task before a round would take epsilon above EPS",
    )

    a = parser.add_argument_group(
        "secure aggregation (the task's policy.secure_aggregation, SecAgg+: docs/privacy.md)"
    )
    a.add_argument(
        "--secure-aggregation",
        action="store_true",
        help="the server learns only each round's masked sum: devices clip, quantize and mask their "
        "update in four stages (keys, shares, masked update, reveal); every device of a round runs at "
        "once (--workers defaults to --devices)",
    )
    a.add_argument(
        "--secagg-clip-norm",
        type=positive_float,
        default=None,
        metavar="C",
        help=f"L2 norm each device clips its delta to ({SECAGG_CLIP_NORM:g}; the server cannot check it)",
    )
    a.add_argument(
        "--secagg-stage-timeout",
        type=positive_float,
        default=None,
        metavar="SECONDS",
        help="longest wait of each stage after the keys, e.g. for a device that vanished "
        f"({SECAGG_STAGE_TIMEOUT_S:g})",
    )


def privacy_options(args: argparse.Namespace) -> dict[str, Any]:
    """The SimulationConfig fields of the privacy options."""
    return {
        "dp_clip_norm": args.dp_clip_norm,
        "dp_noise_multiplier": args.dp_noise_multiplier,
        "dp_population": args.dp_population,
        "dp_delta": args.dp_delta,
        "dp_epsilon_budget": args.dp_epsilon_budget,
        "secure_aggregation": args.secure_aggregation,
        "secagg_clip_norm": args.secagg_clip_norm,
        "secagg_stage_timeout_s": args.secagg_stage_timeout,
    }

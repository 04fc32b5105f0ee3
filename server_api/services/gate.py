"""The release gate (``policy.gate``): a new version is served only if its evaluation metric is at most
``max_drop`` below the served version's; otherwise it is recorded with its metrics and held back."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from server_api.services import evaluation
from server_api.services.context import ServiceContext, log

MAX_REASON = 256


@dataclass(frozen=True)
class GateDecision:
    served: bool
    reason: str | None = None  # why it was held back
    report: dict[str, Any] | None = None  # the candidate's evaluation report (stored with the version)
    details: dict[str, Any] = field(default_factory=dict)  # stored as the version's metrics["gate"]


def decide(
    ctx: ServiceContext,
    gate: Mapping[str, Any],
    eval_set: str,
    served_version: int,
    architecture: str,
    embedding_dim: int | None,
    weights: Mapping[str, np.ndarray],
) -> GateDecision:
    """Evaluate the candidate ``weights`` and compare them with ``served_version`` on ``eval_set``.

    Fails closed: a candidate (or a served version) that cannot be evaluated is held back.
    """
    metric, max_drop = str(gate["metric"]), float(gate["max_drop"])
    details: dict[str, Any] = {"metric": metric, "max_drop": max_drop, "served_version": served_version}
    try:
        reference = float(evaluation.report_of(ctx, served_version, eval_set)[metric])
    except Exception as exc:  # any failure keeps the served version
        log.exception("release gate: cannot evaluate served version %s", served_version)
        reason = f"cannot evaluate the served version {served_version}: {exc}"
        return GateDecision(False, reason[:MAX_REASON], None, {**details, "passed": False})
    details["reference"] = reference
    try:
        report = evaluation.evaluate_weights(ctx, eval_set, architecture, embedding_dim, weights)
        value = float(report[metric])
    except Exception as exc:  # a model that cannot be evaluated is not released
        log.warning("release gate: candidate evaluation failed: %s", exc)
        reason = f"evaluation failed: {exc}"
        return GateDecision(False, reason[:MAX_REASON], None, {**details, "passed": False})
    drop = reference - value
    passed = passes(value, reference, max_drop)
    details.update(value=value, drop=drop, passed=passed)
    if passed:
        return GateDecision(True, None, report, details)
    reason = (
        f"{metric} {value:.4f} is {drop:.4f} below the served version {served_version}'s {reference:.4f} "
        f"(max_drop {max_drop:g})"
    )
    return GateDecision(False, reason[:MAX_REASON], report, details)


def passes(value: float, reference: float, max_drop: float) -> bool:
    """The metric may fall at most ``max_drop`` below the reference (a NaN never passes)."""
    return bool(reference - value <= max_drop)

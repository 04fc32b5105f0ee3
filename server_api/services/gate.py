"""The release gate (``policy.gate``): a new version is served only if its evaluation metric is at most
``max_drop`` below the served version's and below the task's first version's; otherwise it is recorded
with its metrics and held back.

The first version is a fixed anchor: compared with the served version alone, drops just under
``max_drop`` could add up round after round (each one passing) into an arbitrarily worse model."""

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
    first_version: int | None = None,
) -> GateDecision:
    """Evaluate the candidate ``weights`` and compare them with ``served_version`` and ``first_version``
    (the task's starting model; ``None``: the served one) on ``eval_set``.

    Fails closed: a candidate (or a reference version) that cannot be evaluated is held back.
    """
    metric, max_drop = str(gate["metric"]), float(gate["max_drop"])
    first = served_version if first_version is None else first_version
    details: dict[str, Any] = {
        "metric": metric,
        "max_drop": max_drop,
        "served_version": served_version,
        "first_version": first,
    }
    references: dict[int, float] = {}
    for version in dict.fromkeys((served_version, first)):
        try:
            references[version] = float(evaluation.report_of(ctx, version, eval_set)[metric])
        except Exception as exc:  # any failure keeps the served version
            log.exception("release gate: cannot evaluate version %s", version)
            reason = f"cannot evaluate the reference version {version}: {exc}"
            return GateDecision(False, reason[:MAX_REASON], None, {**details, "passed": False})
    # the stricter of the two references decides
    ref_version = max(references, key=lambda v: references[v])
    reference = references[ref_version]
    details.update(reference=reference, first_reference=references[first])
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
    which = "the served version" if ref_version == served_version else "the task's first version"
    reason = (
        f"{metric} {value:.4f} is {drop:.4f} below {which} {ref_version}'s {reference:.4f} "
        f"(max_drop {max_drop:g})"
    )
    return GateDecision(False, reason[:MAX_REASON], report, details)


def passes(value: float, reference: float, max_drop: float) -> bool:
    """The metric may fall at most ``max_drop`` below the reference (a NaN never passes)."""
    return bool(reference - value <= max_drop)

"""What the console's pages show, computed from the services' schemas (pure functions, no I/O)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from server_api.console.charts import Chart, Series, line_chart
from server_api.console.refusals import Reasons
from server_api.schemas import ModelVersionOut, RoundOut

#: the evaluation report's keys drawn per model version (facefl.metrics.verification_report), with labels
EVAL_CURVES = (
    ("accuracy", "generic accuracy"),
    ("tar@far=1e-3", "TAR@FAR=1e-3"),
    ("tar@far=1e-2", "TAR@FAR=1e-2"),
)
#: the devices' mean training loss of a round (the server prefixes every reported metric with train_)
TRAIN_LOSS = "train_train_loss"


@dataclass(frozen=True)
class RoundRow:
    id: int
    number: int
    status: str
    note: str | None  # why it was abandoned
    base_version: int
    result_version: int | None
    served_version: int | None
    selected: int
    max_assignments: int
    reports: int
    target_reports: int
    min_reports: int
    dropped: int | None  # selected but never reported; None while the round is open
    refused: Reasons
    wall_s: float | None  # opened to closed (so far, while open)
    aggregation_s: float | None  # the mean and server step, plus the release gate's evaluation
    open: bool

    @property
    def held_back(self) -> bool:
        return self.result_version is not None and self.served_version != self.result_version


def round_row(r: RoundOut, refused: Reasons, now: datetime) -> RoundRow:
    is_open = r.status == "open"
    end = r.closed_at if r.closed_at is not None else (now if r.status in ("open", "aggregating") else None)
    aggregation = _number(r.metrics.get("aggregation_s"))
    gate = _number(r.metrics.get("gate_s"))
    note = r.metrics.get("abandoned_reason")
    return RoundRow(
        id=r.id,
        number=r.number,
        status=r.status,
        note=str(note) if note is not None else None,
        base_version=r.base_version,
        result_version=r.result_version,
        served_version=r.served_version,
        selected=r.assigned,
        max_assignments=r.max_assignments,
        reports=r.reported,
        target_reports=r.target_reports,
        min_reports=r.min_reports,
        dropped=None if is_open else max(r.assigned - r.reported, 0),
        refused=refused,
        wall_s=(end - r.opened_at).total_seconds() if end is not None else None,
        aggregation_s=None if aggregation is None else aggregation + (gate or 0.0),
        open=is_open,
    )


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def eval_report(version: ModelVersionOut) -> Mapping[str, Any]:
    return _report(version.metrics)


def _report(metrics: Mapping[str, Any]) -> Mapping[str, Any]:
    report = metrics.get("eval")
    return report if isinstance(report, dict) else {}


def evaluated(metrics: Sequence[tuple[int, Mapping[str, Any]]]) -> int:
    return sum(1 for _, m in metrics if _report(m))


def eval_chart(metrics: Sequence[tuple[int, Mapping[str, Any]]]) -> Chart | None:
    """Generic accuracy and TAR@FAR of every evaluated model version ((version, metrics) pairs), on [0, 1]."""
    reports = [(version, _report(m)) for version, m in metrics]
    series = []
    for key, label in EVAL_CURVES:
        points = []
        for version, report in reports:
            value = _number(report.get(key))
            if value is not None:
                points.append((version, value))
        series.append(Series(label, points))
    return line_chart(series, (0.0, 1.0))


def train_chart(rounds: Sequence[RoundOut]) -> Chart | None:
    """The devices' mean training loss per aggregated round (x: the round number)."""
    points = []
    for r in rounds:
        value = _number(r.metrics.get(TRAIN_LOSS))
        if value is not None:
            points.append((r.number, value))
    return line_chart([Series("training loss (devices' weighted mean)", points)])


def policy_summary(policy: Mapping[str, Any]) -> str:
    parts = [
        f"target {policy.get('target_reports')} reports (min {policy.get('min_reports')})",
        f"over-selection x{policy.get('over_selection')}",
        f"timeout {duration(_number(policy.get('round_timeout_s')))}",
    ]
    gate = policy.get("gate")
    if isinstance(gate, dict):
        parts.append(f"gate: {gate.get('metric')} may drop <= {gate.get('max_drop')}")
    robust = policy.get("robust")
    if isinstance(robust, dict):
        parts.append("robust aggregation")
    return "; ".join(parts)


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def utc(moment: datetime | None) -> str:
    return "-" if moment is None else moment.strftime("%Y-%m-%d %H:%M:%S UTC")


def ago(moment: datetime | None, now: datetime) -> str:
    if moment is None:
        return "never"
    seconds = (now - moment).total_seconds()
    return "just now" if seconds < 1 else f"{duration(seconds)} ago"


def size(num_bytes: int | None) -> str:
    if num_bytes is None:
        return "-"
    value = float(num_bytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def reasons(counts: Reasons) -> str:
    return ", ".join(f"{reason} x{n}" for reason, n in counts.items()) or "-"

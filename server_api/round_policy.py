"""The round state machine as pure functions of a round's counters and the clock (no I/O)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum


class RoundAction(StrEnum):
    KEEP_OPEN = "keep_open"
    AGGREGATE = "aggregate"
    ABANDON = "abandon"


@dataclass(frozen=True)
class RoundCounters:
    reported: int
    target_reports: int
    min_reports: int
    deadline: datetime


def decide(counters: RoundCounters, now: datetime) -> RoundAction:
    """Close at the target count or at the deadline; aggregate with enough reports, else abandon."""
    if counters.reported >= counters.target_reports:
        return RoundAction.AGGREGATE
    if now >= counters.deadline:
        return RoundAction.AGGREGATE if counters.reported >= counters.min_reports else RoundAction.ABANDON
    return RoundAction.KEEP_OPEN


def max_assignments(target_reports: int, over_selection: float) -> int:
    """Over-selection: hand out more assignments than needed so that dropouts do not stall the round."""
    return max(target_reports, math.ceil(target_reports * over_selection - 1e-9))


def retry_after(seconds: float, lo: float, hi: float) -> float:
    """Clamp a suggested wait into the server's pace-steering bounds."""
    return float(min(max(seconds, lo), hi))

from datetime import UTC, datetime, timedelta

from server_api.round_policy import RoundAction, RoundCounters, decide, max_assignments, retry_after

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def counters(reported: int, deadline_in_s: float, target: int = 10, minimum: int = 5) -> RoundCounters:
    return RoundCounters(reported, target, minimum, NOW + timedelta(seconds=deadline_in_s))


def test_open_until_target_or_deadline() -> None:
    assert decide(counters(3, 60), NOW) is RoundAction.KEEP_OPEN
    assert decide(counters(9, 60), NOW) is RoundAction.KEEP_OPEN


def test_target_reached_aggregates_even_before_deadline() -> None:
    assert decide(counters(10, 60), NOW) is RoundAction.AGGREGATE
    assert decide(counters(12, 60), NOW) is RoundAction.AGGREGATE


def test_deadline_aggregates_with_minimum_else_abandons() -> None:
    assert decide(counters(5, 0), NOW) is RoundAction.AGGREGATE
    assert decide(counters(4, -1), NOW) is RoundAction.ABANDON
    assert decide(counters(0, -1), NOW) is RoundAction.ABANDON


def test_over_selection() -> None:
    assert max_assignments(10, 1.3) == 13
    assert max_assignments(10, 1.0) == 10
    assert max_assignments(3, 1.3) == 4  # ceil(3.9)
    assert max_assignments(20, 1.05) == 21


def test_retry_after_clamps() -> None:
    assert retry_after(0.01, 1.0, 60.0) == 1.0
    assert retry_after(500.0, 1.0, 60.0) == 60.0
    assert retry_after(5.0, 1.0, 60.0) == 5.0

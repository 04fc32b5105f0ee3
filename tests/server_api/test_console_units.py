"""The console's pure parts on tiny inputs with hand-computed answers: chart geometry, the view rows,
the signed session and CSRF token, the refusal tally and the login throttle."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from server_api.console import session, views
from server_api.console.auth import LOGIN_BURST, LoginThrottle, safe_next
from server_api.console.charts import Series, line_chart, nice_range, thin
from server_api.console.pages import parse_id
from server_api.console.refusals import RefusalTally
from server_api.schemas import RoundOut

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def test_thin_keeps_every_kth_point_and_the_last() -> None:
    points = [(i, float(i)) for i in range(10)]
    assert thin(points, 10) == points
    # 9 gaps over 3 kept intervals: step ceil(9/3) = 3 -> 0, 3, 6, 9
    assert [k for k, _ in thin(points, 4)] == [0, 3, 6, 9]
    # step ceil(9/2) = 5 -> 0, 5, then the last point 9
    assert [k for k, _ in thin(points, 3)] == [0, 5, 9]
    with pytest.raises(ValueError):
        thin(points, 1)


def test_line_chart_geometry() -> None:
    # plot area: x 44..628, y 10..194 (640 x 220 minus the margins)
    chart = line_chart([Series("a", [(2, 0.0), (5, 1.0)]), Series("b", [(3, 0.5)])], (0.0, 1.0))
    assert chart is not None and chart.plot == (44, 10, 628, 194)
    a, b = chart.lines
    # keys 2, 3, 5 are ranks 0, 1, 2: x = 44, 336, 628
    assert a.polyline == "44.0,194.0 628.0,10.0"
    assert b.polyline == "336.0,102.0"
    assert [(m.key, m.x, m.y) for m in a.markers] == [(2, 44.0, 194.0), (5, 628.0, 10.0)]
    assert a.last == 1.0 and b.last == 0.5
    assert [t.label for t in chart.x_ticks] == ["2", "3", "5"]
    assert [t.label for t in chart.y_ticks] == ["0", "0.25", "0.5", "0.75", "1"]
    assert [t.position for t in chart.y_ticks] == [194.0, 148.0, 102.0, 56.0, 10.0]


def test_line_chart_without_finite_points_is_none_and_values_are_clamped() -> None:
    assert line_chart([Series("a", [])]) is None
    assert line_chart([Series("a", [(1, math.nan), (2, math.inf)])]) is None
    chart = line_chart([Series("a", [(1, 2.0), (2, -1.0)])], (0.0, 1.0))
    assert chart is not None and chart.lines[0].polyline == "44.0,10.0 628.0,194.0"
    single = line_chart([Series("a", [(7, 3.0)])])
    assert single is not None and single.lines[0].polyline == "336.0,102.0"  # centred, flat band


def test_nice_range() -> None:
    assert nice_range([1.0, 3.0]) == (0.9, 3.1)
    assert nice_range([2.0, 2.0]) == (1.5, 2.5)


def test_many_points_are_thinned_and_lose_their_markers() -> None:
    chart = line_chart([Series("a", [(i, i / 1000) for i in range(1, 1001)])], (0.0, 1.0))
    assert chart is not None
    assert len(chart.lines[0].polyline.split()) <= 401 and not chart.lines[0].markers


def _round(**overrides: Any) -> RoundOut:
    values: dict[str, Any] = dict(
        id=7,
        task_id=1,
        number=3,
        status="aggregated",
        base_version=4,
        result_version=5,
        target_reports=10,
        min_reports=5,
        max_assignments=13,
        assigned=12,
        reported=9,
        opened_at=T0,
        deadline=T0 + timedelta(hours=1),
        closed_at=T0 + timedelta(seconds=75),
        metrics={"aggregation_s": 0.5, "gate_s": 1.25},
        served_version=4,
    )
    values.update(overrides)
    return RoundOut(**values)


def test_round_row() -> None:
    row = views.round_row(_round(), {"410 round_closed": 2}, T0 + timedelta(hours=2))
    assert row.dropped == 3 and row.wall_s == 75.0 and row.aggregation_s == 1.75
    assert row.held_back and row.refused == {"410 round_closed": 2} and not row.open
    live = views.round_row(
        _round(status="open", closed_at=None, metrics={}, result_version=None, served_version=None),
        {},
        T0 + timedelta(seconds=30),
    )
    assert live.dropped is None and live.wall_s == 30.0 and live.aggregation_s is None and live.open
    assert not live.held_back
    abandoned = views.round_row(
        _round(status="abandoned", metrics={"abandoned_reason": "by hand", "aggregation_s": "junk"}), {}, T0
    )
    assert abandoned.note == "by hand" and abandoned.aggregation_s is None


def test_formatting() -> None:
    assert views.duration(None) == "-"
    assert views.duration(0.25) == "250 ms"
    assert views.duration(12.34) == "12.3 s"
    assert views.duration(125) == "2 min 05 s"
    assert views.duration(2 * 3600 + 3 * 60) == "2 h 03 min"
    assert views.size(None) == "-" and views.size(512) == "512 B" and views.size(1536) == "1.5 KiB"
    assert views.size(3 * 1024**3) == "3.0 GiB"
    assert views.reasons({}) == "-" and views.reasons({"403 forbidden": 2, "410 round_closed": 1}) == (
        "403 forbidden x2, 410 round_closed x1"
    )
    assert views.ago(None, T0) == "never" and views.ago(T0 - timedelta(seconds=90), T0) == "1 min 30 s ago"


def test_session_round_trip_tampering_expiry_and_another_admin_token() -> None:
    s = session.new_session(now=1000.0)
    value = session.encode(s, "admin-token-1")
    assert session.decode(value, "admin-token-1", now=1001.0) == s
    assert session.decode(value, "admin-token-2", now=1001.0) is None  # a new admin token ends sessions
    assert session.decode(value, "admin-token-1", now=1000.0 + session.LIFETIME_S) is None  # expired
    expires, nonce, sig = value.split(".")
    forged = f"{int(expires) + 3600}.{nonce}.{sig}"  # a longer life is not signed
    assert session.decode(forged, "admin-token-1", now=1001.0) is None
    for junk in (None, "", "a.b.c", value + "x", value.replace(".", "-"), "1." * 3000):
        assert session.decode(junk, "admin-token-1", now=1001.0) is None


def test_csrf_token_belongs_to_its_session() -> None:
    a, b = session.new_session(), session.new_session()
    token = session.csrf_token(a, "admin-token-1")
    assert session.csrf_ok(a, "admin-token-1", token)
    assert not session.csrf_ok(b, "admin-token-1", token)
    assert not session.csrf_ok(a, "admin-token-2", token)
    for wrong in (None, "", token[:-1], token + "x", "é" * 43):
        assert not session.csrf_ok(a, "admin-token-1", wrong)


def test_refusal_tally_is_bounded() -> None:
    tally = RefusalTally(max_keys=2)
    tally.record(410, "round_closed", 1, "d1")
    tally.record(410, "round_closed", 1, "d1")
    tally.record(403, "forbidden", 2, None)
    tally.record(404, "not_found", 3, None)  # evicts round 1, the least recently refused
    assert tally.of_rounds([1, 2, 3]) == {2: {"403 forbidden": 1}, 3: {"404 not_found": 1}}
    assert tally.of_devices(["d1", "d2"]) == {"d1": {"410 round_closed": 2}}
    assert tally.total() == {"410 round_closed": 2, "403 forbidden": 1, "404 not_found": 1}


def test_login_throttle_counts_failures_per_address() -> None:
    now = [0.0]
    throttle = LoginThrottle(clock=lambda: now[0])
    for _ in range(int(LOGIN_BURST)):
        assert throttle.wait("a") == 0.0
        throttle.failed("a")
    assert throttle.wait("a") == 0.0
    throttle.failed("a")  # beyond the burst: blocked for 1 / 0.5 = 2 s
    assert throttle.wait("a") == pytest.approx(2.0)
    assert throttle.wait("b") == 0.0  # other addresses are not affected
    now[0] = 2.5
    assert throttle.wait("a") == 0.0


@pytest.mark.parametrize(
    ("value", "expected"),
    [("/console/tasks/3?before=7", "/console/tasks/3?before=7"), ("/console", "/console"), (None, "/console"),
     ("https://evil.example", "/console"), ("//evil.example/console", "/console"), ("/v1/tasks", "/console"),
     ("/console/../v1", "/console"), ("/console//evil", "/console"), ("/consolex", "/console")],
)  # fmt: skip
def test_safe_next(value: str | None, expected: str) -> None:
    assert safe_next(value) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [("1", 1), ("2147483647", 2147483647), ("2147483648", None), ("0", None), ("-1", None), ("01", 1),
     ("1e3", None), (" 1", None), ("\uff11", None), ("", None), (None, None), ("9" * 11, None)],
)  # fmt: skip
def test_parse_id(text: str | None, expected: int | None) -> None:
    assert parse_id(text) == expected

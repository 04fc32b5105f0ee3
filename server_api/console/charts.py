"""Line charts as inline SVG geometry (pure functions; the template draws them, no JavaScript)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

WIDTH, HEIGHT = 640, 220
LEFT, RIGHT, TOP, BOTTOM = 44, 12, 10, 26
#: above this many points a series is thinned (every k-th point, the last one kept): the SVG stays small
MAX_POINTS = 400
#: markers (with the version in a tooltip) only when the chart has at most this many x positions
MAX_MARKERS = 60


@dataclass(frozen=True)
class Series:
    label: str
    points: Sequence[tuple[int, float]]  # (x key, e.g. a model version; value), in x order


@dataclass(frozen=True)
class Marker:
    x: float
    y: float
    key: int
    value: float


@dataclass(frozen=True)
class Line:
    label: str
    index: int  # colour slot
    polyline: str  # "x,y x,y ..." in SVG user units
    markers: list[Marker]
    last: float | None


@dataclass(frozen=True)
class Tick:
    position: float
    label: str


@dataclass(frozen=True)
class Chart:
    width: int
    height: int
    lines: list[Line]
    x_ticks: list[Tick]
    y_ticks: list[Tick]
    plot: tuple[float, float, float, float]  # left, top, right, bottom


def thin(points: Sequence[tuple[int, float]], max_points: int = MAX_POINTS) -> list[tuple[int, float]]:
    """Every k-th point so that at most ``max_points`` remain, always keeping the last one."""
    if max_points < 2:
        raise ValueError("max_points must be >= 2")
    if len(points) <= max_points:
        return list(points)
    step = math.ceil((len(points) - 1) / (max_points - 1))
    kept = list(points[::step])
    if kept[-1] != points[-1]:
        kept.append(points[-1])
    return kept


def nice_range(values: Sequence[float]) -> tuple[float, float]:
    """A y range covering ``values`` (a flat series gets a unit-wide band around its value)."""
    low, high = min(values), max(values)
    if high - low < 1e-12:
        return low - 0.5, high + 0.5
    pad = (high - low) * 0.05
    return low - pad, high + pad


def line_chart(
    series: Sequence[Series],
    y_range: tuple[float, float] | None = None,
    *,
    width: int = WIDTH,
    height: int = HEIGHT,
) -> Chart | None:
    """Lay the series out on shared axes: x is the rank of each key among all keys (model versions of a
    task are not consecutive numbers), y is linear in ``y_range`` (default: the data's). None when no
    series has a finite point."""
    clean = [Series(s.label, [(k, v) for k, v in s.points if math.isfinite(v)]) for s in series if s.points]
    clean = [s for s in clean if s.points]
    if not clean:
        return None
    keys = sorted({k for s in clean for k, _ in s.points})
    rank = {k: i for i, k in enumerate(keys)}
    low, high = y_range if y_range is not None else nice_range([v for s in clean for _, v in s.points])
    left, top, right, bottom = LEFT, TOP, width - RIGHT, height - BOTTOM
    span = max(len(keys) - 1, 1)

    def x_of(key: int) -> float:
        return left + (right - left) * (rank[key] / span if len(keys) > 1 else 0.5)

    def y_of(value: float) -> float:
        clamped = min(max(value, low), high)
        return bottom - (bottom - top) * (clamped - low) / (high - low)

    lines = []
    for index, s in enumerate(clean):
        shown = thin(s.points)
        polyline = " ".join(f"{x_of(k):.1f},{y_of(v):.1f}" for k, v in shown)
        markers = (
            [Marker(round(x_of(k), 1), round(y_of(v), 1), k, v) for k, v in s.points]
            if len(keys) <= MAX_MARKERS
            else []
        )
        lines.append(Line(s.label, index, polyline, markers, s.points[-1][1]))
    x_ticks = [Tick(round(x_of(k), 1), str(k)) for k in _spread(keys, 6)]
    y_ticks = [Tick(round(y_of(v), 1), f"{v:.3g}") for v in _linspace(low, high, 5)]
    return Chart(width, height, lines, x_ticks, y_ticks, (left, top, right, bottom))


def _spread(keys: Sequence[int], count: int) -> list[int]:
    """At most ``count`` keys, evenly spaced, first and last included."""
    if len(keys) <= count:
        return list(keys)
    return [keys[round(i * (len(keys) - 1) / (count - 1))] for i in range(count)]


def _linspace(low: float, high: float, count: int) -> list[float]:
    return [low + (high - low) * i / (count - 1) for i in range(count)]

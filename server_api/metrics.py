"""Prometheus metrics of the server (text format at GET /metrics).

With several uvicorn workers, `facefl serve` sets PROMETHEUS_MULTIPROC_DIR before the workers start, and
/metrics aggregates every worker's values (prometheus_client's multiprocess mode); otherwise (one process,
or uvicorn started by hand without that variable) the values are those of the worker that answered.
"""

from __future__ import annotations

import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    multiprocess,
)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

ROUNDS_OPENED = Counter("facefl_rounds_opened", "Rounds opened")
ROUNDS_CLOSED = Counter("facefl_rounds_closed", "Rounds closed, by outcome", ["outcome"])
REPORTS_ACCEPTED = Counter("facefl_reports_accepted", "Updates accepted (answered 202)")
UPLOAD_BYTES = Counter("facefl_upload_bytes", "Bytes of accepted updates")
REFUSALS = Counter("facefl_refusals", "Refused requests, by status and reason code", ["status", "reason"])
AGGREGATION_SECONDS = Histogram(
    "facefl_aggregation_seconds",
    "Time to aggregate a round (reading the updates to storing the new version)",
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
)


def render() -> tuple[bytes, str]:
    """The exposition text and its content type (all workers' values in multiprocess mode)."""
    if os.environ.get(MULTIPROC_ENV):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST

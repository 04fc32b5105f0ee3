"""Logging: plain text or one JSON object per line (FACEFL_LOG_FORMAT), with the event's fields.

Services log with ``extra={"round_id": ..., "device_id": ...}``; the JSON formatter writes every such
field beside ``ts``, ``level``, ``logger`` and ``msg``.
"""

from __future__ import annotations

import json
import logging
import math
from datetime import UTC, datetime
from typing import Any

# attributes every LogRecord has: everything else on a record came from `extra=`
_STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}
_HANDLER_FLAG = "_facefl_handler"


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return str(value)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = _jsonable(value)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, separators=(",", ":"), allow_nan=False)


class PlainFormatter(logging.Formatter):
    """``time level logger message key=value ...``."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        fields = [
            f"{k}={v}" for k, v in record.__dict__.items() if k not in _STANDARD and not k.startswith("_")
        ]
        return f"{text} {' '.join(fields)}" if fields else text


def configure(fmt: str = "plain", level: str = "INFO") -> None:
    """One stderr handler on the ``facefl`` loggers (idempotent); uvicorn's loggers share the format.

    Records still propagate to the root logger, which has no handler under uvicorn (no duplicates) and
    pytest's capture handler in tests.
    """
    formatter: logging.Formatter = JsonFormatter() if fmt == "json" else PlainFormatter()
    logger = logging.getLogger("facefl")
    for h in [h for h in logger.handlers if getattr(h, _HANDLER_FLAG, False)]:
        logger.removeHandler(h)
    handler = logging.StreamHandler()
    setattr(handler, _HANDLER_FLAG, True)
    handler.setFormatter(formatter)
    logger.addHandler(handler)
    logger.setLevel(level)
    if fmt == "json":
        for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
            for h in logging.getLogger(name).handlers:
                h.setFormatter(formatter)

"""What the server really answers, for the OpenAPI document: shared ``responses=`` maps.

Every error body is ``ErrorOut`` (``{"detail": str, "code": str}``), 422 included (FastAPI's default
HTTPValidationError array is never sent: see app.py's handler), so every operation declares its 422 here
and FastAPI does not add its own.
"""

from __future__ import annotations

from typing import Any

from server_api.schemas import ErrorOut

Responses = dict[int | str, dict[str, Any]]

_DESCRIPTIONS = {
    400: "malformed request body",
    401: "missing or invalid bearer token (or enrollment secret)",
    403: "not allowed for this principal",
    404: "not found",
    408: "the request body stalled or missed its deadline (FACEFL_BODY_IDLE_TIMEOUT_S, _DEADLINE_S)",
    409: "conflict",
    410: "the round is closed",
    413: "the body exceeds its limit (FACEFL_MAX_JSON_BYTES, FACEFL_MAX_UPLOAD_BYTES)",
    422: "invalid parameters or body",
    429: "rate limited: retry after Retry-After seconds",
    503: "too many uploads in flight: retry after Retry-After seconds",
}
_RETRY_AFTER = {"Retry-After": {"description": "seconds to wait", "schema": {"type": "string"}}}


def errors(*codes: int) -> Responses:
    """ErrorOut responses for these status codes (with Retry-After where the server sends it)."""
    out: Responses = {}
    for code in codes:
        entry: dict[str, Any] = {"model": ErrorOut, "description": _DESCRIPTIONS[code]}
        if code in (429, 503):
            entry["headers"] = _RETRY_AFTER
        out[code] = entry
    return out


#: every operation: a body (even on a GET) is bounded in size and time; parameters are validated
COMMON = errors(408, 413, 422)
#: endpoints a device token (or the admin token) opens; devices are rate limited
AUTHENTICATED = errors(401, 429)
ADMIN = errors(401, 403)
#: endpoints that take a JSON body
JSON_BODY = errors(400)
#: the streamed uploads: at most FACEFL_MAX_CONCURRENT_UPLOADS in flight per worker
UPLOAD = errors(503)

"""API errors: a status code, a machine-readable code and a human message."""

from __future__ import annotations


class ApiError(Exception):
    def __init__(self, status_code: int, code: str, detail: str, headers: dict[str, str] | None = None):
        super().__init__(detail)
        self.status_code = status_code
        self.code = code
        self.detail = detail
        self.headers = headers


def unauthorized(detail: str = "missing or invalid bearer token") -> ApiError:
    return ApiError(401, "unauthorized", detail, {"WWW-Authenticate": "Bearer"})


def forbidden(detail: str) -> ApiError:
    return ApiError(403, "forbidden", detail)


def not_found(what: str) -> ApiError:
    return ApiError(404, "not_found", f"{what} not found")


def conflict(detail: str, code: str = "conflict") -> ApiError:
    return ApiError(409, code, detail)


def gone(detail: str) -> ApiError:
    return ApiError(410, "round_closed", detail)


def too_large(limit: int) -> ApiError:
    return ApiError(413, "too_large", f"body exceeds the limit of {limit} bytes")


def invalid(code: str, detail: str) -> ApiError:
    return ApiError(422, code, detail)


def rate_limited(retry_after: str, detail: str = "too many requests from this device") -> ApiError:
    return ApiError(429, "rate_limited", detail, {"Retry-After": retry_after})

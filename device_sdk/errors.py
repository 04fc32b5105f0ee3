"""Typed errors raised by the device SDK.

Every error the SDK raises derives from :class:`FaceflError`, so an app can catch that one class at the
edge of its federated-learning job. The hierarchy::

    FaceflError
    ├── TransportError        the request did not get a response (connect/read timeout, reset, DNS, ...);
    │                         idempotent calls are retried before this is raised
    ├── ProtocolError         a response the SDK cannot interpret (bad JSON, missing field, unknown status)
    ├── AssignmentTimeout     wait_for_assignment ran out of time before the server gave an assignment
    ├── WaitTimeout           an AdminClient.wait_for_* ran out of time (round not closed, no evaluation)
    ├── TaskCompleted         the task the device asked for has finished: there is nothing left to train
    ├── SecureAggregationError  secure aggregation could not complete on this device (round abandoned,
    │                         a stage that did not come, or server data the protocol refuses)
    ├── RecognizerError       on-device recognition: bad image or model, empty image list, ...
    │   ├── UnknownPerson     the person is not enrolled in the gallery
    │   ├── NoFaceFound       face detection (align=True) found no face in a photo
    │   └── MultipleFaces     face detection (align=True) found several faces in a photo
    └── APIError              the server answered with an error status (carries status, detail and code)
        ├── AuthError         401 / 403: unknown or forged token, or an upload token that is not ours
        ├── NotFound          404: no such round, task or model version
        ├── RateLimited       429: come back after ``retry_after`` seconds
        ├── RoundClosed       410: the round closed (target reached) or its deadline passed
        ├── DuplicateUpload   409: this assignment was already used for an upload
        ├── InvalidRequest    400 / 422 on a non-upload call: the server refused the request body
        │   └── UpdateRejected  413 / 422 on an upload: names, shapes, dtypes, NaN/Inf, norm bound, size
        └── ServerError       5xx: the server failed; idempotent calls are retried before this is raised

A refused request changes no state on the server, so after any :class:`APIError` the device may simply
check in again later.
"""

from __future__ import annotations

__all__ = [
    "APIError",
    "AssignmentTimeout",
    "AuthError",
    "DuplicateUpload",
    "FaceflError",
    "InvalidRequest",
    "MultipleFaces",
    "NoFaceFound",
    "NotFound",
    "ProtocolError",
    "RateLimited",
    "RecognizerError",
    "RoundClosed",
    "SecureAggregationError",
    "ServerError",
    "TaskCompleted",
    "TransportError",
    "UnknownPerson",
    "UpdateRejected",
    "WaitTimeout",
]


class FaceflError(Exception):
    """Base class of every error raised by :mod:`device_sdk`."""


class TransportError(FaceflError):
    """No response was received: connection refused or reset, DNS failure, connect/read/write timeout."""


class ProtocolError(FaceflError):
    """The server's response does not follow the protocol (unexpected status, body or missing field)."""

    def __init__(self, message: str, *, status_code: int | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code


class AssignmentTimeout(FaceflError):
    """``wait_for_assignment`` gave up: no assignment arrived within its time budget."""

    def __init__(self, message: str, *, last_reason: str | None = None) -> None:
        super().__init__(message)
        self.last_reason = last_reason


class WaitTimeout(FaceflError):
    """An :class:`~device_sdk.AdminClient` wait gave up: the round did not close, or the model version's
    evaluation did not appear, within its time budget."""


class TaskCompleted(FaceflError):
    """The task has run all its rounds; the server will not hand out further assignments for it."""


class SecureAggregationError(FaceflError):
    """Secure aggregation stopped on this device: the round was abandoned or closed without it, a stage
    did not begin in time, or the server sent something the protocol refuses (nothing more was revealed)."""


class APIError(FaceflError):
    """The server answered with an error status.

    Attributes:
        status_code: the HTTP status.
        detail: the server's human-readable message (``detail`` of the JSON error body).
        code: the server's machine-readable code (``code`` of the JSON error body), if any.
        method, url: the request that failed.
    """

    def __init__(
        self,
        detail: str,
        *,
        status_code: int,
        code: str | None = None,
        method: str = "",
        url: str = "",
    ) -> None:
        super().__init__(f"{status_code} {method} {url}: {detail}" + (f" [{code}]" if code else ""))
        self.status_code = status_code
        self.detail = detail
        self.code = code
        self.method = method
        self.url = url


class AuthError(APIError):
    """401 (unknown, forged or missing token) or 403 (token valid but not allowed to do this)."""


class NotFound(APIError):
    """404: the round, task or model version does not exist."""


class RateLimited(APIError):
    """429: the server asks the device to come back after ``retry_after`` seconds."""

    def __init__(self, detail: str, *, retry_after: float, **kwargs: object) -> None:
        super().__init__(detail, **kwargs)  # type: ignore[arg-type]
        self.retry_after = retry_after


class RoundClosed(APIError):
    """410: the round is closed (its target was reached or its deadline passed); the update was not stored."""


class DuplicateUpload(APIError):
    """409: an update was already accepted for this assignment; the new one was not stored."""


class InvalidRequest(APIError):
    """400 / 422: the server refused the request (bad body or parameters)."""


class UpdateRejected(InvalidRequest):
    """413 / 422 on an upload: the update was refused and nothing was stored.

    ``detail`` and ``code`` say why (wrong names/shapes/dtypes, NaN/Inf, norm above the task's bound,
    body too large, bad ``num_samples`` or metrics).
    """


class ServerError(APIError):
    """5xx: the server failed to handle the request."""


class RecognizerError(FaceflError):
    """On-device recognition failed: unreadable or malformed image, empty image list, unusable model."""


class UnknownPerson(RecognizerError):
    """The person is not enrolled in the recognizer's gallery."""


class NoFaceFound(RecognizerError):
    """Face detection (``align=True``) found no face in a photo; nothing was guessed."""


class MultipleFaces(RecognizerError):
    """Face detection (``align=True``) found several faces in a photo; which one is meant is not guessed."""

"""The device's side of secure aggregation over HTTP (docs/protocol.md "Secure aggregation").

:func:`upload_secure` replaces the plain upload when the assignment carries ``secure_aggregation``: the
delta is clipped, weighted, noised (distributed DP, when the task asks) and quantized on the device
(``facefl.secagg.fixedpoint``), then the protocol's four stages run through the server, which only ever
sees public keys, encrypted shares, the masked vector and the shares needed to remove the masks. The
protocol's state machine is ``facefl.secagg.client``; this module is its transport.
"""

from __future__ import annotations

import base64
import binascii
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

import numpy as np

from facefl import codec
from facefl.secagg import client as protocol
from facefl.secagg import fixedpoint
from facefl.secagg.roster import Advertisement, Roster

from .errors import APIError, ProtocolError, SecureAggregationError
from .records import Assignment, SecAggInfo, UploadReceipt
from .transport import Connection

__all__ = ["STAGES", "upload_secure"]

STAGES = ("advertise", "share", "upload", "unmask", "done")
# the server's codes for a device the protocol has moved past (docs/protocol.md)
_LEFT_OUT = frozenset({"wrong_stage", "not_in_cohort"})
_IN_PROGRESS = "upload_in_progress"  # a resent masked update while the first is still arriving
_T = TypeVar("_T")
Step = Callable[[str, Callable[[], _T]], _T]


def _plain(step: str, fn: Callable[[], _T]) -> _T:
    return fn()


@dataclass(frozen=True)
class _View:
    stage: str
    round_status: str
    retry_after_s: float
    vector_length: int
    raw: dict[str, Any]


def _b64(text: Any) -> bytes:
    try:
        return base64.b64decode(str(text), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ProtocolError(f"secure aggregation: bad base64 from the server: {exc}") from exc


class _Session:
    """The requests of one device in one round (device token + the assignment's upload token)."""

    def __init__(self, conn: Connection, assignment: Assignment, clock: Callable[[], float]) -> None:
        self._conn = conn
        self._path = f"/v1/rounds/{assignment.round_id}/secagg"
        self._headers = {"X-Upload-Token": assignment.upload_token}
        self._clock = clock

    def view(self) -> _View:
        resp = self._conn.request("GET", self._path, idempotent=True, headers=self._headers)
        data = self._conn.json(resp)
        try:
            return _View(
                stage=str(data["stage"]),
                round_status=str(data["round_status"]),
                retry_after_s=float(data["retry_after_s"]),
                vector_length=int(data["vector_length"]),
                raw=data,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ProtocolError(f"malformed secure-aggregation state: {exc!r}") from exc

    def post(
        self, what: str, *, json_body: Any = None, content: bytes | None = None, patience_s: float = 0.0
    ) -> dict[str, Any]:
        """Sent as an idempotent request: the server answers a resend of what it already recorded for
        this device as it answered the first (docs/protocol.md "Secure aggregation"), so a connection
        reset or a timeout on the answer is retried like a GET instead of dropping the device. A resend
        that finds the first still arriving (409 ``upload_in_progress``) is sent again, with backoff,
        for up to ``patience_s``: once the first is recorded, the resend is answered from it."""
        headers = dict(self._headers)
        if content is not None:
            headers["Content-Type"] = "application/octet-stream"
        give_up, attempt = self._clock() + patience_s, 0
        while True:
            try:
                resp = self._conn.request(
                    "POST",
                    f"{self._path}/{what}",
                    json_body=json_body,
                    content=content,
                    headers=headers,
                    idempotent=True,
                    upload=what == "masked-update",
                    expect=(200, 202),
                )
                return dict(self._conn.json(resp))
            except APIError as exc:
                if exc.code != _IN_PROGRESS or self._clock() >= give_up:
                    raise
            self._conn.sleep(max(0.01, min(self._conn.backoff(attempt), give_up - self._clock())))
            attempt += 1

    def wait_for(self, stage: str, timeout_s: float) -> _View:
        """Poll until the round reaches ``stage`` (or a later one)."""
        give_up = self._clock() + timeout_s
        while True:
            current = self.view()
            if current.stage not in STAGES:
                raise ProtocolError(f"unknown secure-aggregation stage {current.stage!r}")
            if current.round_status != "open" and STAGES.index(current.stage) < STAGES.index(stage):
                raise SecureAggregationError(
                    f"round {current.round_status} in its {current.stage} stage, before {stage}"
                )
            if STAGES.index(current.stage) >= STAGES.index(stage):
                return current
            if self._clock() >= give_up:
                raise SecureAggregationError(f"the {stage} stage did not begin within {timeout_s:g} s")
            self._conn.sleep(max(0.01, min(current.retry_after_s, give_up - self._clock())))


def _roster(round_id: int, view: _View, max_degree: int) -> Roster:
    try:
        ads = [
            Advertisement(str(m["device_id"]), _b64(m["c_public"]), _b64(m["s_public"]))
            for m in view.raw["roster"]
        ]
        return Roster.build(round_id, ads, graph_seed=int(view.raw["graph_seed"]), max_degree=max_degree)
    except (KeyError, TypeError, ValueError) as exc:
        raise ProtocolError(f"malformed secure-aggregation roster: {exc!r}") from exc


def flatten(delta: Mapping[str, np.ndarray]) -> np.ndarray:
    """The delta's tensors sorted by name, flattened one after the other (float64): the masked layout."""
    return np.concatenate([np.asarray(delta[name], np.float64).ravel() for name in sorted(delta)])


def upload_secure(
    conn: Connection,
    device_id: str,
    assignment: Assignment,
    delta: Mapping[str, np.ndarray],
    num_samples: int,
    *,
    step: Step[Any] = _plain,
    clock: Callable[[], float] = time.monotonic,
    rng: np.random.Generator | None = None,
) -> UploadReceipt:
    """Run the four stages for ``delta``; ``step(name, fn)`` wraps each request of the protocol
    (``"secagg_keys"``, ``"secagg_shares"``, ``"secagg_upload"``, ``"secagg_reveal"``): an exception it
    raises stops the device there, as if it had gone away."""
    info = assignment.secure_aggregation
    if info is None:
        raise ValueError("the assignment does not ask for secure aggregation")
    if num_samples < 1:
        raise ValueError("num_samples must be >= 1")
    weight = min(int(num_samples), info.max_sample_weight)
    vector = fixedpoint.encode_update(
        flatten(delta),
        weight=weight,
        clip_norm=info.clip_norm,
        noise_stddev=info.noise_stddev,
        scale=info.scale,
        bound=info.bound,
        rng=rng if rng is not None else np.random.default_rng(),
    )
    session = _Session(conn, assignment, clock)
    machine = protocol.SecAggClient(device_id, assignment.round_id)
    try:
        return _run(session, machine, info, assignment, vector, step)
    except protocol.ProtocolError as exc:
        raise SecureAggregationError(f"secure aggregation refused the server's data: {exc}") from exc
    except APIError as exc:
        if exc.code in _LEFT_OUT:  # too late for a stage, or not in the cohort: out of this round
            raise SecureAggregationError(f"secure aggregation went on without this device: {exc}") from exc
        raise


def _run(
    session: _Session,
    machine: protocol.SecAggClient,
    info: SecAggInfo,
    assignment: Assignment,
    vector: np.ndarray,
    step: Step[Any],
) -> UploadReceipt:
    me, round_id = machine.device_id, assignment.round_id
    ad = machine.advertise()
    keys = {
        "c_public": base64.b64encode(ad.c_public).decode(),
        "s_public": base64.b64encode(ad.s_public).decode(),
    }
    step("secagg_keys", lambda: session.post("keys", json_body=keys))

    # the key stage lasts until the round's deadline; every later one stage_timeout_s
    first_wait = info.stage_timeout_s
    if assignment.deadline is not None:
        first_wait += max(0.0, (assignment.deadline - datetime.now(UTC)).total_seconds())
    view = session.wait_for("share", first_wait)
    roster = _roster(round_id, view, info.max_neighbours)
    outbox = machine.share(roster)
    body = b"".join(outbox[peer] for peer in roster.neighbours(me))
    step("secagg_shares", lambda: session.post("shares", content=body))

    view = session.wait_for("upload", 2 * info.stage_timeout_s)
    if me not in view.raw.get("sharers", []):
        raise SecureAggregationError("the server left this device out of the round after the share stage")
    if view.vector_length != len(vector):
        raise SecureAggregationError(
            f"the round expects {view.vector_length} values, this update has {len(vector)}"
        )
    inbox = {str(sender): _b64(text) for sender, text in (view.raw.get("inbox") or {}).items()}
    masked = machine.mask(inbox, vector)
    payload = codec.encode({"masked": masked})
    accepted = step(
        "secagg_upload",
        lambda: session.post("masked-update", content=payload, patience_s=info.stage_timeout_s),
    )

    view = session.wait_for("unmask", 2 * info.stage_timeout_s)
    sharers, uploaders = set(view.raw.get("sharers") or []), set(view.raw.get("uploaders") or [])
    revealed = machine.unmask(sharers - uploaders, uploaders)
    shares = [revealed.mask_key_shares[o] for o in sorted(revealed.mask_key_shares)]
    shares += [revealed.self_seed_shares[o] for o in sorted(revealed.self_seed_shares)]
    step("secagg_reveal", lambda: session.post("reveal", content=b"".join(shares)))
    try:
        return UploadReceipt(
            update_id=str(accepted["update_id"]),
            round_id=round_id,
            reports=int(accepted.get("reports") or 0),
            bytes_sent=len(payload),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ProtocolError(f"malformed upload receipt: {exc!r}") from exc

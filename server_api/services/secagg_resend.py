"""What a device already submitted in each secure-aggregation stage, as a digest (docs/protocol.md
"Secure aggregation", "Resending").

A device that lost the answer to a stage request (a reset connection, a timeout while reading it) cannot
know whether the server recorded it, so it sends the request again. The server answers a resend of the
same content as it answered the first one, from the record, whatever the stage is now (the first request
may have closed the stage, or the round); a different content for a recorded stage is refused as before.
The digests are rebuilt from the stored rows, so no column holds them:

- ``keys``: SHA-256 of the 32-byte ``c_public`` then the 32-byte ``s_public`` (the JSON body is not
  canonical, the keys are);
- ``shares``, ``masked-update``, ``reveal``: SHA-256 of the request body (the stored ciphertexts in
  neighbour order, the masked upload's blob key, the revealed shares in the order they were sent).
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from server_api.orm import (
    SECAGG_ADVERTISE,
    SECAGG_DONE,
    SECAGG_SHARE,
    SECAGG_UNMASK,
    SECAGG_UPLOAD,
    Assignment,
    SecAggMember,
    SecAggReveal,
    SecAggShare,
    Update,
)

__all__ = [
    "RecordedDigests",
    "RecordedUpload",
    "body_digest",
    "keys_digest",
    "masked_of",
    "reveal_digest",
    "shares_digest",
    "submitted",
]

KEYS, SHARES, MASKED, REVEAL = "keys", "shares", "masked-update", "reveal"
_ORDER = (SECAGG_ADVERTISE, SECAGG_SHARE, SECAGG_UPLOAD, SECAGG_UNMASK, SECAGG_DONE)


@dataclass(frozen=True)
class RecordedUpload:
    update_id: int
    digest: str  # the blob key: SHA-256 of the body


def body_digest(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


def keys_digest(c_public: bytes, s_public: bytes) -> str:
    return hashlib.sha256(bytes(c_public) + bytes(s_public)).hexdigest()


def shares_digest(s: Session, member: SecAggMember) -> str | None:
    """None: the device sent no shares. A member left out of U2 when the share stage closed keeps its
    rows (``shared`` reset), so the rows, not the flag, say that it sent them."""
    rows = s.scalars(
        select(SecAggShare).where(
            SecAggShare.round_id == member.round_id, SecAggShare.sender_id == member.device_id
        )
    ).all()
    if not rows and not member.shared:
        return None
    # sorted here, not by the database: PostgreSQL's collation may order ids differently than Python
    ordered = sorted(rows, key=lambda r: r.recipient_id)
    return body_digest(b"".join(bytes(r.ciphertext) for r in ordered))


def reveal_digest(s: Session, member: SecAggMember) -> str | None:
    """None: the device revealed nothing yet. Body order: mask-key shares by owner, then self-seed ones."""
    if not member.revealed:
        return None
    rows = s.scalars(
        select(SecAggReveal).where(
            SecAggReveal.round_id == member.round_id, SecAggReveal.holder_id == member.device_id
        )
    ).all()
    ordered = sorted(rows, key=lambda r: (r.kind != "mask_key", r.owner_id))
    return body_digest(b"".join(bytes(r.share) for r in ordered))


def masked_of(s: Session, assignment: Assignment) -> RecordedUpload | None:
    if not assignment.reported:
        return None
    row = s.scalars(select(Update).where(Update.assignment_id == assignment.id)).first()
    return RecordedUpload(row.id, row.blob_key) if row is not None else None


class RecordedDigests:
    """A per-process cache of the digests above: a recorded request never changes (keys, shares, reveals
    and masked uploads are immutable rows), so once a poll found one it is served from memory, and a
    poll of a device that sent everything it could so far reads nothing. Entries only grow; at most
    ``max_entries`` devices and rounds (the oldest insert is evicted first)."""

    def __init__(self, max_entries: int = 65536) -> None:
        self.max_entries = max_entries
        self._entries: dict[tuple[int, str], dict[str, str]] = {}
        self._lock = threading.Lock()  # inserts only; a dict read is atomic

    def get(self, round_id: int, device_id: str) -> dict[str, str]:
        return dict(self._entries.get((round_id, device_id), {}))

    def put(self, round_id: int, device_id: str, digests: dict[str, str]) -> None:
        with self._lock:
            self._entries.pop((round_id, device_id), None)
            self._entries[(round_id, device_id)] = dict(digests)
            while len(self._entries) > self.max_entries:
                del self._entries[next(iter(self._entries))]

    def __len__(self) -> int:
        return len(self._entries)


def submitted(s: Session, assignment: Assignment, stage: str, cache: RecordedDigests) -> dict[str, str]:
    """The digests of what this device's requests recorded in its round (now at ``stage``), by request
    name. Reads only what may have been recorded since the cached answer: shares from the share stage
    on, a reveal from the unmask stage on, a masked upload once the assignment says it was reported."""
    rid, did = assignment.round_id, assignment.device_id
    known = cache.get(rid, did)
    out = dict(known)
    reached = _ORDER.index(stage)
    need_member = (
        KEYS not in out
        or (SHARES not in out and reached >= _ORDER.index(SECAGG_SHARE))
        or (REVEAL not in out and reached >= _ORDER.index(SECAGG_UNMASK))
    )
    member = s.get(SecAggMember, (rid, did)) if need_member else None
    if member is not None:
        out.setdefault(KEYS, keys_digest(member.c_public, member.s_public))
        # rows without the flag only once the share stage closed (a sharer left out of U2)
        maybe_shared = member.shared or reached >= _ORDER.index(SECAGG_UPLOAD)
        if SHARES not in out and maybe_shared and (shares := shares_digest(s, member)) is not None:
            out[SHARES] = shares
        if REVEAL not in out and (reveal := reveal_digest(s, member)) is not None:
            out[REVEAL] = reveal
    if MASKED not in out and (upload := masked_of(s, assignment)) is not None:
        out[MASKED] = upload.digest
    if out != known:
        cache.put(rid, did, out)
    return out

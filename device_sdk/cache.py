"""Downloads of immutable resources (model weights, FedFR's public pack), verified and cached on disk.

Model versions and public packs never change once created, and the server names each by its SHA-256
(the ``ETag``). :func:`fetch_immutable` checks a body against its ETag before it is parsed, and with a
:class:`DownloadCache` keeps it on disk and revalidates it with ``If-None-Match`` (so a 304 is the usual
answer and the bytes cross the network once).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from facefl.fileio import atomic_write_bytes

from .errors import ProtocolError
from .transport import Connection

__all__ = ["DownloadCache", "fetch_immutable"]

_T = TypeVar("_T")


class DownloadCache:
    """A directory of downloaded bodies and their ETags, one sub-directory per server.

    Entries are written atomically (a crash leaves the old entry or none), and a damaged entry is
    dropped and fetched again, never trusted.
    """

    def __init__(self, root: str | Path, base_url: str) -> None:
        server_key = hashlib.sha256(base_url.rstrip("/").encode()).hexdigest()[:12]
        self.dir = Path(root) / server_key

    def body_path(self, name: str) -> Path:
        return self.dir / f"{name}.safetensors"

    def etag_path(self, name: str) -> Path:
        return self.dir / f"{name}.etag"

    def etag(self, name: str) -> str | None:
        """The stored ETag of ``name`` when both the body and its ETag are on disk."""
        body, etag = self.body_path(name), self.etag_path(name)
        if not (body.exists() and etag.exists()):
            return None
        try:
            return etag.read_text(encoding="utf-8").strip() or None
        except OSError:
            return None

    def read(self, name: str) -> bytes:
        return self.body_path(name).read_bytes()

    def drop(self, name: str) -> None:
        self.body_path(name).unlink(missing_ok=True)
        self.etag_path(name).unlink(missing_ok=True)

    def write(self, name: str, body: bytes, etag: str) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.body_path(name), body)
        atomic_write_bytes(self.etag_path(name), etag.encode("utf-8"))


def fetch_immutable(
    conn: Connection,
    path: str,
    parse: Callable[[bytes], _T],
    *,
    cache: DownloadCache | None = None,
    name: str | None = None,
) -> _T:
    """GET an immutable resource (ETag = sha256), verify it, parse it; cached under ``name`` when given.

    ``parse`` raises ValueError on a body it cannot read (a :class:`ProtocolError` for the caller).
    """
    headers: dict[str, str] = {}
    if cache is not None and name is not None:
        etag = cache.etag(name)
        if etag is not None:
            headers["If-None-Match"] = etag
    resp = conn.request("GET", path, idempotent=True, headers=headers, expect=(200, 304))
    if resp.status_code == 304:
        if cache is None or name is None:
            raise ProtocolError("304 Not Modified without a conditional request", status_code=304)
        try:
            return parse(cache.read(name))
        except (OSError, ValueError):
            # a damaged cache entry: drop it and fetch unconditionally
            cache.drop(name)
            resp = conn.request("GET", path, idempotent=True, expect=(200,))
    body = resp.content
    etag = resp.headers.get("ETag")
    if etag:
        expected = etag.strip().removeprefix("W/").strip('"')
        if len(expected) == 64 and hashlib.sha256(body).hexdigest() != expected:
            raise ProtocolError(f"{path}: body does not match its ETag", status_code=200)
    try:
        parsed = parse(body)
    except ValueError as exc:
        raise ProtocolError(f"{path}: {exc}", status_code=resp.status_code) from exc
    if cache is not None and name is not None and etag:
        cache.write(name, body, etag)
    return parsed

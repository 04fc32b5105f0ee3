"""Model downloads served from the per-process caches answer exactly what streaming the file answers,
never cache a miss, and still check the caller on every request."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from facefl import codec
from server_api.app import create_app
from server_api.services import models
from server_api.services.blob_cache import BlobBytes, SmallBlobs, VersionBlob, VersionBlobs
from tests.conftest import ADMIN, make_settings
from tests.server_api.test_api import ADMIN_H, Api


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def api(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Api]:
    url = request.getfixturevalue("pg_url") if request.param == "postgres" else None
    with TestClient(create_app(make_settings(tmp_path, url))) as client:
        api = Api(client)
        # the test model (~1.2 MB) is over the default limit: let it count as small here
        api.ctx.small_blobs = SmallBlobs(max_item=8 << 20)
        yield api


def _answer(r: httpx.Response) -> tuple[int, bytes, dict[str, str]]:
    headers = {k.lower(): v for k, v in r.headers.items() if k.lower() != "date"}
    return r.status_code, r.content, headers


def test_cached_answer_equals_first_and_streamed_answer(api: Api) -> None:
    api.task()
    dev = api.device()
    first = api.c.get("/v1/models/1", headers=dev)
    assert 1 in api.ctx.version_blobs._rows and len(api.ctx.small_blobs) == 1  # now cached
    again = api.c.get("/v1/models/1", headers=dev)
    api.ctx.small_blobs = SmallBlobs(max_item=0)  # every blob is "large": FileResponse from disk
    streamed = api.c.get("/v1/models/1", headers=dev)
    assert len(api.ctx.small_blobs) == 0
    assert _answer(first) == _answer(again) == _answer(streamed)
    status, body, headers = _answer(first)
    assert status == 200 and codec.decode(body)
    assert (
        headers["content-length"] == str(len(body)) and headers["content-type"] == "application/octet-stream"
    )
    assert headers["etag"] == f'"{api.c.get("/v1/models/1/info", headers=dev).json()["sha256"]}"'
    assert {"last-modified", "accept-ranges", "cache-control"} <= headers.keys()
    not_modified = api.c.get("/v1/models/1", headers={**dev, "If-None-Match": headers["etag"]})
    assert not_modified.status_code == 304 and not_modified.content == b""


def test_large_blob_streams_and_ranges_still_work(api: Api) -> None:
    api.task()
    dev = api.device()
    whole = api.c.get("/v1/models/1", headers=dev).content
    api.ctx.small_blobs = SmallBlobs(max_item=len(whole) - 1)  # this blob is now over the limit
    for _ in range(2):
        r = api.c.get("/v1/models/1", headers=dev)
        assert r.status_code == 200 and r.content == whole and r.headers["content-length"] == str(len(whole))
    assert len(api.ctx.small_blobs) == 0
    api.ctx.small_blobs = SmallBlobs()
    part = api.c.get("/v1/models/1", headers={**dev, "Range": "bytes=0-7"})
    assert part.status_code == 206 and part.content == whole[:8]
    assert part.headers["content-range"] == f"bytes 0-7/{len(whole)}"


def test_a_miss_is_not_cached(api: Api) -> None:
    api.task()
    dev = api.device()
    assert api.c.get("/v1/models/2", headers=dev).status_code == 404
    assert 2 not in api.ctx.version_blobs._rows
    weights = api.c.get("/v1/models/1", headers=ADMIN_H).content
    created = api.c.post(
        "/v1/models",
        content=weights,
        headers={**ADMIN_H, "Content-Type": "application/octet-stream"},
    )
    assert created.status_code == 201, created.text
    assert created.json()["version"] == 2
    r = api.c.get("/v1/models/2", headers=dev)
    assert r.status_code == 200 and r.content == weights


def test_callers_checked_on_every_request_of_a_cached_version(api: Api) -> None:
    api.task()
    dev = api.device()
    assert api.c.get("/v1/models/1", headers=dev).status_code == 200  # cached from here on
    assert api.c.get("/v1/models/1").status_code == 401
    assert api.c.get("/v1/models/1", headers={"Authorization": "Bearer not-a-token"}).status_code == 401
    forged = {"Authorization": f"Bearer {dev['Authorization'].split()[1][:-2]}xx"}
    assert api.c.get("/v1/models/1", headers=forged).status_code == 401
    assert api.c.get("/v1/models/1", headers={"Authorization": f"Bearer {ADMIN}x"}).status_code == 401


def test_held_back_version_stays_the_admins_once_cached(api: Api) -> None:
    api.task()
    dev = api.device()
    one = models.version_blob(api.ctx, 1)
    with api.ctx.db.write() as s:
        mv = models.add_version(
            s, task_id=1, parent=1, round_id=None, architecture="tiny", embedding_dim=None,
            blob=(one.blob_key, one.size),
        )  # fmt: skip
        mv.served = False
        held = mv.version
    assert api.c.get(f"/v1/models/{held}", headers=ADMIN_H).status_code == 200  # cached now
    assert held in api.ctx.version_blobs._rows
    for _ in range(2):
        assert api.c.get(f"/v1/models/{held}", headers=dev).status_code == 404
    assert api.c.get(f"/v1/models/{held}", headers=ADMIN_H).status_code == 200


def test_caches_stay_within_their_bounds() -> None:
    small = SmallBlobs(budget=10, max_item=4)
    for i in range(5):
        small.put(str(i), BlobBytes(data=b"abc", last_modified="x"))
    assert (
        small.cached_bytes <= 10 and len(small) == 3 and small.get("0") is None and small.get("4") is not None
    )
    small.put("big", BlobBytes(data=b"12345", last_modified="x"))  # over max_item: not kept
    assert small.get("big") is None
    rows = VersionBlobs(max_entries=2)
    for v in (1, 2, 3):
        rows.put(v, VersionBlob(blob_key="k", sha256="k", size=1, served=True))
    assert len(rows) == 2 and rows.get(1) is None and rows.get(3) is not None

"""server_api.services.intake: an upload staged in one pass (validated while written, never read back)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from facefl import codec
from facefl.codec import TensorSpec
from server_api.blobstore import FileBlobStore
from server_api.errors import ApiError
from server_api.services.intake import StagedUpdate, _write_all

EXPECTED = {"w": TensorSpec((300, 7), "F32"), "b": TensorSpec((7,), "F32")}


def _payload(seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    return codec.encode({n: rng.standard_normal(s.shape).astype(np.float32) for n, s in EXPECTED.items()})


def test_write_all_keeps_order_across_more_buffers_than_one_writev_takes(tmp_path: Path) -> None:
    chunks = [bytes([i % 251]) * (i % 7) for i in range(3000)]  # empty ones too; > IOV_MAX (1024)
    path = tmp_path / "out"
    with path.open("wb", buffering=0) as f:
        _write_all(f.fileno(), chunks)
    assert path.read_bytes() == b"".join(chunks)


@pytest.fixture()
def blobs(tmp_path: Path) -> Iterator[FileBlobStore]:
    store = FileBlobStore(tmp_path / "blobs")
    yield store
    store.close()


def test_chunks_are_validated_and_stored_under_a_fresh_key(blobs: FileBlobStore) -> None:
    payload = _payload()
    keys = []
    for _ in range(2):  # identical bytes twice: each update is its own blob
        staged = StagedUpdate(blobs, EXPECTED, frozenset())
        staged.write_chunks([payload[i : i + 1000] for i in range(0, len(payload), 1000)])
        result = staged.finish()
        key, size = staged.store()
        staged.discard()
        assert size == len(payload) and blobs.path(key).read_bytes() == payload
        assert result.norm == pytest.approx(
            float(np.sqrt(sum(np.sum(v.astype(np.float64) ** 2) for v in codec.decode(payload).values()))),
            rel=1e-5,
        )
        keys.append(key)
    assert keys[0] != keys[1] and not blobs.staging_files()


def test_a_bad_chunk_stops_staging_and_discard_leaves_nothing(blobs: FileBlobStore) -> None:
    bad = codec.encode({"w": np.full((300, 7), np.nan, np.float32), "b": np.zeros(7, np.float32)})
    staged = StagedUpdate(blobs, EXPECTED, frozenset())
    staged.write_chunks([bad[:500], bad[500:]])
    staged.write_chunks([b"ignored after the first error"])
    assert staged.failed
    with pytest.raises(ApiError):
        staged.finish()
    staged.discard()
    assert not blobs.staging_files() and blobs.count() == 0

"""The stranger bank's metadata string: exact round trip, and a clear refusal of every malformed one."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest

from facefl.stranger_bank import MAX_STRANGERS, decode_stranger_bank, encode_stranger_bank


def test_round_trip_is_unit_norm_float32() -> None:
    emb = np.random.default_rng(0).normal(size=(7, 5)) * 3.0
    bank = decode_stranger_bank(encode_stranger_bank(emb))
    assert bank.dtype == np.float32 and bank.shape == (7, 5)
    expected = (emb / np.linalg.norm(emb, axis=1, keepdims=True)).astype(np.float32)
    assert np.array_equal(bank, expected)  # float32 values travel exactly


def test_encode_refuses_what_it_cannot_store() -> None:
    for bad in (np.zeros((0, 4)), np.ones(4), np.array([[1.0, 0.0], [0.0, 0.0]]), np.array([[np.nan, 1.0]])):
        with pytest.raises(ValueError):
            encode_stranger_bank(bad)


def _record(**changes: object) -> str:
    record = json.loads(encode_stranger_bank(np.eye(3)))
    record.update(changes)
    return json.dumps(record)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{not json", "not JSON"),
        (json.dumps([1, 2]), "exactly format, shape and data"),
        (_record(extra=1), "exactly format, shape and data"),
        (_record(format="float16"), "unknown stranger bank format"),
        (_record(shape=[3]), "bad stranger bank shape"),
        (_record(shape=[3, 3.0]), "bad stranger bank shape"),
        (_record(shape=[MAX_STRANGERS + 1, 3]), "bad stranger bank shape"),
        (_record(shape=[0, 3]), "bad stranger bank shape"),
        (_record(data="!!!!"), "not base64"),
        (_record(data=5), "not a base64 string"),
        (_record(data="A" * 10_000), "not a base64 string of its shape's size"),
        (_record(shape=[4, 3]), "holds 36 bytes, not the 48 of shape"),
        (_record(data=base64.b64encode(np.full(9, np.inf, "<f4").tobytes()).decode()), "finite unit vectors"),
        (_record(data=base64.b64encode(np.full(9, 2.0, "<f4").tobytes()).decode()), "finite unit vectors"),
    ],
)
def test_decode_refuses_malformed_banks(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        decode_stranger_bank(text)

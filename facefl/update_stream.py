"""Validate an update while its bytes arrive: one pass, memory independent of the update's size.

:class:`UpdateScanner` is fed the body of an upload chunk by chunk (any chunk boundaries). It parses the
safetensors header as soon as it is complete and checks it against the tensors the update must hold
(names, shapes; float32/float16, or int8 with scales: :mod:`facefl.compression`), so a wrong update is
refused before its data is read; then it checks every value as it passes (finite) and accumulates the
L2 norm of the *decoded* values: for int8, ``sum_c s_c^2 * sum q^2`` over each channel ``c``, so the
scales may arrive before or after their values. Only the scales and the tensors named in ``keep`` (an
algorithm's small extras) are held in memory.
"""

from __future__ import annotations

import bisect
import functools
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from facefl import codec, compression

TensorDict = dict[str, np.ndarray]

UPDATE_DTYPES = compression.UPDATE_DTYPES


@dataclass(frozen=True)
class ScanResult:
    norm: float  # L2 norm of the decoded values of every tensor not in ``keep``
    kept: TensorDict  # decoded float32 values of the tensors in ``keep``
    header: codec.FileHeader
    layout: dict[str, str | None]  # tensor name -> its scale's name (None: sent as float)
    size: int  # bytes of the whole payload


@dataclass
class _Region:
    """One tensor's bytes in the data section, and what is known of it so far."""

    name: str
    start: int
    end: int
    dtype: np.dtype[Any]
    shape: tuple[int, ...]
    hold: bool  # keep its values (a scale, or a tensor in ``keep``)
    per_channel: bool  # int8 with one scale per output channel (else one for the tensor)
    row: int  # elements per output channel
    done: int = 0  # elements seen
    parts: list[np.ndarray] = field(default_factory=list)
    sumsq: Any = 0.0  # float tensors: sum of squares; int8: per channel (or one) sums of q^2
    # adjacent float tensors that are neither kept nor scales are checked as one run (a model has
    # hundreds of small tensors): (byte offset, name) of each, to name the one holding a NaN
    members: list[tuple[int, str]] = field(default_factory=list)

    def name_at(self, element: int) -> str:
        offset = self.start + element * self.dtype.itemsize
        return self.members[bisect.bisect_right([m[0] for m in self.members], offset) - 1][1]


@functools.lru_cache(maxsize=64)
def parsed_header(
    raw: bytes,
) -> tuple[dict[str, codec.TensorSpec], dict[str, str], dict[str, tuple[int, int]], int]:
    """Devices of one task send byte-identical headers: each is parsed once (read-only results)."""
    return codec.parse_header(raw, None, UPDATE_DTYPES)


class UpdateScanner:
    """``feed()`` the payload's bytes in order, then ``finish()``; CodecError (with a reason a client can
    act on) as soon as something is wrong."""

    def __init__(
        self,
        expected: Mapping[str, codec.TensorSpec],
        keep: frozenset[str] = frozenset(),
        *,
        max_header_bytes: int = codec.MAX_HEADER_BYTES,
    ) -> None:
        self._expected = dict(expected)
        self._keep = keep
        self._max_header_bytes = max_header_bytes
        self._prefix = bytearray()
        self._header_len: int | None = None
        self._header: codec.FileHeader | None = None
        self._layout: dict[str, str | None] = {}
        self._regions: list[_Region] = []
        self._body_len = 0
        self._index = 0  # the region being read
        self._pos = 0  # data-section bytes seen
        self._carry = bytearray()  # an element split across two chunks
        self.received = 0

    # ---------------------------------------------------------------------------------- feeding

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data).cast("B")
        self.received += len(view)
        if self._header is None:
            view = self._feed_header(view)
            if self._header is None:
                return
        if len(view):
            self._feed_data(view)

    def _feed_header(self, view: memoryview) -> memoryview:
        if self._header_len is None:
            take = min(len(view), 8 - len(self._prefix))
            self._prefix += view[:take]
            view = view[take:]
            if len(self._prefix) < 8:
                return view
            (header_len,) = struct.unpack("<Q", bytes(self._prefix))
            if header_len > self._max_header_bytes:
                raise codec.CodecError(f"safetensors header is larger than {self._max_header_bytes} bytes")
            self._header_len = int(header_len)
            self._prefix.clear()
        take = min(len(view), self._header_len - len(self._prefix))
        self._prefix += view[:take]
        if len(self._prefix) == self._header_len:
            self._open(bytes(self._prefix))
            self._prefix = bytearray()
        return view[take:]

    def _open(self, raw: bytes) -> None:
        specs, meta, offsets, body_len = parsed_header(raw)
        self._layout = compression.wire_layout(specs, self._expected)
        scales = {s: n for n, s in self._layout.items() if s is not None}
        for name, (start, end) in sorted(offsets.items(), key=lambda kv: kv[1]):
            spec = specs[name]
            scale = self._layout.get(name)
            per_channel = scale is not None and specs[scale].shape != (1,)
            hold = name in scales or name in self._keep
            dtype = UPDATE_DTYPES[spec.dtype]
            last = self._regions[-1] if self._regions else None
            if (
                last is not None
                and last.members
                and not hold
                and dtype == last.dtype
                and dtype.kind == "f"
                and start == last.end
            ):
                last.end = end
                last.members.append((start, name))
                continue
            row = math.prod(spec.shape[1:])
            region = _Region(name, start, end, dtype, spec.shape, hold, per_channel, row)
            if spec.dtype == "I8":
                region.sumsq = np.zeros(spec.shape[0] if per_channel else 1, np.float64)
            elif not hold:
                region.members.append((start, name))
            self._regions.append(region)
        self._body_len = body_len
        assert self._header_len is not None
        self._header = codec.FileHeader(specs, meta, 8 + self._header_len, offsets)
        self._skip_empty()

    def _skip_empty(self) -> None:
        while self._index < len(self._regions) and self._regions[self._index].end == self._pos:
            self._index += 1

    def _feed_data(self, view: memoryview) -> None:
        while len(view):
            if self._index >= len(self._regions):
                raise codec.CodecError("payload is longer than the tensors in its header")
            region = self._regions[self._index]
            take = min(len(view), region.end - self._pos)
            part, view = view[:take], view[take:]
            self._pos += take
            size = region.dtype.itemsize
            if self._carry:  # complete the element split by the previous chunk
                fill = min(size - len(self._carry), len(part))
                self._carry += part[:fill]
                part = part[fill:]
                if len(self._carry) == size:
                    self._values(region, bytes(self._carry))
                    self._carry.clear()
            whole = len(part) - len(part) % size
            if whole:
                self._values(region, part[:whole])
            self._carry += part[whole:]
            self._skip_empty()

    def _values(self, region: _Region, raw: bytes | memoryview) -> None:
        arr = np.frombuffer(raw, dtype=region.dtype)
        if region.hold:
            region.parts.append(arr.copy())
        if region.dtype.kind == "f":
            if arr.dtype.itemsize < 4:
                arr = arr.astype(np.float32)  # NumPy's float16 arithmetic is emulated: slow
            if region.hold:
                self._check_finite(region, arr)
            else:
                # Squares are >= 0, so a NaN or Inf anywhere makes the float32 sum non-finite: one BLAS
                # pass both checks and measures (relative error ~1e-6, immaterial to a norm bound). A
                # non-finite sum of finite values (squares past float32's range) is redone in float64.
                sumsq = float(np.dot(arr, arr))
                if not math.isfinite(sumsq):
                    self._check_finite(region, arr)
                    sumsq = float(np.einsum("i,i->", arr, arr, dtype=np.float64))
                region.sumsq += sumsq
        elif not region.hold:
            squares = np.square(arr, dtype=np.float32)  # exact: |q| <= 128
            if not region.per_channel:
                region.sumsq[0] += float(squares.sum(dtype=np.float64))
            elif region.done % region.row == 0 and arr.size % region.row == 0:  # whole channels
                first = region.done // region.row
                rows = squares.reshape(-1, region.row).sum(axis=1, dtype=np.float64)
                region.sumsq[first : first + rows.size] += rows
            else:
                first = region.done
                # the chunk's start, then every channel boundary inside it
                cuts = np.arange(-(-first // region.row) * region.row, first + arr.size, region.row) - first
                starts = np.unique(np.concatenate(([0], cuts[cuts > 0])))
                sums = np.add.reduceat(squares, starts, dtype=np.float64)
                region.sumsq[(first + starts) // region.row] += sums
        region.done += arr.size

    @staticmethod
    def _check_finite(region: _Region, arr: np.ndarray) -> None:
        if not np.isfinite(arr).all():
            bad = int(np.flatnonzero(~np.isfinite(arr))[0])
            name = region.name_at(region.done + bad) if region.members else region.name
            raise codec.CodecError(f"tensor {name!r} contains NaN or Inf")

    # ---------------------------------------------------------------------------------- result

    def finish(self) -> ScanResult:
        """Everything arrived: the decoded norm and kept tensors (CodecError if the payload is short)."""
        if self._header is None:
            raise codec.CodecError("payload ends inside its safetensors header")
        if self._pos != self._body_len or self._carry:
            raise codec.CodecError("payload is shorter than the tensors in its header")
        held = {r.name: _joined(r) for r in self._regions if r.hold}
        total = 0.0
        kept: TensorDict = {}
        for region in self._regions:
            scale_key = self._layout.get(region.name)
            if region.name.endswith(compression.SCALE_SUFFIX):
                continue
            if scale_key is None:
                if region.name in self._keep:
                    kept[region.name] = held[region.name].astype(np.float32)
                else:
                    total += float(region.sumsq)
                continue
            scales = held[scale_key]
            compression.check_scales(scales, region.shape, region.name)
            if region.name in self._keep:
                kept[region.name] = compression.dequantize_int8(held[region.name], scales, region.name)
            else:
                total += float(np.dot(scales.astype(np.float64) ** 2, region.sumsq))
        size = self._header.data_start + self._body_len
        return ScanResult(math.sqrt(total), kept, self._header, self._layout, size)


def _joined(region: _Region) -> np.ndarray:
    flat = np.concatenate(region.parts) if region.parts else np.zeros(0, region.dtype)
    return flat.astype(region.dtype.newbyteorder("=")).reshape(region.shape)

"""Stored updates read zero-copy, and their weighted mean with memory O(model).

An :class:`UpdateFile` memory-maps a stored update (validated at intake: any encoding of
:mod:`facefl.compression`) after checking its header; a float32 tensor is a view of the map, an int8
one is decoded with its scales on the fly. :func:`mean_of_files` accumulates ``sum_i c_i * x_i`` over
the files in float32 with coefficients ``c_i = w_i * f_i / sum_i w_i`` (at most 1 together, so no
partial sum can exceed the largest input): one multiply into a scratch buffer of the largest tensor
and one in-place add per tensor and file. A float32 overflow can only happen within rounding of
float32's largest value; then the mean is computed again in float64, so finite updates always give a
finite mean.
"""

from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from facefl import codec, compression
from facefl.update_stream import parsed_header

TensorDict = dict[str, np.ndarray]


class UpdateFile:
    """A stored update, memory-mapped (use as a context manager, or :meth:`close`)."""

    def __init__(self, path: str | Path) -> None:
        with Path(path).open("rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 8:
                raise codec.CodecError(f"{path}: shorter than a safetensors header")
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > codec.MAX_HEADER_BYTES or 8 + header_len > size:
                raise codec.CodecError(f"{path}: bad safetensors header length")
            specs, _, offsets, body_len = parsed_header(f.read(header_len))
            if 8 + header_len + body_len != size:
                raise codec.CodecError(f"{path}: length does not match the tensors in its header")
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else None
        self._start = 8 + header_len
        self.specs = specs
        self._offsets = offsets
        self.names = sorted(n for n in specs if not n.endswith(compression.SCALE_SUFFIX))
        for name in self.names:
            if specs[name].dtype == "I8" and compression.scale_name(name) not in specs:
                raise codec.CodecError(f"{path}: int8 tensor {name!r} without its scale")

    def raw(self, name: str) -> np.ndarray:
        """The tensor as stored (a read-only view of the map: no copy)."""
        spec = self.specs[name]
        start, end = self._offsets[name]
        dtype = compression.UPDATE_DTYPES[spec.dtype]
        assert self._map is not None
        count = (end - start) // dtype.itemsize
        flat = np.frombuffer(self._map, dtype, count=count, offset=self._start + start)
        return flat.reshape(spec.shape)

    def scales(self, name: str) -> np.ndarray | None:
        """The scales of an int8 tensor, shaped to broadcast over its output channels (None: a float)."""
        if self.specs[name].dtype != "I8":
            return None
        scales = np.array(self.raw(compression.scale_name(name)), np.float32)
        compression.check_scales(scales, self.specs[name].shape, name)
        return scales.reshape((-1,) + (1,) * (len(self.specs[name].shape) - 1))

    def read(self, name: str) -> np.ndarray:
        """The decoded float32 values (a copy)."""
        raw = self.raw(name)
        scales = self.scales(name)
        return raw.astype(np.float32) if scales is None else raw.astype(np.float32) * scales

    def region(self, name: str) -> tuple[int, int]:
        """The tensor's bytes: (offset in the file, length)."""
        start, end = self._offsets[name]
        return self._start + start, end - start

    def view(self, offset: int, dtype: np.dtype[Any], count: int) -> np.ndarray:
        """``count`` values of ``dtype`` at file ``offset``: a read-only view of the map (no copy)."""
        assert self._map is not None
        return np.frombuffer(self._map, dtype, count=count, offset=offset)

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None

    def __enter__(self) -> UpdateFile:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


@dataclass(frozen=True)
class _Run:
    """Adjacent tensors of one dtype whose places in the accumulator are adjacent too: one multiply and
    one add for all of them (a model has hundreds of small tensors). An int8 tensor is a run of its own,
    with its scales."""

    offset: int  # in the file
    count: int  # values
    dtype: np.dtype[Any]
    at: int  # first value's place in the flat accumulator
    scale: str | None = None  # int8: the tensor whose scales apply
    channels: int = 1


def _int8_scales(update: UpdateFile, name: str) -> np.ndarray:
    scales = update.scales(name)
    if scales is None:
        raise ValueError(f"tensor {name!r} is not int8")
    return scales


def _runs(update: UpdateFile, places: dict[str, tuple[int, tuple[int, ...]]]) -> list[_Run]:
    runs: list[_Run] = []
    for name in sorted(places, key=lambda n: update.region(n)[0]):
        at, shape = places[name]
        if tuple(update.specs[name].shape) != shape:
            raise ValueError(f"tensor {name!r} has another shape than the first update's")
        offset, length = update.region(name)
        dtype = compression.UPDATE_DTYPES[update.specs[name].dtype]
        count = length // dtype.itemsize
        if dtype.kind == "i":
            channels = int(_int8_scales(update, name).size)
            runs.append(_Run(offset, count, dtype, at, name, channels))
            continue
        last = runs[-1] if runs else None
        if (
            last is not None
            and last.scale is None
            and last.dtype == dtype
            and last.offset + last.count * dtype.itemsize == offset
            and last.at + last.count == at
        ):
            runs[-1] = _Run(last.offset, last.count + count, dtype, last.at)
        else:
            runs.append(_Run(offset, count, dtype, at))
    return runs


#: values multiplied and added per step: the block of the file, its product and the accumulator's
#: block stay in the CPU cache between the multiply and the add (one pass over memory, like numpy.add)
_BLOCK = 1 << 16


def _accumulate(update: UpdateFile, run: _Run, coeff: float, acc: np.ndarray, scratch: np.ndarray) -> None:
    """``acc[run] += coeff * values of run`` in blocks of at most ``_BLOCK`` values."""
    dtype = acc.dtype.type
    values = update.view(run.offset, run.dtype, run.count)
    if run.scale is None:
        factor: Any = dtype(coeff)
        step = _BLOCK
    else:  # int8: q times (scale x coefficient), per output channel, whole channels per block
        row = run.count // run.channels
        factor = _int8_scales(update, run.scale).reshape(run.channels, 1).astype(acc.dtype) * dtype(coeff)
        step = max(1, _BLOCK // max(row, 1)) * row
    if scratch.size < step:  # an output channel longer than a block
        scratch = np.empty(step, acc.dtype)
    for start in range(0, run.count, step):
        stop = min(start + step, run.count)
        tmp = scratch[: stop - start]
        target = acc[run.at + start : run.at + stop]
        if run.scale is None:
            np.multiply(values[start:stop], factor, out=tmp)
        else:
            rows = slice(start // row, stop // row)
            np.multiply(values[start:stop].reshape(-1, row), factor[rows], out=tmp.reshape(-1, row))
        np.add(target, tmp, out=target)
    del values


def mean_of_files(
    paths: Sequence[str | Path],
    weights: Sequence[float],
    factors: Sequence[float] | None = None,
    exclude: Collection[str] = (),
    *,
    dtype: Any = np.float32,
) -> TensorDict:
    """``sum_i w_i * f_i * x_i / sum_i w_i`` per tensor over the update files (``f_i``: a per-update
    factor such as a clipping scale, 1 by default), without the tensors named in ``exclude``; float32.

    Every file must hold the same tensor names and shapes (ValueError otherwise); weights are positive.
    The accumulator is one flat buffer laid out in the first file's order; the files of one round share
    their header (one architecture, one encoding), so their runs are worked out once.
    """
    if not paths or len(paths) != len(weights):
        raise ValueError("one positive weight per update file, at least one file")
    factors = factors if factors is not None else [1.0] * len(paths)
    if any(not np.isfinite(w) or w <= 0 for w in weights) or any(not np.isfinite(f) for f in factors):
        raise ValueError("weights must be positive finite numbers, factors finite")
    total = float(sum(weights))
    coeffs = [float(w) * float(f) / total for w, f in zip(weights, factors, strict=True)]
    places: dict[str, tuple[int, tuple[int, ...]]] = {}
    acc = np.zeros(0, dtype)
    scratch = np.zeros(_BLOCK, dtype)
    plans: dict[int, tuple[dict[str, codec.TensorSpec], list[_Run]]] = {}
    for path, coeff in zip(paths, coeffs, strict=True):
        with UpdateFile(path) as update:
            own = [n for n in update.names if n not in exclude]
            if not places:
                at = 0
                for name in sorted(own, key=lambda n: update.region(n)[0]):
                    shape = tuple(update.specs[name].shape)
                    places[name] = (at, shape)
                    at += int(np.prod(shape, dtype=np.int64))
                acc = np.zeros(at, dtype)
            elif set(own) != places.keys():
                raise ValueError(f"{path}: tensor names differ from the first update's")
            # keyed by the (cached, shared) header object; it is kept alive in the value
            plan = plans.get(id(update.specs))
            if plan is None:
                plan = plans[id(update.specs)] = (update.specs, _runs(update, places))
            with np.errstate(over="ignore"):  # an overflow is caught below
                for run in plan[1]:
                    _accumulate(update, run, coeff, acc, scratch)
    if dtype == np.float32 and not np.isfinite(acc).all():
        # within rounding of float32's largest value: the exact mean, in float64 (then float32)
        exact = mean_of_files(paths, weights, factors, exclude, dtype=np.float64)
        return {n: v.astype(np.float32) for n, v in exact.items()}
    flat = acc.astype(np.float32, copy=False)
    return {
        n: flat[at : at + int(np.prod(shape, dtype=np.int64))].reshape(shape)
        for n, (at, shape) in places.items()
    }


def read_tensors(path: str | Path, names: Collection[str]) -> TensorDict:
    """Decoded float32 copies of ``names`` (those the file holds) of one update file."""
    with UpdateFile(path) as update:
        return {n: update.read(n) for n in update.names if n in names}

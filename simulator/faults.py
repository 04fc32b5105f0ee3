"""Simulated faults: which device drops out, straggles or uploads garbage in which round; server kills.

Every decision is a pure function of ``(seed, round, device)``, so a run with the same options injects
the same faults into the same devices, whichever worker process (or Ray task) runs a device, and a test
can recompute what the simulator was told to do.

The kinds are exclusive per device and round. One uniform draw ``u`` is compared with consecutive
intervals: ``[0, dropout)`` drops out, then ``corrupt``, then ``stragglers``; so each kind happens with
exactly its configured probability and ``dropout + corrupt + stragglers <= 1`` is required.

- dropout: the device checks in and gets an assignment, then vanishes after check-in, after downloading
  the model, or after training (chosen uniformly), and never uploads; the round must close without it
  (over-selection, or the deadline with at least the minimum of reports). Under secure aggregation a
  device that drops "after training" goes on to advertise its keys and send its shares, then vanishes
  before its masked upload: its neighbours must then reveal its mask key for the round to aggregate.
- straggler: training takes ``slow_factor`` times longer (the device sleeps ``(slow_factor - 1)`` times
  its measured training time before uploading), so it may miss the deadline and be refused with 410.
- corrupt: the upload is NaN-poisoned, has a wrong shape, or is random bytes; the server must refuse it
  with a 4xx and store nothing; the device carries on with the next round.
- kill (``--kill-server-at ROUND:SECONDS``): SIGKILL of the server subprocess SECONDS after ROUND's
  devices were dispatched, then a restart on the same database and blob store; devices retry meanwhile.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

__all__ = [
    "CORRUPTIONS",
    "DROP_POINTS",
    "DeviceFault",
    "FaultConfig",
    "KillAt",
    "corrupt_payload",
    "parse_kill_at",
]

DROP_POINTS = ("checkin", "download", "train")  # the device vanishes after this phase
CORRUPTIONS = ("nan", "shape", "garbage")


@dataclass(frozen=True)
class DeviceFault:
    """What one device does wrong in one round (the default: nothing)."""

    drop_after: str | None = None  # one of DROP_POINTS: vanish after that phase, never upload
    slow_factor: float = 1.0  # > 1: a straggler, training takes this many times longer
    corrupt: str | None = None  # one of CORRUPTIONS: upload this kind of garbage instead of the update

    @property
    def kind(self) -> str:
        if self.drop_after is not None:
            return "dropout"
        if self.corrupt is not None:
            return "corrupt"
        if self.slow_factor > 1.0:
            return "straggler"
        return "none"


NO_FAULT = DeviceFault()


def _probability(name: str, value: float, *, closed: bool) -> None:
    ok = 0.0 <= value <= 1.0 if closed else 0.0 <= value < 1.0
    if not ok or not math.isfinite(value):
        raise ValueError(f"{name} must be in [0, 1{']' if closed else ')'} (got {value})")


@dataclass(frozen=True)
class FaultConfig:
    """Per-round fault probabilities of every device (``validate()`` names the option at fault)."""

    dropout: float = 0.0
    stragglers: float = 0.0
    slow_factor: float = 3.0
    corrupt: float = 0.0
    seed: int = 0

    def validate(self) -> FaultConfig:
        _probability("--dropout", self.dropout, closed=False)
        _probability("--stragglers", self.stragglers, closed=True)
        _probability("--corrupt", self.corrupt, closed=False)
        if not (math.isfinite(self.slow_factor) and self.slow_factor >= 1.0):
            raise ValueError(f"--slow-factor must be a number >= 1 (got {self.slow_factor})")
        total = self.dropout + self.stragglers + self.corrupt
        if total > 1.0 + 1e-12:
            raise ValueError(
                f"--dropout + --stragglers + --corrupt must not exceed 1 (got {total:g}): "
                "a device has at most one fault per round"
            )
        return self

    @property
    def enabled(self) -> bool:
        return self.dropout > 0 or self.stragglers > 0 or self.corrupt > 0

    def decide(self, round_number: int, device_index: int) -> DeviceFault:
        """The fault of ``device_index`` in ``round_number`` (1-based), deterministic in the seed."""
        if not self.enabled:
            return NO_FAULT
        # a string seed is hashed with SHA-512 by random.Random: stable across processes and runs
        rng = random.Random(f"facefl-faults:{self.seed}:{round_number}:{device_index}")
        u, v = rng.random(), rng.random()
        if u < self.dropout:
            return DeviceFault(drop_after=DROP_POINTS[int(v * len(DROP_POINTS))])
        u -= self.dropout
        if u < self.corrupt:
            return DeviceFault(corrupt=CORRUPTIONS[int(v * len(CORRUPTIONS))])
        u -= self.corrupt
        if u < self.stragglers and self.slow_factor > 1.0:
            return DeviceFault(slow_factor=self.slow_factor)
        return NO_FAULT


@dataclass(frozen=True)
class KillAt:
    """Kill the started server ``seconds`` after round ``round`` (1-based) was dispatched."""

    round: int
    seconds: float


def parse_kill_at(text: str) -> KillAt:
    """``"ROUND:SECONDS"`` (e.g. ``"2:1.5"``) -> KillAt; ValueError with the expected form otherwise."""
    form = "expected ROUND:SECONDS, e.g. 2:1.5 (round >= 1, seconds >= 0)"
    head, sep, tail = text.strip().partition(":")
    if not sep:
        raise ValueError(f"--kill-server-at {text!r}: {form}")
    try:
        round_number = int(head)
        seconds = float(tail)
    except ValueError:
        raise ValueError(f"--kill-server-at {text!r}: {form}") from None
    if round_number < 1 or not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"--kill-server-at {text!r}: {form}")
    return KillAt(round_number, seconds)


def corrupt_payload(kind: str, delta: Mapping[str, np.ndarray], seed: int) -> bytes:
    """The body a corrupt device uploads instead of its real delta (safetensors except for "garbage").

    "nan" poisons one value of the first tensor, "shape" drops the last row of the largest tensor
    (so names match but one shape does not), "garbage" is random bytes of the real update's size.
    """
    from facefl import codec

    tensors = {k: np.array(v, dtype=np.float32, copy=True) for k, v in delta.items()}
    rng = np.random.default_rng(seed)
    if kind == "nan":
        first = next(iter(tensors))
        tensors[first].reshape(-1)[0] = np.nan
        return codec.encode(tensors)
    if kind == "shape":
        name = max(tensors, key=lambda k: (tensors[k].size, k))
        arr = tensors[name]
        tensors[name] = arr[:-1] if arr.ndim and arr.shape[0] > 1 else np.zeros((2, *arr.shape), np.float32)
        return codec.encode(tensors)
    if kind == "garbage":
        size = max(64, sum(t.nbytes for t in tensors.values()))
        return rng.integers(0, 256, size=size, dtype=np.uint8).tobytes()
    raise ValueError(f"unknown corruption {kind!r}; expected one of {', '.join(CORRUPTIONS)}")

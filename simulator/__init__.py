"""Simulator: many device_sdk devices (in worker processes) against a real facefl server.

The public names are imported lazily, so that ``facefl --help`` (which imports :mod:`simulator.cli` to
build its parser) does not import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .run import RoundResult, SimulationConfig, SimulationError, SimulationResult, simulate

__all__ = ["RoundResult", "SimulationConfig", "SimulationError", "SimulationResult", "simulate"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import run

        return getattr(run, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

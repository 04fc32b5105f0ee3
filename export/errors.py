"""The one error type of :mod:`export`."""

from __future__ import annotations


class ExportError(ValueError):
    """A model cannot be exported, quantized or checked (bad input files, graph problems, failed parity)."""

"""The uvicorn implementations the server runs on, chosen explicitly rather than by uvicorn's ``auto``.

httptools (llhttp) parses HTTP instead of the pure-Python h11, and uvloop (libuv) runs the event loop
instead of asyncio's: together what ``uvicorn[standard]`` brings, and about a third of a check-in's CPU
when they were missing. Both are dependencies of facefl; naming them here means a broken install fails
at start instead of silently serving on the slow pair. ``facefl serve``, the simulator's
:class:`simulator.server.LocalServer` (tests, benchmarks, and the bare baseline the benchmarks compare
against) all start uvicorn with these. uvloop does not exist on Windows (nor for PyPy): there the
server runs on asyncio's loop.
"""

from __future__ import annotations

import platform
import sys

HTTP = "httptools"
LOOP = (
    "uvloop"
    if sys.platform not in ("win32", "cygwin") and platform.python_implementation() == "CPython"
    else "asyncio"
)


def uvicorn_options() -> list[str]:
    """The command-line options of ``python -m uvicorn`` that select them."""
    return ["--http", HTTP, "--loop", LOOP]

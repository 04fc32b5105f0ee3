"""`facefl` console script: serve | simulate (more subcommands join as features land).

Subcommand modules are imported lazily so that `facefl --help` stays fast and the core never imports
the server or the simulator at import time.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# name -> (module with add_arguments/run, help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("server_api.cli", "run the aggregation server (uvicorn)"),
    "simulate": ("simulator.cli", "run many simulated devices against a real server"),
    "pretrain": ("facefl.pretrain", "centralized CosFace pretraining on the public split (LFW layout)"),
    "export": ("export.cli", "a checkpoint or a device's personalized model to ONNX (int8, parity check)"),
    "eval": ("facefl.evaluation", "generic (LFW) and personalized metrics of a checkpoint or ONNX model"),
    "audit-data": ("facefl.audit", "flag identity folders filed twice or mixing people (label noise)"),
    "import-model": (
        "facefl.importers.cli",
        "dlib's pretrained face ResNet as a facefl checkpoint",
    ),
}


def build_parser() -> argparse.ArgumentParser:
    from facefl import __version__

    parser = argparse.ArgumentParser(prog="facefl", description="Federated face recognition")
    parser.add_argument("--version", action="version", version=f"facefl {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    module = importlib.import_module(SUBCOMMANDS[args.command][0])
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())

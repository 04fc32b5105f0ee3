"""``facefl import-model ARCH --out FILE``: a pretrained network from another toolkit as a facefl checkpoint.

``dlib-resnet``: dlib's ``dlib_face_recognition_resnet_model_v1.dat``, from ``--dat`` or else from the
installed ``face_recognition_models`` package (``pip install 'facefl[pretrained]'``).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from facefl.importers.dlib_dat import MODEL_FILE, DlibFormatError, find_model_file, read_face_resnet

IMPORTABLE = ("dlib-resnet",)


def add_arguments(p: Any) -> None:
    p.add_argument("architecture", choices=IMPORTABLE, help="the pretrained network to import")
    p.add_argument("--out", required=True, help="the facefl checkpoint (.safetensors) to write")
    p.add_argument("--dat", help=f"dlib's {MODEL_FILE} (default: the one of face_recognition_models)")


def import_dlib_resnet(out: str | Path, dat: str | Path | None = None) -> Path:
    """Write dlib's face recognition ResNet as a ``dlib-resnet`` checkpoint at ``out``; returns its path."""
    from facefl.checkpoint import save_checkpoint
    from facefl.fileio import sha256_file

    source = Path(dat) if dat is not None else find_model_file()
    tensors = read_face_resnet(source)
    extra = {"imported_from": str(source), "source_sha256": sha256_file(source), "source_format": "dlib"}
    return save_checkpoint(out, tensors, "dlib-resnet", embedding_dim=128, extra=extra)


def run(args: Any) -> int:
    try:
        path = import_dlib_resnet(args.out, args.dat)
    except (DlibFormatError, OSError) as exc:
        print(f"facefl import-model: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {path} ({args.architecture})")
    return 0

"""``facefl export``: a generic checkpoint or a device's personalized model to ONNX, optionally int8.

    facefl export --model small.safetensors --out small.onnx --parity faces/
    facefl export --personalized device-state/ --out me.onnx --int8 --calibration my-faces/ --parity my-faces/

With ``--int8``, ``--out`` receives the int8 model and the fp32 model it was made from is kept beside it as
``<name>.fp32.onnx``. With ``--parity DIR`` the embeddings of the images under DIR are compared between
PyTorch and ONNX Runtime; the command fails (exit status 1) when the minimum cosine is under 0.9999 (fp32)
or 0.998 (int8). ``--threshold-set DIR`` stores in each model its operating threshold at FAR 1e-3 on a public
set and, unless ``--no-stranger-bank``, those public faces' embeddings: the stranger bank on which the
Recognizer sets its open-set threshold for the people enrolled on a phone. ``--server URL --version N``
exports a model version straight from a server (a global model the simulator or a real deployment
trained; the token comes from ``--token`` or ``FACEFL_TOKEN``); ``--server URL --task ID`` exports the
version the server serves for that task (the last one that passed the task's release gate). A version
the gate held back is refused.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    src = parser.add_argument_group("model (one of)")
    src.add_argument("--model", type=Path, help="generic model: a facefl checkpoint (.safetensors)")
    src.add_argument("--version", type=int, help="generic model: this model version of --server")
    src.add_argument(
        "--task", type=int, help="generic model: the version --server serves for this task (its release gate)"
    )
    src.add_argument(
        "--personalized",
        type=Path,
        metavar="DEVICE_STATE_DIR",
        help="personalized model: a device state dir with personalized.safetensors and dfc.safetensors",
    )
    parser.add_argument("--server", help="server URL for --version/--task, e.g. http://127.0.0.1:8000")
    parser.add_argument("--token", help="bearer token for --server (default: $FACEFL_TOKEN)")
    parser.add_argument("--out", type=Path, required=True, help="ONNX file to write")
    parser.add_argument("--int8", action="store_true", help="static int8 quantization (needs --calibration)")
    parser.add_argument(
        "--calibration", type=Path, metavar="DIR", help="face crops to calibrate int8 activation ranges on"
    )
    parser.add_argument(
        "--calibration-images", type=int, default=200, metavar="N", help="calibration images used (200)"
    )
    parser.add_argument("--parity", type=Path, metavar="DIR", help="check PyTorch vs ONNX Runtime on these")
    parser.add_argument("--parity-images", type=int, default=200, metavar="N", help="parity images (200)")
    parser.add_argument(
        "--default-threshold",
        type=float,
        default=None,
        help="cosine threshold stored in the model for runtimes that cannot calibrate one on their own data",
    )
    parser.add_argument(
        "--threshold-set",
        type=Path,
        metavar="DIR",
        help="store the operating threshold at --threshold-far chosen on this public image folder, embedded "
        "by each exported model (an LFW-layout folder gives only its public split, never test folds)",
    )
    parser.add_argument(
        "--threshold-far", type=float, default=1e-3, metavar="FAR", help="--threshold-set's target FAR (1e-3)"
    )
    parser.add_argument(
        "--threshold-images", type=int, default=2000, metavar="N", help="--threshold-set images used (2000)"
    )
    parser.add_argument(
        "--no-stranger-bank",
        action="store_true",
        help="with --threshold-set: store only the threshold, not the public faces' embeddings (the "
        "Recognizer then calibrates on the gallery's own pairs)",
    )
    parser.add_argument("--json", dest="json_path", type=Path, help="write the export report as JSON here")


def _download_version(
    server: str, version: int | None, task: int | None, token: str | None, out: Path
) -> Path:
    """Fetch a model version's weights (``version``, or the one the server serves for ``task``) and write
    them as a facefl checkpoint beside ``out``. A version the task's release gate held back is refused."""
    import os

    import httpx

    from device_sdk import FaceflError, FederatedClient
    from facefl.checkpoint import save_checkpoint
    from facefl.models import backbone_state

    token = token or os.environ.get("FACEFL_TOKEN")
    if not token:
        raise ValueError("--server needs a device or admin token (--token or FACEFL_TOKEN)")
    try:
        with FederatedClient(server, token=token) as client:
            if version is None:
                assert task is not None
                version = client.get_task(task).current_version
                if version is None:
                    raise ValueError(f"task {task} on {server} serves no model version yet")
                print(f"task {task} serves model version {version}")
            info = client.get_model_info(version)
            if info.get("served") is False:
                raise ValueError(
                    f"model version {version} was held back by its task's release gate "
                    f"({info.get('held_back_reason')}); export what the task serves with --task"
                )
            weights = client.download_model(version)
    except (FaceflError, httpx.HTTPError) as exc:
        what = f"model version {version}" if version is not None else f"task {task}'s model"
        raise ValueError(f"cannot fetch {what} from {server}: {exc}") from exc
    path = out.with_name(f"{out.stem}.v{version}.safetensors")
    # the backbone only: FedFR's public classifier is training state, not part of the embedding model
    save_checkpoint(path, backbone_state(weights), info["architecture"], info["embedding_dim"])
    print(f"downloaded model version {version} from {server} -> {path}")
    return path


def _fail(message: str, status: int = 1) -> int:
    print(f"facefl export: error: {message}", file=sys.stderr)
    return status


def run(args: argparse.Namespace) -> int:
    import json

    from export.errors import ExportError
    from export.images import load_image_dir
    from export.onnx import DEFAULT_THRESHOLD_KEY, export_onnx, load_generic, load_personalized, set_metadata
    from export.parity import FP32_MIN_COSINE, INT8_MIN_COSINE, parity_report
    from export.quantize import quantize_static_int8
    from export.threshold import threshold_for_model
    from facefl.stranger_bank import STRANGER_BANK_KEY, encode_stranger_bank

    if sum(x is not None for x in (args.model, args.personalized, args.version, args.task)) != 1:
        return _fail(
            "give exactly one of --model FILE, --version N or --task ID (with --server) or "
            "--personalized STATE_DIR",
            2,
        )
    if (args.version is None and args.task is None) != (args.server is None):
        return _fail("--version or --task and --server go together", 2)
    if args.int8 and args.calibration is None:
        return _fail("--int8 needs --calibration DIR (face crops to calibrate on)", 2)
    if args.calibration is not None and not args.int8:
        return _fail("--calibration is only used with --int8", 2)
    if args.calibration_images <= 0 or args.parity_images <= 0 or args.threshold_images <= 1:
        return _fail("--calibration-images and --parity-images must be positive, --threshold-images > 1", 2)
    if args.threshold_set is not None and args.default_threshold is not None:
        return _fail("give --default-threshold or --threshold-set, not both", 2)
    if not 0.0 < args.threshold_far < 1.0:
        return _fail(f"--threshold-far must be in (0, 1), got {args.threshold_far}", 2)
    if args.no_stranger_bank and args.threshold_set is None:
        return _fail("--no-stranger-bank is only used with --threshold-set", 2)
    out: Path = args.out
    report: dict[str, Any] = {"out": str(out)}
    failed = []
    try:
        if args.server is not None:
            args.model = _download_version(args.server, args.version, args.task, args.token, out)
        source = load_personalized(args.personalized) if args.personalized else load_generic(args.model)
        fp32_path = out.with_name(out.stem + ".fp32.onnx") if args.int8 else out
        export_onnx(source, fp32_path, default_threshold=args.default_threshold)
        print(f"wrote {fp32_path} ({source.kind}, {source.architecture}, d={source.embedding_dim}, "
              f"{fp32_path.stat().st_size / 1e6:.2f} MB)")  # fmt: skip
        report.update(kind=source.kind, architecture=source.architecture, fp32=str(fp32_path))
        if args.int8:
            size = source.preprocessing.image_size
            calibration = load_image_dir(args.calibration, size, limit=args.calibration_images)
            quantize_static_int8(fp32_path, out, calibration)
            print(f"wrote {out} (int8, calibrated on {len(calibration)} images from {args.calibration}, "
                  f"{out.stat().st_size / 1e6:.2f} MB)")  # fmt: skip
            report["int8"] = str(out)
        if args.threshold_set is not None:
            report["operating_points"] = {}
            for path in [fp32_path] + ([out] if args.int8 else []):
                point, bank = threshold_for_model(
                    path, args.threshold_set, args.threshold_far, args.threshold_images
                )
                items = {DEFAULT_THRESHOLD_KEY: repr(point.threshold)}
                if not args.no_stranger_bank:
                    items[STRANGER_BANK_KEY] = encode_stranger_bank(bank)
                set_metadata(path, items)
                stored = "" if args.no_stranger_bank else f"; stranger bank of {len(bank)} faces stored"
                print(f"{path.name}: {point.format()}{stored}")
                report["operating_points"][str(path)] = {
                    **point.to_dict(),
                    "stranger_bank": 0 if args.no_stranger_bank else len(bank),
                }
        if args.parity is not None:
            images = load_image_dir(args.parity, source.preprocessing.image_size, limit=args.parity_images)
            checks = [(fp32_path, FP32_MIN_COSINE)] + ([(out, INT8_MIN_COSINE)] if args.int8 else [])
            report["parity"] = []
            for path, threshold in checks:
                parity = parity_report(source.module, source.preprocessing, path, images, threshold)
                print(parity.format())
                report["parity"].append(parity.to_dict())
                if not parity.passed:
                    failed.append(parity)
    except (ExportError, ValueError, OSError) as exc:
        return _fail(str(exc))
    if args.json_path:
        args.json_path.parent.mkdir(parents=True, exist_ok=True)
        args.json_path.write_text(json.dumps(report, indent=2) + "\n")
    if failed:
        worst = min(failed, key=lambda p: p.min_cosine)
        return _fail(
            f"parity check failed: {worst.model} min cosine {worst.min_cosine:.6f} < {worst.threshold} "
            "(the exported model does not reproduce the PyTorch embeddings closely enough)"
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="facefl export", description=(__doc__ or "").splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))

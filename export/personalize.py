"""Rebuild the on-device recognition model after a federated round, and swap it into a Recognizer.

After each FedFR round the device holds its personalized backbone and its DFC converter in a state
directory (``personalized.safetensors`` + ``dfc.safetensors``, see :mod:`facefl.device_state`).
:func:`refresh_recognizer` exports them to ONNX on the device -- optionally int8, calibrated on the
gallery's own crops -- checks parity against PyTorch on those crops, and swaps the model into the
recognizer (which re-embeds its gallery). The personalized model, the crops and the gallery never leave
the device.

A stranger bank (:mod:`facefl.stranger_bank`) holds embeddings of one model, so the previous model's bank
cannot be carried over: given ``public_faces`` (public face crops the device holds, e.g. FedFR's public
set; never its gallery), the new model embeds them into its own bank, and the Recognizer keeps an
open-set threshold; without them it calibrates on the gallery's own pairs (``device_sdk.threshold``).

It lives in ``export`` (which may import ``device_sdk``; ``device_sdk`` never imports ``export``): the SDK
trains and recognizes, the export package turns a model into ONNX, here on the device.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from device_sdk.errors import RecognizerError
from device_sdk.recognizer import Recognizer
from export.errors import ExportError
from export.onnx import SOURCE_SHA256_KEY, export_onnx, load_personalized, set_metadata
from export.parity import FP32_MIN_COSINE, INT8_MIN_COSINE, parity_report
from export.quantize import quantize_static_int8

__all__ = ["refresh_recognizer"]

_PARITY_CROPS = 32
_CALIBRATION_CROPS = 200


def refresh_recognizer(
    recognizer: Recognizer,
    state_dir: str | Path,
    work_dir: str | Path,
    *,
    int8: bool = False,
    check_parity: bool = True,
    public_faces: Sequence[np.ndarray] | None = None,
) -> Path:
    """Export the personalized model of ``state_dir`` into ``work_dir`` and swap it into ``recognizer``.

    Returns the new ONNX file (``work_dir/personalized-<hash>.onnx``; older ``personalized-*.onnx`` files
    there are removed once the swap succeeded). ``int8`` quantizes with the gallery's crops as calibration
    images (it needs an enrolled gallery). With ``check_parity`` the new model must reproduce the PyTorch
    embeddings of up to 32 gallery crops (cosine >= 0.9999 fp32, >= 0.998 int8), else RecognizerError and
    the recognizer keeps its current model. ``public_faces`` (HxWx3 uint8 crops of people who are not
    enrolled) become the new model's stranger bank (module docstring).
    """
    work = Path(work_dir)
    try:
        source = load_personalized(state_dir)
        name = f"personalized-{source.metadata[SOURCE_SHA256_KEY][:16]}{'-int8' if int8 else ''}.onnx"
        out = work / name
        fp32 = work / f".{name}.fp32" if int8 else out
        export_onnx(source, fp32)
        if int8:
            crops = recognizer.gallery_crops(_CALIBRATION_CROPS)
            if not crops:
                raise RecognizerError("int8 needs enrolled images to calibrate on; the gallery is empty")
            quantize_static_int8(fp32, out, crops)
            fp32.unlink(missing_ok=True)
        if check_parity:
            crops = recognizer.gallery_crops(_PARITY_CROPS)
            if crops:
                images = np.stack([source.preprocessing.to_uint8(c) for c in crops])
                threshold = INT8_MIN_COSINE if int8 else FP32_MIN_COSINE
                report = parity_report(source.module, source.preprocessing, out, images, threshold)
                if not report.passed:
                    out.unlink(missing_ok=True)
                    raise RecognizerError(f"the rebuilt model failed its parity check: {report.format()}")
        if public_faces:
            _store_stranger_bank(out, public_faces)
    except (ExportError, ValueError) as exc:
        raise RecognizerError(f"cannot rebuild the personalized model from {state_dir}: {exc}") from exc
    recognizer.swap_model(out)
    for old in work.glob("personalized-*.onnx"):
        if old != out and old.resolve() != out.resolve():
            old.unlink(missing_ok=True)
    return out


def _store_stranger_bank(model: Path, public_faces: Sequence[np.ndarray]) -> None:
    """Embed ``public_faces`` with the ONNX ``model`` (as a device embeds) and store them as its bank."""
    from facefl.embedders import OnnxEmbedder
    from facefl.stranger_bank import STRANGER_BANK_KEY, encode_stranger_bank

    embedder = OnnxEmbedder(model)
    images = np.stack([embedder.preprocessing.to_uint8(face) for face in public_faces])
    set_metadata(model, {STRANGER_BANK_KEY: encode_stranger_bank(embedder.embed(images))})

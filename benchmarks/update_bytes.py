#!/usr/bin/env python
"""Bytes per upload under each update encoding (facefl.compression), per architecture.

    python benchmarks/update_bytes.py [--models small,mobilefacenet,dlib-resnet] [--json PATH]

For each architecture: the upload body of a whole-model delta under float32, float16, int8 (a scale per
tensor) and int8_channel (a scale per output channel), its share of float32, and the relative L2 error
of the decoded delta. The delta is synthetic (Gaussian, each tensor scaled by its own standard deviation
in the freshly initialised model times 1e-2): the byte counts are exact for any delta of the model,
the error only indicates quantization noise (the accuracy cost needs a federated run:
``benchmarks/accuracy.py``). Nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from facefl import compression  # noqa: E402
from facefl.models import build_backbone, state_to_numpy  # noqa: E402

DEFAULT_JSON = REPO / "benchmarks" / "results" / "update_bytes.json"


def synthetic_delta(weights: dict[str, np.ndarray], seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for name, w in weights.items():
        spread = float(np.std(w)) if w.size > 1 and np.std(w) > 0 else 1.0
        out[name] = (rng.standard_normal(w.shape) * spread * 1e-2).astype(np.float32)
    return out


def measure(architecture: str) -> dict[str, Any]:
    weights = {
        k: np.asarray(v, np.float32)
        for k, v in state_to_numpy(build_backbone(architecture, None, seed=0)).items()
    }
    delta = synthetic_delta(weights)
    flat = np.concatenate([v.ravel() for v in delta.values()]).astype(np.float64)
    rows: dict[str, Any] = {}
    for encoding in compression.ENCODINGS:
        t0 = time.perf_counter()
        body = compression.encode_payload(delta, encoding)
        encode_s = time.perf_counter() - t0
        decoded = compression.decode_payload(body)
        back = np.concatenate([decoded[k].ravel() for k in delta]).astype(np.float64)
        rows[encoding] = {
            "bytes": len(body),
            "relative_error": float(np.linalg.norm(back - flat) / np.linalg.norm(flat)),
            "encode_s": encode_s,
        }
    base = rows["float32"]["bytes"]
    for row in rows.values():
        row["share_of_float32"] = row["bytes"] / base
    return {"parameters": int(sum(v.size for v in delta.values())), "tensors": len(delta), "encodings": rows}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--models", default="small,mobilefacenet,dlib-resnet")
    p.add_argument("--json", type=Path, default=DEFAULT_JSON)
    args = p.parse_args(argv)
    results = {name: measure(name) for name in args.models.split(",")}
    lines = ["| model | parameters | encoding | bytes per upload | share of float32 | relative L2 error |",
             "|---|---:|---|---:|---:|---:|"]  # fmt: skip
    for name, r in results.items():
        for encoding, row in r["encodings"].items():
            lines.append(
                f"| {name} | {r['parameters']:,} | {encoding} | {row['bytes']:,} | "
                f"{row['share_of_float32']:.3f} | {row['relative_error']:.2e} |"
            )
    print("\n".join(lines))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

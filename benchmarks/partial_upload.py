#!/usr/bin/env python
"""Upload bytes per device and round: the whole model vs a task's ``trainable`` parameter groups.

    python benchmarks/partial_upload.py [--measure]

For every registered architecture (``facefl.models.ARCHITECTURES``) and each of its parameter groups,
and "last_block + embedding" where both exist, the size of the safetensors body a device uploads (float32
deltas of exactly the trainable tensors, as ``FederatedClient.upload_update`` encodes them; the size
depends on names and shapes only). With ``--measure`` it also runs ``facefl simulate`` (4 devices x 1
round, ``small``, generated faces) for the whole model and for ``--trainable last_block,embedding`` and
``--trainable embedding``, and reports the bytes the devices actually sent (upload bodies plus their
check-in bodies).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from facefl import codec
from facefl.models import (
    ARCHITECTURES,
    build_backbone,
    resolve_trainable,
    state_to_numpy,
    trainable_names,
)


def subsets(groups: list[str]) -> list[list[str] | None]:
    out: list[list[str] | None] = [None, *([g] for g in groups)]
    if {"last_block", "embedding"} <= set(groups):
        out.append(["last_block", "embedding"])
    return out


def computed() -> None:
    print("| architecture | trainable | tensors | floats | upload bytes / device / round | vs whole |")
    print("|---|---|---:|---:|---:|---:|")
    for name, arch in ARCHITECTURES.items():
        base = state_to_numpy(build_backbone(name, seed=0))
        whole = len(codec.encode(base))
        for groups in subsets(list(arch.parameter_groups)):
            names = trainable_names(base, resolve_trainable(name, groups))
            body = len(codec.encode({k: base[k] for k in names}))
            floats = sum(base[k].size for k in names)
            label = "whole model" if groups is None else ", ".join(groups)
            print(f"| {name} | {label} | {len(names)} | {floats:,} | {body:,} | {body / whole:.3f} |")


def measured() -> None:
    from simulator import SimulationConfig, simulate

    print("\n| run (small, 4 devices, 1 round) | MB sent by the devices | per device |")
    print("|---|---:|---:|")
    for trainable in (None, ["last_block", "embedding"], ["embedding"]):
        result = simulate(
            SimulationConfig(
                devices=4, rounds=1, model="small", ids_per_device=3, images_per_id=6, heldout_ids=10,
                workers=2, seed=1, progress=False, trainable=trainable,
            ),
            log=lambda _msg: None,
        )  # fmt: skip
        (r,) = result.rounds
        label = "whole model" if trainable is None else f"--trainable {','.join(trainable)}"
        print(f"| {label} | {r.mb_uploaded:.4f} | {r.mb_uploaded / r.reports * 1e6:,.0f} B |")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--measure", action="store_true", help="also run facefl simulate (about a minute)")
    args = parser.parse_args()
    computed()
    if args.measure:
        measured()


if __name__ == "__main__":
    main()

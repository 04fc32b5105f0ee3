"""The robust server step (a task's policy.robust): clipping and/or the trimmed mean over blob files."""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from contextlib import ExitStack
from typing import Any

import numpy as np
from safetensors import safe_open

from facefl import codec
from facefl.algorithms import robust
from facefl.algorithms.fedavg import WeightedMean
from server_api.services.context import ServiceContext


def robust_delta(
    ctx: ServiceContext,
    reports: Sequence[tuple[str, int, float]],
    config: Mapping[str, Any],
    exclude: Collection[str] = (),
) -> dict[str, np.ndarray]:
    """The aggregated delta of ``reports`` = (blob key, num_samples, norm) under ``config``, without the
    tensors named in ``exclude`` (the algorithm's update extras, e.g. FedFace's class embedding).

    Clipping factors come from the norms stored at intake (no extra pass over the blobs). Without
    trimming: a clipped weighted mean, streamed, O(model). With trimming: every report's blob is opened
    (memory-mapped) and the trimmed mean runs tensor by tensor, O(reports x largest tensor).
    """
    clip = config.get("clip_norm")
    scales = [robust.clip_scale(norm, float(clip)) if clip else 1.0 for _, _, norm in reports]
    trim = robust.trim_count(len(reports), float(config.get("trim_fraction") or 0.0))
    if trim == 0:
        mean = WeightedMean()
        for (key, num_samples, _), scale in zip(reports, scales, strict=True):
            tensors = codec.load_file(ctx.blobs.path(key))
            for name in exclude:  # not averaged
                tensors.pop(name, None)
            if scale != 1.0:
                tensors = {k: np.asarray(v, np.float32) * np.float32(scale) for k, v in tensors.items()}
            mean.add(tensors, float(num_samples))
        return mean.result()
    with ExitStack() as stack:
        files = [
            stack.enter_context(safe_open(str(ctx.blobs.path(key)), framework="np")) for key, _, _ in reports
        ]
        names = [name for name in files[0].keys() if name not in exclude]  # noqa: SIM118
        return robust.trimmed_mean_tensors(
            names, lambda i, name: files[i].get_tensor(name), len(files), trim, scales
        )

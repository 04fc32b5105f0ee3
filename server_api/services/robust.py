"""The robust server step (a task's policy.robust): clipping and/or the trimmed mean over blob files."""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from contextlib import ExitStack
from typing import Any

import numpy as np

from facefl import update_files
from facefl.algorithms import robust
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
    (memory-mapped, any update encoding) and the trimmed mean runs tensor by tensor, O(reports x largest
    tensor).
    """
    clip = config.get("clip_norm")
    scales = [robust.clip_scale(norm, float(clip)) if clip else 1.0 for _, _, norm in reports]
    trim = robust.trim_count(len(reports), float(config.get("trim_fraction") or 0.0))
    paths = [ctx.blobs.path(key) for key, _, _ in reports]
    if trim == 0:
        weights = [float(num_samples) for _, num_samples, _ in reports]
        return update_files.mean_of_files(paths, weights, factors=scales, exclude=exclude)
    with ExitStack() as stack:
        files = [stack.enter_context(update_files.UpdateFile(path)) for path in paths]
        names = [name for name in files[0].names if name not in exclude]
        return robust.trimmed_mean_tensors(
            names, lambda i, name: files[i].read(name), len(files), trim, scales
        )

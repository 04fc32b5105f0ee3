"""Backbone registry and the NumPy <-> module weight bridge.

Every backbone takes float32 NCHW images of shape (N, 3, S, S), preprocessed by its architecture's
:class:`facefl.data.Preprocessing` (``Architecture.preprocessing``, of size ``S == Architecture.image_size``),
and returns L2-normalised embeddings of shape (N, d). The wire format (and the server) only ever sees
:func:`state_to_numpy` output, so the server can aggregate without instantiating models.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from facefl.data.preprocess import Preprocessing
from facefl.losses import CosFaceHead
from facefl.models import dlib_resnet
from facefl.models.dlib_resnet import DlibResNet
from facefl.models.mobilefacenet import FastPReLU, MobileFaceNet
from facefl.models.small import SmallFaceNet
from facefl.models.tiny import TinyNet

__all__ = [
    "ARCHITECTURES",
    "Architecture",
    "CosFaceHead",
    "DlibResNet",
    "FastPReLU",
    "MobileFaceNet",
    "SmallFaceNet",
    "TinyNet",
    "backbone_from_weights",
    "backbone_state",
    "build_backbone",
    "get_architecture",
    "global_extra_prefixes",
    "load_numpy_state",
    "resolve_trainable",
    "state_to_numpy",
    "trainable_names",
]


@dataclass(frozen=True)
class Architecture:
    """A backbone kind: its input preprocessing (size and normalisation), its default embedding size and
    named groups of its parameters (group name -> parameter-name prefixes, for training a part only)."""

    name: str
    preprocessing: Preprocessing
    default_embedding_dim: int
    # group name -> prefixes of :func:`state_to_numpy` names ("features.5." covers a whole module, a name
    # without the trailing dot exactly one tensor). A task's ``trainable`` names groups: the device trains
    # those and uploads their deltas only; everything else stays at the base version's values.
    parameter_groups: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    @property
    def image_size(self) -> int:
        return self.preprocessing.image_size


ARCHITECTURES: dict[str, Architecture] = {
    "small": Architecture(
        "small",
        Preprocessing(64),
        default_embedding_dim=128,
        parameter_groups={
            "early": ("features.0.", "features.1.", "features.2.", "features.3.", "features.4."),
            "last_block": ("features.5.", "features.6."),  # the 8x8 -> 4x4 stage, 128 channels
            "embedding": ("gdconv.", "embedding.", "bn."),
        },
    ),
    # 128-d as in the MobileFaceNet paper (Chen et al. 2018); also keeps updates small on the wire.
    "mobilefacenet": Architecture(
        "mobilefacenet",
        Preprocessing(112),
        default_embedding_dim=128,
        parameter_groups={
            "early": ("conv1.", "dw_conv1.", *(f"bottlenecks.{i}." for i in range(12))),
            "last_block": ("bottlenecks.12.", "bottlenecks.13.", "bottlenecks.14.", "conv2."),  # 7x7 stage
            "embedding": ("gdconv.", "embedding.", "bn."),
        },
    ),
    # protocol benchmarks only (~1k floats), see facefl/models/tiny.py; its groups split the one layer so
    # that partial uploads can be measured on it too
    "tiny": Architecture(
        "tiny",
        Preprocessing(4),
        default_embedding_dim=20,
        parameter_groups={"weight": ("fc.weight",), "bias": ("fc.bias",)},
    ),
    # dlib's pretrained face ResNet (`facefl import-model dlib-resnet`), with dlib's own normalisation
    "dlib-resnet": Architecture(
        "dlib-resnet",
        dlib_resnet.DLIB_PREPROCESSING,
        default_embedding_dim=dlib_resnet.EMBEDDING_DIM,
        parameter_groups=dlib_resnet.PARAMETER_GROUPS,
    ),
}

_BUILDERS: dict[str, Callable[[int], nn.Module]] = {
    "small": lambda d: SmallFaceNet(embedding_dim=d),
    "mobilefacenet": lambda d: MobileFaceNet(embedding_dim=d),
    "tiny": lambda d: TinyNet(embedding_dim=d),
    "dlib-resnet": lambda d: DlibResNet(embedding_dim=d),
}


def get_architecture(architecture: str) -> Architecture:
    """The registry entry for ``architecture``; ValueError naming the known ones otherwise."""
    try:
        return ARCHITECTURES[architecture]
    except KeyError:
        known = ", ".join(sorted(ARCHITECTURES))
        raise ValueError(f"unknown architecture {architecture!r}; known architectures: {known}") from None


def build_backbone(architecture: str, embedding_dim: int | None = None, seed: int | None = None) -> nn.Module:
    """Instantiate a backbone. With ``seed`` the initial weights are reproducible across processes.

    The seed is applied inside a forked RNG so building a model never perturbs the caller's global
    torch random state.
    """
    arch = get_architecture(architecture)
    dim = arch.default_embedding_dim if embedding_dim is None else int(embedding_dim)
    if dim <= 0:
        raise ValueError(f"embedding_dim must be positive, got {dim}")
    if seed is None:
        return _BUILDERS[arch.name](dim)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _BUILDERS[arch.name](dim)


def state_to_numpy(module: nn.Module) -> dict[str, np.ndarray]:
    """The floating-point tensors of ``module.state_dict()`` as float32, CPU, contiguous copies.

    Integer buffers (BatchNorm's ``num_batches_tracked``) are skipped: they are bookkeeping, not
    weights, and averaging them across devices would be meaningless. BatchNorm running statistics are
    float buffers and are included, so that a global model evaluates with aggregated statistics.
    """
    out: dict[str, np.ndarray] = {}
    for name, tensor in module.state_dict().items():
        if tensor.is_floating_point():
            out[name] = np.array(
                tensor.detach().to("cpu", torch.float32).numpy(), dtype=np.float32, copy=True
            )
    return out


def global_extra_prefixes() -> tuple[str, ...]:
    """Name prefixes of the tensors a global model may carry next to its backbone (FedFR's public
    classifier), as the algorithms declare them. The backbone alone is what embeds faces: evaluation,
    export and embedding take ``backbone_state(weights)``."""
    # imported here, not at the top: the algorithms' local-training code builds on this module
    from facefl.algorithms.registry import global_extra_prefixes as declared

    return declared()


def resolve_trainable(architecture: str, groups: Sequence[str] | None) -> tuple[str, ...] | None:
    """The name prefixes of ``groups`` of ``architecture`` (None: the whole model trains).

    ValueError naming the unknown group and the known ones.
    """
    if groups is None:
        return None
    known = get_architecture(architecture).parameter_groups
    prefixes: list[str] = []
    for group in groups:
        if group not in known:
            listed = ", ".join(sorted(known)) or "none"
            raise ValueError(
                f"unknown parameter group {group!r} of architecture {architecture!r}; known groups: {listed}"
            )
        prefixes.extend(p for p in known[group] if p not in prefixes)
    return tuple(prefixes)


def trainable_names(names: Iterable[str], prefixes: Sequence[str] | None) -> list[str]:
    """The entries of ``names`` a device trains and uploads under ``prefixes`` (None: all of them).

    A prefix ending in "." covers every name under it, any other prefix exactly that name. A global
    model's extra tensors (:func:`global_extra_prefixes`: FedFR's public classifier) are algorithm state
    and always train.
    """
    if prefixes is None:
        return list(names)
    extras = global_extra_prefixes()

    def selected(name: str) -> bool:
        if name.startswith(extras):
            return True
        return any(name == p or (p.endswith(".") and name.startswith(p)) for p in prefixes)

    return [n for n in names if selected(n)]


def backbone_state(tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``tensors`` without the global model's non-backbone entries (see :func:`global_extra_prefixes`)."""
    extras = global_extra_prefixes()
    return {k: v for k, v in tensors.items() if not k.startswith(extras)}


def backbone_from_weights(
    architecture: str, embedding_dim: int | None, weights: Mapping[str, np.ndarray]
) -> nn.Module:
    """A backbone of ``architecture`` holding ``weights`` (a global model's extra entries are ignored)."""
    model = build_backbone(architecture, embedding_dim, seed=0)
    load_numpy_state(model, backbone_state(weights))
    return model


def load_numpy_state(module: nn.Module, tensors: Mapping[str, np.ndarray]) -> None:
    """Copy ``tensors`` (as produced by :func:`state_to_numpy`) into ``module`` in place.

    Strict: the names must be exactly the module's floating-point state entries and every shape must
    match; nothing is modified unless all of them do. Values are cast to each tensor's own dtype.
    """
    state = module.state_dict()
    expected = {name for name, t in state.items() if t.is_floating_point()}
    given = set(tensors)
    if given != expected:
        missing = sorted(expected - given)
        unexpected = sorted(given - expected)
        raise ValueError(
            "state mismatch: "
            f"missing {len(missing)} tensor(s) {missing[:5]}{'...' if len(missing) > 5 else ''}; "
            f"unexpected {len(unexpected)} tensor(s) {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    for name in sorted(expected):
        shape = tuple(np.shape(tensors[name]))
        if shape != tuple(state[name].shape):
            raise ValueError(
                f"shape mismatch for {name!r}: module has {tuple(state[name].shape)}, got {shape}"
            )
    with torch.no_grad():
        for name in expected:
            # native-endian contiguous float32; decoded wire payloads may be read-only, which torch
            # cannot wrap without a warning, so copy those.
            src = np.ascontiguousarray(tensors[name], dtype=np.float32)
            if not src.flags.writeable:
                src = src.copy()
            target = state[name]  # shares storage with the module's parameter / buffer
            target.copy_(torch.from_numpy(src).to(target.dtype))

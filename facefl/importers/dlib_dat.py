"""Read dlib's ``dlib_face_recognition_resnet_model_v1.dat`` into ``dlib-resnet`` weights, in NumPy only.

dlib's serialization (dlib/serialize.h, dlib/dnn/*.h), as far as this network needs it:

- an integer: one control byte (bit 7: negative; low 4 bits: how many bytes follow), then the magnitude's
  bytes, little-endian;
- a float: its mantissa (int64) then its exponent (int16), each an integer as above; value ``m * 2**e``
  (exponents 32000-32002 stand for inf, -inf and NaN);
- a string: its length (an integer), then its bytes; a bool: the ASCII byte ``'1'`` or ``'0'``;
- a tensor: version 2, then n, k, nr, nc, then n*k*nr*nc raw little-endian float32 values (NCHW);
  an alias tensor (a view into a layer's parameter tensor): version 1, then n, k, nr, nc.

A network is written from its loss layer inwards, each wrapper writing its version number before the
layer it wraps, so the file holds: the loss layer's version and details, the version of every layer from
the output side to the input side (a tag or skip layer is only that number), the input layer, then the
details of every layer from the input side out, each followed by its training bookkeeping (flags and
empty gradient tensors). The file does not describe its own structure, so the reader walks the known
``anet_type`` of dlib's ``examples/dnn_face_recognition_ex.cpp`` and checks every layer's type name and
hyperparameters on the way. The network's first string, its loss layer's type, tells this network from
dlib's other models.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from facefl.models.dlib_resnet import DLIB_PIXEL_MEAN, EMBEDDING_DIM, IMAGE_SIZE, LEVELS

__all__ = [
    "MODEL_FILE",
    "MODEL_PACKAGE",
    "DatReader",
    "DlibFormatError",
    "find_model_file",
    "read_face_resnet",
]

MODEL_PACKAGE = "face_recognition_models"
MODEL_FILE = "dlib_face_recognition_resnet_model_v1.dat"

_FLOAT_SPECIALS = {32000: np.inf, 32001: -np.inf, 32002: np.nan}
_CONV_MODE = 0
_FC_NO_BIAS = 1


class DlibFormatError(ValueError):
    """A dlib model file is missing, truncated, corrupt or holds another network (the message names it)."""


class DatReader:
    """Sequential reader of dlib's serialization format over bytes; errors name ``source``."""

    def __init__(self, data: bytes, source: str | Path = "<bytes>") -> None:
        self.data = memoryview(data)
        self.source = str(source)
        self.pos = 0

    def error(self, message: str) -> DlibFormatError:
        return DlibFormatError(f"{self.source}: {message} (at byte {self.pos} of {len(self.data)})")

    def _take(self, count: int, what: str) -> memoryview:
        if count < 0 or self.pos + count > len(self.data):
            raise self.error(f"file ends while reading {what}: truncated")
        chunk = self.data[self.pos : self.pos + count]
        self.pos += count
        return chunk

    def read_int(self, what: str = "an integer") -> int:
        control = self._take(1, what)[0]
        size = control & 0x0F
        # bits 4-6 are always 0 in dlib's encoding, and no integer it writes needs more than 8 bytes
        if control & 0x70 or not 1 <= size <= 8:
            self.pos -= 1
            raise self.error(f"corrupt: byte 0x{control:02x} cannot start {what}")
        value = int.from_bytes(self._take(size, what), "little")
        return -value if control & 0x80 else value

    def read_float(self, what: str = "a float") -> float:
        mantissa = self.read_int(f"the mantissa of {what}")
        exponent = self.read_int(f"the exponent of {what}")
        if exponent in _FLOAT_SPECIALS:
            return float(_FLOAT_SPECIALS[exponent])
        if not -(2**15) <= exponent < 2**15 or not -(2**63) <= mantissa < 2**63:
            raise self.error(f"corrupt: {what} out of range (mantissa {mantissa}, exponent {exponent})")
        return float(np.ldexp(np.float64(mantissa), exponent))

    def read_string(self, what: str = "a string", limit: int = 256) -> str:
        # every string in a network file is a short type name: a long one means the bytes are not one
        length = self.read_int(f"the length of {what}")
        if not 0 <= length <= limit:
            raise self.error(f"corrupt: {what} would be {length} bytes long")
        raw = bytes(self._take(length, what))
        try:
            return raw.decode("ascii")
        except UnicodeDecodeError:
            raise self.error(f"corrupt: {what} is not text ({raw[:20]!r})") from None

    def read_bool(self, what: str = "a bool") -> bool:
        byte = self._take(1, what)[0]
        if byte not in (ord("0"), ord("1")):
            self.pos -= 1
            raise self.error(f"corrupt: byte 0x{byte:02x} is not a bool ({what})")
        return byte == ord("1")

    def read_version(self, allowed: tuple[int, ...], what: str) -> int:
        version = self.read_int(f"the version of {what}")
        if version not in allowed:
            raise self.error(f"corrupt: {what} has version {version}, expected one of {list(allowed)}")
        return version

    def _dims(self, what: str) -> tuple[int, int, int, int]:
        n, k, nr, nc = (self.read_int(f"a dimension of {what}") for _ in range(4))
        if min(n, k, nr, nc) < 0:
            raise self.error(f"corrupt: {what} has negative dimensions {(n, k, nr, nc)}")
        return n, k, nr, nc

    def read_tensor(self, what: str = "a tensor") -> np.ndarray:
        """A float32 (n, k, nr, nc) array (a copy, native byte order)."""
        self.read_version((2,), what)
        dims = self._dims(what)
        count = int(np.prod(dims, dtype=np.int64))
        if count * 4 > len(self.data) - self.pos:
            raise self.error(f"file ends inside {what} of shape {dims}: truncated")
        raw = self._take(count * 4, what)
        return np.frombuffer(raw, dtype="<f4").astype(np.float32).reshape(dims)

    def read_alias(self, what: str = "an alias tensor") -> tuple[int, int, int, int]:
        self.read_version((1,), what)
        return self._dims(what)

    def expect(self, names: tuple[str, ...], what: str) -> str:
        name = self.read_string(f"the type of {what}")
        if name not in names:
            raise self.error(f"expected {what} ({' or '.join(names)}), found {name!r}")
        return name

    def at_end(self) -> bool:
        return self.pos == len(self.data)


# ------------------------------------------------------------------------------------ the network


@dataclass(frozen=True)
class _Layer:
    """One dlib layer of anet_type: its type, facefl parameter prefix and hyperparameters."""

    kind: str  # con | affine | relu | add_prev | avg_pool | max_pool | fc | tag | skip
    name: str = ""
    channels: int = 0
    kernel: int = 0
    stride: int = 1


def _residual(prefix: str, channels: int, down: bool) -> list[_Layer]:
    """dlib's ares / ares_down, output side first (the order their version numbers are written in)."""
    body = [
        _Layer("affine", f"{prefix}.affine2", channels),
        _Layer("con", f"{prefix}.conv2", channels, 3, 1),
        _Layer("relu"),
        _Layer("affine", f"{prefix}.affine1", channels),
        _Layer("con", f"{prefix}.conv1", channels, 3, 2 if down else 1),
        _Layer("tag"),
    ]
    if down:  # relu(add_prev2(avg_pool(skip1(tag2(block(tag1(x)))))))
        shortcut = [_Layer("avg_pool", kernel=2, stride=2), _Layer("skip"), _Layer("tag")]
        return [_Layer("relu"), _Layer("add_prev"), *shortcut, *body]
    return [_Layer("relu"), _Layer("add_prev"), *body]


def _anet_layers() -> list[_Layer]:
    """anet_type below its loss layer, output side first."""
    layers = [_Layer("fc", "fc", EMBEDDING_DIM), _Layer("avg_pool", kernel=0, stride=1)]
    for name, channels, down, blocks in reversed(LEVELS):
        for i in reversed(range(blocks)):
            layers += _residual(f"{name}.{i}", channels, down and i == 0)
    layers += [
        _Layer("max_pool", kernel=3, stride=2),
        _Layer("relu"),
        _Layer("affine", "stem.affine", 32),
        _Layer("con", "stem.conv", 32, 7, 2),
    ]
    return layers


def _read_con(r: DatReader, layer: _Layer, cin: int) -> dict[str, np.ndarray]:
    what = f"convolution {layer.name}"
    version = r.expect(("con_4", "con_5", "con_6"), what)
    params = r.read_tensor(f"the parameters of {what}")
    pad = layer.kernel // 2 if layer.stride == 1 else 0
    expected = (layer.channels, layer.kernel, layer.kernel, layer.stride, layer.stride, pad, pad)
    found = tuple(r.read_int(f"a hyperparameter of {what}") for _ in range(7))
    if found != expected:
        raise r.error(
            f"{what}: (filters, rows, columns, strides, paddings) are {found}, expected {expected}: "
            "not the network of dlib's face recognition model"
        )
    filters = r.read_alias(f"the filters of {what}")
    r.read_alias(f"the biases of {what}")
    for _ in range(4):
        r.read_float(f"a learning-rate setting of {what}")
    use_bias = r.read_bool(f"use_bias of {what}") if version in ("con_5", "con_6") else True
    if version == "con_6" and r.read_bool(f"use_relu of {what}"):
        raise r.error(f"{what} has a fused relu, which the dlib-resnet network does not have")
    shape = (layer.channels, cin, layer.kernel, layer.kernel)
    n_weights = int(np.prod(shape))
    n_bias = layer.channels if use_bias else 0
    if filters != shape or params.size != n_weights + n_bias:
        raise r.error(f"{what}: filters {filters} / {params.size} parameters do not fit weights {shape}")
    flat = params.reshape(-1)
    bias = flat[n_weights:] if use_bias else np.zeros(layer.channels, np.float32)
    return {f"{layer.name}.weight": flat[:n_weights].reshape(shape), f"{layer.name}.bias": bias.copy()}


def _read_affine(r: DatReader, layer: _Layer) -> dict[str, np.ndarray]:
    what = f"affine layer {layer.name}"
    version = r.expect(("affine_", "affine_2"), what)
    params = r.read_tensor(f"the parameters of {what}").reshape(-1)
    gamma = r.read_alias(f"the scale of {what}")
    beta = r.read_alias(f"the shift of {what}")
    mode = r.read_int(f"the mode of {what}")
    disabled = r.read_bool(f"disabled of {what}") if version == "affine_2" else False
    c = layer.channels
    if mode != _CONV_MODE:
        raise r.error(f"{what} is in fc mode, expected the per-channel (conv) mode")
    if disabled:  # dlib skips a disabled affine layer: the identity
        return {f"{layer.name}.weight": np.ones(c, np.float32), f"{layer.name}.bias": np.zeros(c, np.float32)}
    if gamma != (1, c, 1, 1) or beta != (1, c, 1, 1) or params.size != 2 * c:
        raise r.error(f"{what}: scale {gamma}, shift {beta}, {params.size} parameters; expected {c} channels")
    return {f"{layer.name}.weight": params[:c].copy(), f"{layer.name}.bias": params[c:].copy()}


def _read_pool(r: DatReader, layer: _Layer) -> None:
    kind = "max_pool_2" if layer.kind == "max_pool" else "avg_pool_2"
    what = f"{layer.kind} layer"
    r.expect((kind,), what)
    pad = layer.kernel // 2 if layer.stride == 1 else 0
    expected = (layer.kernel, layer.kernel, layer.stride, layer.stride, pad, pad)
    found = tuple(r.read_int(f"a hyperparameter of {what}") for _ in range(6))
    if found != expected:
        raise r.error(f"{what}: (rows, columns, strides, paddings) are {found}, expected {expected}")


def _read_fc(r: DatReader, layer: _Layer, n_in: int) -> dict[str, np.ndarray]:
    what = "the final fully connected layer"
    version = r.expect(("fc_2", "fc_3"), what)
    n_out = r.read_int(f"the outputs of {what}")
    n_in_found = r.read_int(f"the inputs of {what}")
    params = r.read_tensor(f"the parameters of {what}")
    r.read_alias(f"the weights of {what}")
    r.read_alias(f"the biases of {what}")
    bias_mode = r.read_int(f"the bias mode of {what}")
    for _ in range(4):
        r.read_float(f"a learning-rate setting of {what}")
    if version == "fc_3":
        r.read_bool(f"use_bias of {what}")
    if (n_out, n_in_found, bias_mode) != (layer.channels, n_in, _FC_NO_BIAS) or params.size != n_in * n_out:
        raise r.error(
            f"{what} maps {n_in_found} -> {n_out} (bias mode {bias_mode}, {params.size} parameters); "
            f"expected {n_in} -> {layer.channels} without bias"
        )
    # dlib stores (inputs, outputs) and computes x @ W: nn.Linear's weight is the transpose
    return {"fc.weight": np.ascontiguousarray(params.reshape(n_in, n_out).T)}


def _read_bookkeeping(r: DatReader, version: int, innermost: bool) -> None:
    """What add_layer writes after a layer's details: three flags and (empty) training tensors."""
    for flag in (
        "this_layer_setup_called",
        "gradient_input_is_stale",
        "get_output_and_gradient_input_disabled",
    ):
        r.read_bool(flag)
    r.read_tensor("a layer's input gradient")
    r.read_tensor("a layer's cached output")
    if innermost or version >= 2:
        r.read_tensor("a layer's parameter gradient")
    if innermost and version >= 3:
        r.read_int("the sample expansion factor")


def _read_input(r: DatReader) -> tuple[float, float, float]:
    r.expect(("input_rgb_image_sized",), "the input layer")
    means = (r.read_float("the red mean"), r.read_float("the green mean"), r.read_float("the blue mean"))
    size = (r.read_int("the input rows"), r.read_int("the input columns"))
    if size != (IMAGE_SIZE, IMAGE_SIZE):
        raise r.error(f"the input layer takes {size[0]}x{size[1]} images, expected {IMAGE_SIZE}x{IMAGE_SIZE}")
    if not np.allclose(means, DLIB_PIXEL_MEAN, rtol=0, atol=1e-3):
        raise r.error(f"the input layer subtracts {means}, not dlib's {DLIB_PIXEL_MEAN} (dlib-resnet's)")
    return means


def _parse(r: DatReader) -> dict[str, np.ndarray]:
    try:
        r.read_version((1,), "the network")
        loss = r.read_string("the loss layer's type")
    except DlibFormatError as exc:
        detail = str(exc).removeprefix(f"{r.source}: ")
        raise DlibFormatError(f"{r.source} is not a dlib network file ({detail})") from None
    if loss not in ("loss_metric_", "loss_metric_2"):
        raise r.error(
            f"holds another network (its loss layer is {loss!r}), not dlib's face recognition ResNet "
            f"(loss_metric_, {MODEL_FILE})"
        )
    if loss == "loss_metric_2":
        r.read_float("the loss margin")
        r.read_float("the loss distance threshold")

    layers = _anet_layers()
    versions = []
    for i, layer in enumerate(layers):
        if layer.kind in ("tag", "skip"):
            versions.append(r.read_version((1,), f"a {layer.kind} layer"))
        elif i == len(layers) - 1:  # the layer on the input layer: a different add_layer specialisation
            versions.append(r.read_version((2, 3), "the first layer"))
        else:
            versions.append(r.read_version((1, 2), f"a {layer.kind} layer"))
    _read_input(r)

    state: dict[str, np.ndarray] = {}
    channels = 3
    for i in reversed(range(len(layers))):  # details come input side first
        layer = layers[i]
        if layer.kind in ("tag", "skip"):
            continue
        if layer.kind == "con":
            state.update(_read_con(r, layer, channels))
        elif layer.kind == "affine":
            state.update(_read_affine(r, layer))
        elif layer.kind == "relu":
            if r.expect(("relu_", "relu_2"), "a relu layer") == "relu_2" and r.read_bool(
                "disabled of a relu"
            ):
                raise r.error("a relu layer is disabled, which the dlib-resnet network does not allow")
        elif layer.kind == "add_prev":
            r.expect(("add_prev_",), "a residual sum (add_prev)")
        elif layer.kind in ("max_pool", "avg_pool"):
            _read_pool(r, layer)
        elif layer.kind == "fc":
            state.update(_read_fc(r, layer, channels))
        channels = layer.channels or channels
        _read_bookkeeping(r, versions[i], innermost=i == len(layers) - 1)
    if not r.at_end():
        raise r.error(f"corrupt: {len(r.data) - r.pos} bytes after the end of the network")
    return state


def read_face_resnet(path: str | Path) -> dict[str, np.ndarray]:
    """dlib's face recognition ResNet file -> float32 tensors under ``dlib-resnet``'s parameter names."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DlibFormatError(f"{path}: no such file") from None
    except OSError as exc:
        raise DlibFormatError(f"{path}: cannot read it: {exc}") from None
    return _parse(DatReader(data, path))


def find_model_file() -> Path:
    """``dlib_face_recognition_resnet_model_v1.dat`` of the installed ``face_recognition_models`` package.

    The package is located, never imported: its ``__init__`` needs pkg_resources, which current setuptools
    no longer ships.
    """
    hint = f"install it (pip install 'facefl[pretrained]') or pass --dat PATH to the {MODEL_FILE}"
    spec = importlib.util.find_spec(MODEL_PACKAGE)
    candidates: list[Path] = []
    if spec is not None:
        for root in spec.submodule_search_locations or []:
            candidates.append(Path(root) / "models" / MODEL_FILE)
    try:
        dist = importlib.metadata.distribution(MODEL_PACKAGE)
        candidates += [Path(str(dist.locate_file(f))) for f in dist.files or [] if f.name == MODEL_FILE]
    except importlib.metadata.PackageNotFoundError:
        pass
    if spec is None and not candidates:
        raise DlibFormatError(f"{MODEL_FILE}: the {MODEL_PACKAGE} package is not installed; {hint}")
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    where = ", ".join(str(c) for c in candidates) or "its package directory"
    raise DlibFormatError(f"{MODEL_FILE}: not found in the {MODEL_PACKAGE} package ({where}); {hint}")

"""Identity-structured generated "faces": a dataset on which learning is measurable.

Each identity is a face-like drawing (oval, hair, eyes, brows, nose, mouth, a few marks) whose geometry
and colours are drawn from a generator seeded by ``(seed, identity)`` only, so identity 17 looks the same
on every device, in every process and at every image size. Each sample of an identity is that drawing
under strong nuisance variation shared by all identities: pose (shift, scale, rotation), expression
(mouth / eye shape), a random smooth background, lighting gradient, colour / brightness / contrast jitter,
an occasional occluder, grayscale, and pixel noise. The nuisance is deliberately larger than the
between-identity differences seen by an untrained network, so that rank-1 identification with random
features is poor and only learned (nuisance-invariant) features do well -- and because new identities come
from the same parametric family, features learned on some identities transfer to unseen ones.

Sample ``i`` of an identity is generated from its own generator (seeded by seed, identity, i and
``SYNTHETIC_VERSION``), so asking for more images never changes the first ones (a prefix is stable).

Calibration (``small`` backbone, 64x64, rank-1 identification on 20 unseen identities, gallery = mean of 5
images, 5 probes each, averaged over 3 disjoint groups of 20; two data seeds): random init 0.26-0.31;
after 5 epochs (375 steps, batch 32) of CosFace (s=30, m=0.4) training on 40 *other* identities x 60
images: 0.90-0.92. Chance is 0.05. Retune the ``_POSE_*`` / photometric ranges below together with
these numbers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

# Version of the drawing recipe: bump when the output of a given (seed, identity, i) changes.
SYNTHETIC_VERSION = 1

_SKIN = np.array(
    [[0.96, 0.80, 0.69], [0.91, 0.72, 0.58], [0.80, 0.60, 0.45], [0.64, 0.45, 0.32], [0.45, 0.30, 0.20]],
    dtype=np.float32,
)


@dataclass(frozen=True)
class _Identity:
    """Geometry and colours of one identity, in face coordinates (image spans [-1, 1])."""

    face_c: tuple[float, float]
    face_r: tuple[float, float]
    skin: np.ndarray
    hair: np.ndarray
    hairline: float
    hair_volume: float
    eye_y: float
    eye_dx: float
    eye_r: tuple[float, float]
    iris: np.ndarray
    brow_gap: float
    brow_tilt: float
    brow_thick: float
    nose_len: float
    nose_w: float
    mouth_y: float
    mouth_w: float
    mouth_h: float
    mouth_curve: float
    lips: np.ndarray
    marks: np.ndarray  # (k, 6): x, y (relative to the face radii), rx, ry, darkening, redness
    glasses: np.ndarray | None  # frame colour, or None


def _check_non_negative(name: str, value: int) -> int:
    value = int(value)
    if value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value}")
    return value


def _identity(identity: int, seed: int) -> _Identity:
    rng = np.random.default_rng([seed, identity, 0, SYNTHETIC_VERSION])
    u = rng.uniform
    skin_base = _SKIN[rng.integers(len(_SKIN))]
    skin = np.clip(skin_base + rng.normal(0, 0.05, 3), 0, 1).astype(np.float32)
    hair = np.clip(rng.uniform(0.0, 0.6) * rng.uniform(0.5, 1.0, 3), 0, 1).astype(np.float32)
    n_marks = int(rng.integers(2, 5))
    marks = np.stack(
        [
            u(-0.35, 0.35, n_marks),
            u(-0.4, 0.5, n_marks),
            u(0.03, 0.10, n_marks),
            u(0.03, 0.10, n_marks),
            u(-0.35, 0.35, n_marks),
            u(-0.2, 0.2, n_marks),
        ],
        axis=1,
    ).astype(np.float32)
    return _Identity(
        face_c=(u(-0.05, 0.05), u(-0.02, 0.08)),
        face_r=(u(0.45, 0.62), u(0.62, 0.82)),
        skin=skin,
        hair=hair,
        hairline=u(-0.65, -0.2),
        hair_volume=u(1.02, 1.25),
        eye_y=u(-0.28, -0.08),
        eye_dx=u(0.16, 0.30),
        eye_r=(u(0.06, 0.12), u(0.03, 0.07)),
        iris=np.clip(rng.uniform(0.0, 0.6, 3), 0, 1).astype(np.float32),
        brow_gap=u(0.07, 0.16),
        brow_tilt=u(-0.3, 0.3),
        brow_thick=u(0.015, 0.045),
        nose_len=u(0.12, 0.28),
        nose_w=u(0.04, 0.10),
        mouth_y=u(0.25, 0.48),
        mouth_w=u(0.12, 0.30),
        mouth_h=u(0.025, 0.06),
        mouth_curve=u(-0.6, 0.6),
        lips=np.clip(skin * np.array([u(0.6, 1.0), u(0.3, 0.7), u(0.3, 0.7)]), 0, 1).astype(np.float32),
        marks=marks,
        glasses=rng.uniform(0, 0.5, 3).astype(np.float32) if rng.random() < 0.3 else None,
    )


# ---- per-sample nuisance ranges (calibrated, see module docstring) ----
_POSE_SHIFT = 0.08  # max |translation|, fraction of the half-width
_POSE_LOG_SCALE = 0.1  # scale in exp([-x, x])
_POSE_ANGLE = 0.12  # radians
_GAIN = (0.85, 1.15)  # per-channel colour gain
_CONTRAST = (0.7, 1.3)
_BRIGHTNESS = 0.15
_LIGHT = 0.45  # max amplitude of the linear lighting gradient
_OCCLUDER_P = 0.2
_GRAY_P = 0.15
_NOISE = (0.01, 0.06)  # pixel noise std range, in [0, 1] intensity units
_N_UNIFORMS = 22  # scalar per-sample draws, in a fixed order (see _render)


def _interp_matrix(size: int, cells: int) -> np.ndarray:
    """(size, cells) bilinear interpolation weights from a cells-point grid to size points."""
    pos = np.linspace(0, cells - 1, size, dtype=np.float32)
    i0 = np.minimum(pos.astype(np.int64), cells - 2)
    w = pos - i0
    mat = np.zeros((size, cells), dtype=np.float32)
    mat[np.arange(size), i0] = 1 - w
    mat[np.arange(size), i0 + 1] = w
    return mat


class _Canvas:
    """A batch of n images sharing one drawing, each under its own similarity transform (pose).

    Images are channels-first (n, 3, S, S) while drawing: NumPy's inner loops then run along image rows
    instead of over 3 colour values, which is several times faster.

    Shapes are evaluated only inside a window covering that shape in every sample, which makes small
    features (eyes, marks) cheap.
    """

    def __init__(self, img: np.ndarray, tx: np.ndarray, ty: np.ndarray, scale: np.ndarray, angle: np.ndarray):
        self.img = img
        self.size = img.shape[-1]
        self.grid = (np.arange(self.size, dtype=np.float32) + 0.5) / self.size * 2 - 1
        col = (slice(None), None, None)
        self.tx, self.ty, self.scale = tx[col], ty[col], scale[col]
        self.cos, self.sin = np.cos(angle)[col], np.sin(angle)[col]
        self.edge = (1.5 * 2.0 / self.size) / self.scale  # ~1.5 px of anti-aliasing, in face units

    def window(self, cx: float, cy: float, radius: float) -> tuple[slice, slice]:
        """Pixel rows/cols containing the face-coordinate disc ((cx, cy), radius) in every sample."""
        px = self.scale * (self.cos * cx - self.sin * cy) + self.tx
        py = self.scale * (self.sin * cx + self.cos * cy) + self.ty
        r = radius * self.scale + 4.0 / self.size

        def bounds(p: np.ndarray) -> slice:
            lo = int(np.floor((float((p - r).min()) + 1) / 2 * self.size - 0.5))
            hi = int(np.ceil((float((p + r).max()) + 1) / 2 * self.size - 0.5)) + 1
            return slice(max(lo, 0), max(min(hi, self.size), 0))

        return bounds(py), bounds(px)

    def coords(self, rows: slice, cols: slice) -> tuple[np.ndarray, np.ndarray]:
        """Face coordinates (u, v), each (n, h, w), of the pixels in the window."""
        xs = (self.grid[cols][None, None, :] - self.tx) / self.scale
        ys = (self.grid[rows][None, :, None] - self.ty) / self.scale
        return self.cos * xs + self.sin * ys, -self.sin * xs + self.cos * ys

    def paint(self, rows: slice, cols: slice, mask: np.ndarray, colour: np.ndarray | float) -> None:
        """Alpha-blend ``colour`` into the window where ``mask`` (n, h, w) is in [0, 1]."""
        region = self.img[:, :, rows, cols]  # a view: updated in place
        colour = np.asarray(colour, dtype=np.float32).reshape(1, -1, 1, 1)
        region += mask[:, None] * (colour - region)

    def ellipse(
        self,
        cx: float,
        cy: float,
        rx: float | np.ndarray,
        ry: float | np.ndarray,
        colour: np.ndarray | float,
        alpha: float = 1.0,
    ) -> None:
        rows, cols = self.window(cx, cy, float(max(np.max(rx), np.max(ry))))
        if rows.start >= rows.stop or cols.start >= cols.stop:
            return
        u, v = self.coords(rows, cols)
        self.paint(rows, cols, alpha * _ellipse_mask(u, v, cx, cy, rx, ry, self.edge), colour)


def _ellipse_mask(
    u: np.ndarray,
    v: np.ndarray,
    cx: float,
    cy: float,
    rx: float | np.ndarray,
    ry: float | np.ndarray,
    edge: np.ndarray,
) -> np.ndarray:
    """Soft ellipse: 1 inside, 0 outside, a linear ramp about ``edge`` wide at the border."""
    r = np.sqrt(((u - cx) / rx) ** 2 + ((v - cy) / ry) ** 2)
    return np.clip((1.0 - r) * np.minimum(rx, ry) / edge + 0.5, 0.0, 1.0)


def _render(ident: _Identity, identity: int, indices: range, image_size: int, seed: int) -> np.ndarray:
    n, size = len(indices), image_size
    # One generator per sample: sample i does not depend on how many samples were requested.
    rngs = [np.random.default_rng([seed, identity, 1, SYNTHETIC_VERSION, i]) for i in indices]
    p = np.array([r.random(_N_UNIFORMS) for r in rngs], dtype=np.float32)  # (n, K) in [0, 1)

    def span(k: int, lo: float, hi: float) -> np.ndarray:
        return (lo + (hi - lo) * p[:, k]).astype(np.float32)

    # ---- background: smooth random colour field mixed with a flat colour (same law for all) ----
    img = np.empty((n, 3, size, size), dtype=np.float32)
    mix = span(0, 0.3, 1.0)
    for k, r in enumerate(rngs):
        cells = 2 + int(p[k, 1] * 4)
        mat = _interp_matrix(size, cells)
        field = np.tensordot(mat, r.random((cells, cells * 3), dtype=np.float32), axes=1)  # (S, cells*3)
        field = np.tensordot(mat, field.reshape(size, cells, 3), axes=([1], [1]))  # (S, S, 3) as (x, y, c)
        flat = r.random(3, dtype=np.float32)[:, None, None]
        img[k] = mix[k] * field.transpose(2, 1, 0) + (1 - mix[k]) * flat

    # ---- pose and expression ----
    canvas = _Canvas(
        img,
        tx=span(2, -_POSE_SHIFT, _POSE_SHIFT),
        ty=span(3, -_POSE_SHIFT, _POSE_SHIFT),
        scale=np.exp(span(4, -_POSE_LOG_SCALE, _POSE_LOG_SCALE)),
        angle=span(5, -_POSE_ANGLE, _POSE_ANGLE),
    )
    col = (slice(None), None, None)
    mouth_w = ident.mouth_w * span(6, 0.85, 1.2)[col]
    mouth_h = ident.mouth_h * span(7, 0.7, 1.6)[col]
    mouth_curve = ident.mouth_curve + span(8, -0.3, 0.3)[col]
    eye_open = span(9, 0.5, 1.15)[col]

    fx, fy = ident.face_c
    frx, fry = ident.face_r
    # hair: a larger ellipse behind the upper part of the face
    rows, cols = canvas.window(fx, fy, max(frx, fry) * 1.3)
    u, v = canvas.coords(rows, cols)
    hair = _ellipse_mask(u, v, fx, fy - 0.05, frx * ident.hair_volume, fry * 1.05, canvas.edge)
    hair *= np.clip((fy + 0.1 - v) / canvas.edge + 0.5, 0, 1)
    canvas.paint(rows, cols, hair, ident.hair)
    # face oval, then the fringe (the oval above the hairline)
    face = _ellipse_mask(u, v, fx, fy, frx, fry, canvas.edge)
    canvas.paint(rows, cols, face, ident.skin)
    fringe = face * np.clip((fy + ident.hairline * fry - v) / canvas.edge + 0.5, 0, 1)
    canvas.paint(rows, cols, fringe, ident.hair)
    # identity marks (patches of darker / redder skin)
    for mx, my, mrx, mry, dark, red in ident.marks:
        colour = np.clip(ident.skin * (1 - dark) + np.array([red, 0, -red], np.float32), 0, 1)
        canvas.ellipse(fx + mx * frx, fy + my * fry, mrx, mry, colour, alpha=0.85)
    # eyes (white, iris), brows, optional glasses
    erx, ery = ident.eye_r
    for side in (-1.0, 1.0):
        ex, ey = fx + side * ident.eye_dx, fy + ident.eye_y
        canvas.ellipse(ex, ey, erx, ery * eye_open, 0.95)
        canvas.ellipse(ex, ey, ery * 0.9, ery * 0.9 * eye_open, ident.iris)
        bx, by = ex, ey - ident.brow_gap
        rows, cols = canvas.window(bx, by, erx * 1.4 + ident.brow_thick + 0.1)
        u, v = canvas.coords(rows, cols)
        line = by + side * ident.brow_tilt * (u - bx)
        brow = np.clip((ident.brow_thick - np.abs(v - line)) / canvas.edge + 0.5, 0, 1)
        brow *= np.clip((erx * 1.3 - np.abs(u - bx)) / canvas.edge + 0.5, 0, 1)
        canvas.paint(rows, cols, brow, ident.hair * 0.8)
        if ident.glasses is not None:
            radius = erx * 1.45
            rows, cols = canvas.window(ex, ey, radius + 0.03)
            u, v = canvas.coords(rows, cols)
            ring = np.abs(np.sqrt((u - ex) ** 2 + (v - ey) ** 2) - radius)
            canvas.paint(rows, cols, np.clip((0.018 - ring) / canvas.edge + 0.5, 0, 1), ident.glasses)
    # nose: a darker vertical ellipse
    canvas.ellipse(
        fx, fy + ident.nose_len * 0.5 - 0.05, ident.nose_w, ident.nose_len * 0.5, ident.skin * 0.7, 0.6
    )
    # mouth: a band along a parabola; identity curvature plus expression
    my = fy + ident.mouth_y
    reach = float(np.max(mouth_w) * (1 + np.max(np.abs(mouth_curve))) + np.max(mouth_h))
    rows, cols = canvas.window(fx, my, reach)
    u, v = canvas.coords(rows, cols)
    mv = v - my - mouth_curve * (u - fx) ** 2 / mouth_w
    mouth = np.clip((mouth_h - np.abs(mv)) / canvas.edge + 0.5, 0, 1)
    mouth *= np.clip((mouth_w - np.abs(u - fx)) / canvas.edge + 0.5, 0, 1)
    canvas.paint(rows, cols, mouth, ident.lips)

    # ---- photometric nuisance ----
    grid = canvas.grid
    for k, r in enumerate(rngs):
        if p[k, 10] < _OCCLUDER_P:  # occluder: a flat rectangle (hand, scarf, sticker...)
            cy, cx = -0.8 + 1.6 * p[k, 11], -0.8 + 1.6 * p[k, 12]
            hh, hw = 0.1 + 0.3 * p[k, 13], 0.1 + 0.3 * p[k, 14]
            rows_mask = np.abs(grid - cy) < hh
            cols_mask = np.abs(grid - cx) < hw
            img[k][np.ix_(np.arange(3), rows_mask, cols_mask)] = r.random(3, dtype=np.float32)[:, None, None]
    theta = span(15, 0, 2 * np.pi)[col]
    light = 1.0 + span(16, 0, _LIGHT)[col] * (
        np.cos(theta) * grid[None, None, :] + np.sin(theta) * grid[None, :, None]
    )
    img *= light[:, None]
    gains = np.array([r.uniform(*_GAIN, 3) for r in rngs], dtype=np.float32)[:, :, None, None]
    mean = img.mean(axis=(1, 2, 3), keepdims=True)
    contrast = span(17, *_CONTRAST)[:, None, None, None]
    bright = span(18, -_BRIGHTNESS, _BRIGHTNESS)[:, None, None, None]
    # (img * gain - mean) * contrast + mean + bright, folded into one multiply-add
    img *= gains * contrast
    img += mean * (1 - contrast) + bright
    gray = p[:, 19] < _GRAY_P
    img[gray] = img[gray].mean(axis=1, keepdims=True)
    sigma = span(20, *_NOISE)
    for k, r in enumerate(rngs):
        img[k] += sigma[k] * r.standard_normal((3, size, size), dtype=np.float32)
    img *= 255.0
    img += 0.5
    np.clip(img, 0.0, 255.0, out=img)
    return np.ascontiguousarray(img.astype(np.uint8).transpose(0, 2, 3, 1))


def synthetic_identity_images(identity: int, count: int, image_size: int, seed: int = 0) -> np.ndarray:
    """``count`` images of one identity, (count, S, S, 3) uint8 RGB; deterministic in all arguments."""
    identity = _check_non_negative("identity", identity)
    seed = _check_non_negative("seed", seed)
    count = _check_non_negative("count", count)
    if image_size < 8:
        raise ValueError(f"image_size must be at least 8, got {image_size}")
    if count == 0:
        return np.zeros((0, image_size, image_size, 3), dtype=np.uint8)
    return _render(_identity(identity, seed), identity, range(count), int(image_size), seed)


def make_synthetic_dataset(
    identities: Sequence[int], images_per_identity: int, image_size: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, S, S, 3) uint8 and labels (N,) int64, the label being the index into ``identities``."""
    if len(set(identities)) != len(identities):
        raise ValueError("identities must be distinct")
    images = np.zeros((len(identities) * images_per_identity, image_size, image_size, 3), dtype=np.uint8)
    labels = np.repeat(np.arange(len(identities), dtype=np.int64), images_per_identity)
    for k, identity in enumerate(identities):
        lo = k * images_per_identity
        images[lo : lo + images_per_identity] = synthetic_identity_images(
            identity, images_per_identity, image_size, seed
        )
    return images, labels


def write_image_folder(
    root: str | Path,
    identities: Sequence[int],
    images_per_identity: int,
    image_size: int = 112,
    seed: int = 0,
) -> Path:
    """Write ``<root>/id_<identity>/<i>.png`` files (the layout :class:`ImageFolder` reads); returns root."""
    root = Path(root)
    for identity in identities:
        folder = root / f"id_{int(identity):06d}"
        folder.mkdir(parents=True, exist_ok=True)
        for i, image in enumerate(synthetic_identity_images(identity, images_per_identity, image_size, seed)):
            Image.fromarray(image).save(folder / f"{i:05d}.png")
    return root

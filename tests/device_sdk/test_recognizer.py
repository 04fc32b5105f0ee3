"""device_sdk.Recognizer on real ONNX Runtime sessions of tiny exported models and generated faces."""

from __future__ import annotations

import sqlite3
import stat
import threading
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from PIL import Image

from device_sdk import (
    Identification,
    MultipleFaces,
    NoFaceFound,
    Recognizer,
    RecognizerError,
    UnknownPerson,
    Verification,
)
from device_sdk.align import detection_available
from device_sdk.recognizer import CALIBRATION_MARGIN, DEFAULT_THRESHOLD, calibrate_threshold
from export.onnx import export_onnx, load_generic, set_metadata
from export.personalize import refresh_recognizer
from facefl.embedders import OnnxEmbedder
from facefl.stranger_bank import STRANGER_BANK_KEY, decode_stranger_bank, encode_stranger_bank
from tests.export.helpers import faces, write_checkpoint, write_device_state

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two different exported generic models (A, B)."""
    root = tmp_path_factory.mktemp("models")
    a = export_onnx(load_generic(write_checkpoint(root / "a.safetensors", seed=0)), root / "a.onnx")
    b = export_onnx(load_generic(write_checkpoint(root / "b.safetensors", seed=1)), root / "b.onnx")
    return a, b


def _template(embedder: OnnxEmbedder, images: np.ndarray) -> np.ndarray:
    mean = embedder.embed(images).mean(axis=0)
    return mean / np.linalg.norm(mean)


def test_enroll_identify_verify_match_independent_computation(
    models: tuple[Path, Path], tmp_path: Path
) -> None:
    model, _ = models
    gallery = {name: faces(range(k, k + 1), 3, seed=0) for k, name in enumerate(["carol", "alice", "bob"])}
    probe = faces(range(1, 2), 1, seed=4)[0]  # a new image of alice's identity
    with Recognizer(model, store=tmp_path / "g.db", threshold=0.3) as rec:
        for name, images in gallery.items():
            assert rec.enroll(name, list(images)) == 3
        assert rec.people() == ["alice", "bob", "carol"] and rec.image_count("bob") == 3
        assert rec.image_size == 64 and rec.threshold_info.source == "fixed"

        ref = OnnxEmbedder(model)
        p = ref.embed(probe[None])[0]
        expected = {name: float(p @ _template(ref, images)) for name, images in gallery.items()}
        result = rec.verify(probe, "bob")
        assert isinstance(result, Verification)
        assert result.score == pytest.approx(expected["bob"], abs=1e-5)
        assert result.accepted == (result.score >= 0.3) and result.threshold == 0.3
        ident = rec.identify(probe)
        best = max(expected, key=lambda n: expected[n])
        assert isinstance(ident, Identification) and ident.best_match == best
        assert ident.score == pytest.approx(expected[best], abs=1e-5)
        assert ident.person == (best if expected[best] >= 0.3 else None)
        # an enrolled person's own images are closest to their own template
        for name, images in gallery.items():
            assert [r.best_match for r in rec.identify_many(list(images))] == [name] * 3
        many = rec.verify_many(list(gallery["alice"]), "alice")
        assert [r.person for r in many] == ["alice"] * 3 and all(r.score > 0.5 for r in many)


def test_image_inputs_paths_pil_and_arrays_agree(models: tuple[Path, Path], tmp_path: Path) -> None:
    model, _ = models
    image = faces(range(2), 1, size=90)  # not the model's size: resized by its preprocessing
    path = tmp_path / "probe.png"
    Image.fromarray(image[0]).save(path)
    with Recognizer(model, store=tmp_path / "g.db", threshold=0.5) as rec:
        rec.enroll("x", [image[1]])
        scores = [rec.verify(img, "x").score for img in (path, str(path), Image.open(path), image[0])]
        assert max(scores) - min(scores) < 1e-6
        gray = Image.fromarray(image[0]).convert("L")  # any PIL mode is converted to RGB
        assert -1.0 <= rec.verify(gray, "x").score <= 1.0


def test_bad_inputs_are_clear_errors(models: tuple[Path, Path], tmp_path: Path) -> None:
    model, _ = models
    not_image = tmp_path / "notes.jpg"
    not_image.write_text("not an image")
    with Recognizer(model, store=tmp_path / "g.db") as rec:
        ok = faces(range(1), 1)[0]
        with pytest.raises(RecognizerError, match="the image list is empty"):
            rec.enroll("a", [])
        with pytest.raises(RecognizerError, match="dtype float32"):
            rec.enroll("a", [ok.astype(np.float32)])
        with pytest.raises(RecognizerError, match=r"HxWx3 uint8 RGB array, got shape \(64, 64\)"):
            rec.enroll("a", [ok[..., 0]])
        with pytest.raises(RecognizerError, match=r"notes\.jpg is not a readable image file"):
            rec.enroll("a", [ok, not_image])
        with pytest.raises(RecognizerError, match="does not exist"):
            rec.identify(tmp_path / "missing.png")
        with pytest.raises(RecognizerError, match="wrap a single image in a list"):
            rec.enroll("a", ok)  # type: ignore[arg-type]
        with pytest.raises(RecognizerError, match="non-empty name"):
            rec.enroll(" ", [ok])
        with pytest.raises(RecognizerError, match="got int"):
            rec.identify(3)  # type: ignore[arg-type]
        assert rec.people() == []  # nothing was stored by the failed calls
        with pytest.raises(UnknownPerson, match="'nobody' is not enrolled"):
            rec.verify(ok, "nobody")
        with pytest.raises(UnknownPerson):
            rec.forget("nobody")
        assert rec.identify(ok) == Identification(None, -1.0, rec.threshold, None)  # empty gallery
    with pytest.raises(RecognizerError, match="closed"):
        rec.identify(ok)
    with pytest.raises(RecognizerError, match="target_far"):
        Recognizer(model, store=tmp_path / "g.db", target_far=0.0)


def _tiny_graph(path: Path, input_shape: list[int | str]) -> Path:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, input_shape)
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_models_without_nchw_input_are_refused(tmp_path: Path) -> None:
    with pytest.raises(RecognizerError, match="needs NCHW input"):
        Recognizer(_tiny_graph(tmp_path / "nhwc.onnx", ["N", 16, 16, 3]), store=tmp_path / "g.db")
    with pytest.raises(RecognizerError, match="does not exist"):
        Recognizer(tmp_path / "missing.onnx", store=tmp_path / "g.db")
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not a model")
    with pytest.raises(RecognizerError, match="cannot use"):
        Recognizer(garbage, store=tmp_path / "g.db")


def test_foreign_model_gets_default_preprocessing(tmp_path: Path) -> None:
    """Any NCHW model works: this one just averages pixels per channel (no facefl metadata)."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 24, 24])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])
    node = helper.make_node("ReduceMean", ["x", "axes"], ["y"], keepdims=0)
    axes = helper.make_tensor("axes", TensorProto.INT64, [2], [2, 3])
    graph = helper.make_graph([node], "mean", [x], [y], initializer=[axes])
    path = tmp_path / "mean.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    red = np.zeros((40, 40, 3), np.uint8)
    red[..., 0] = 255
    with Recognizer(path, store=tmp_path / "g.db", threshold=0.9) as rec:
        assert rec.image_size == 24
        rec.enroll("red", [red])
        # (255/255 - 0.5)/0.5 = 1 and (0 - 0.5)/0.5 = -1: the embedding is (1, -1, -1)/sqrt(3)
        blue = red[..., ::-1].copy()
        assert rec.verify(blue, "red").score == pytest.approx(-1.0 / 3.0, abs=1e-5)
        assert rec.verify(red, "red").score == pytest.approx(1.0, abs=1e-6)


def test_threshold_calibration_rule() -> None:
    # two unit 2-d "embeddings" per person, at distinct angles: impostor cosines are known and distinct
    angles = np.sort(np.random.default_rng(0).uniform(0.0, 3.0, 6))
    emb = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    labels = np.array([0, 0, 1, 1, 2, 2])
    impostor = sorted(
        (float(emb[i] @ emb[j]) for i in range(6) for j in range(i + 1, 6) if labels[i] != labels[j]),
        reverse=True,
    )
    assert len(impostor) == 12
    t = calibrate_threshold(emb, labels, 0.25, 0.5, "default")  # floor(0.25 * 12) = 3 accepted at most
    assert t.source == "calibrated" and t.impostor_pairs == 12
    # the middle of the gap between the 4th highest (rejected) and the 3rd (accepted), at most 1e-3 above
    expected = impostor[3] + min((impostor[2] - impostor[3]) / 2, CALIBRATION_MARGIN)
    assert t.value == pytest.approx(expected, abs=1e-6)
    assert len(set(impostor)) == 12 and sum(s >= t.value for s in impostor) == 3
    too_few = calibrate_threshold(emb, labels, 0.01, 0.37, "model default")  # needs 100 pairs
    assert (too_few.value, too_few.source, too_few.impostor_pairs) == (0.37, "model default", 12)


def test_threshold_sits_in_the_gap_with_a_bounded_margin() -> None:
    # 1-d "embeddings" +-1 give cosines of exactly +-1; with two 2-d people the impostor cosines are known
    emb = np.array([[1.0, 0.0], [0.6, 0.8], [0.8, 0.6], [0.0, 1.0]], dtype=np.float32)
    labels = np.array([0, 0, 1, 1])
    # impostor pairs: (0,2)=0.8, (0,3)=0.0, (1,2)=0.96, (1,3)=0.8 -> sorted 0.96, 0.8, 0.8, 0.0
    t = calibrate_threshold(emb, labels, 0.25, 0.5, "default")  # k = 1: accept 0.96 only
    assert t.value == pytest.approx(0.8 + CALIBRATION_MARGIN, abs=1e-6)  # gap 0.16: capped margin
    # the highest impostor 5e-5 above the next: a gap far below the margin, so the threshold is its middle
    phi = np.arccos(0.8)
    angles = np.array([0.0, phi - np.arccos(0.80005), phi, np.pi / 2])
    close = np.stack([np.cos(angles), np.sin(angles)], axis=1)  # impostors 0.80005, 0.8, ~7e-5, 0
    t = calibrate_threshold(close, labels, 0.25, 0.5, "default")
    assert t.value == pytest.approx(0.800025, abs=1e-6)


def test_calibrated_threshold_and_fallbacks(models: tuple[Path, Path], tmp_path: Path) -> None:
    model, _ = models
    with Recognizer(model, store=tmp_path / "g.db", target_far=0.05) as rec:
        assert rec.threshold_info.source == "default" and rec.threshold == DEFAULT_THRESHOLD
        images = {f"p{k}": faces(range(k, k + 1), 5, seed=1) for k in range(4)}
        for name, imgs in images.items():
            rec.enroll(name, list(imgs))
        info = rec.threshold_info
        assert info.source == "calibrated" and info.impostor_pairs == 6 * 25
        emb = OnnxEmbedder(model).embed(np.concatenate(list(images.values())))
        labels = np.repeat(np.arange(4), 5)
        scores = emb @ emb.T
        pairs = np.triu(labels[:, None] != labels[None, :], k=1)
        # recomputed outside the Recognizer (another batch, no PNG round trip): compare with a tolerance
        # far above float noise, so no pair sits on the boundary
        assert (scores[pairs] >= info.value + 1e-4).mean() <= 0.05
        assert (scores[pairs] >= info.value - CALIBRATION_MARGIN - 1e-4).mean() > 0.05  # the tightest one
        rec.forget("p3")
        rec.forget("p2")
        assert rec.threshold_info.impostor_pairs == 25 and rec.threshold_info.source == "calibrated"
        rec.forget("p1")  # one person left: no impostor pairs, back to the default
        assert (rec.threshold_info.source, rec.threshold_info.impostor_pairs) == ("default", 0)
    # a model carrying a default threshold in its metadata is used when there is too little data
    meta_model = export_onnx(
        load_generic(write_checkpoint(tmp_path / "m.safetensors")),
        tmp_path / "m.onnx",
        default_threshold=0.61,
    )
    with Recognizer(meta_model, store=tmp_path / "g2.db") as rec:
        assert (rec.threshold, rec.threshold_info.source) == (0.61, "model default")


def test_a_malformed_stranger_bank_is_refused_naming_the_file(tmp_path: Path) -> None:
    model = export_onnx(load_generic(write_checkpoint(tmp_path / "m.safetensors")), tmp_path / "m.onnx")
    dim = OnnxEmbedder(model).embed(faces(range(1), 1)).shape[1]
    set_metadata(model, {STRANGER_BANK_KEY: "{truncated"})
    with pytest.raises(RecognizerError, match=f"{model}: bad {STRANGER_BANK_KEY} metadata: .*not JSON"):
        Recognizer(model, store=tmp_path / "g.db")
    set_metadata(model, {STRANGER_BANK_KEY: encode_stranger_bank(np.eye(dim + 1))})
    with pytest.raises(RecognizerError, match=f"holds {dim + 1}-d embeddings, the model outputs {dim}-d"):
        Recognizer(model, store=tmp_path / "g.db")
    assert not (tmp_path / "g.db").exists()  # refused before the gallery was created
    # a valid bank of the right width is used from the first enrolled person on
    bank = np.random.default_rng(0).normal(size=(40, dim))
    set_metadata(model, {STRANGER_BANK_KEY: encode_stranger_bank(bank)})
    with Recognizer(model, store=tmp_path / "g.db", target_far=0.05) as rec:
        assert rec.threshold_info.source == "default"  # no one enrolled yet
        rec.enroll("p0", list(faces(range(1), 2)))
        assert (rec.threshold_info.source, rec.threshold_info.strangers) == ("strangers", 40)


def test_gallery_persists_privately_and_forget_erases(models: tuple[Path, Path], tmp_path: Path) -> None:
    model, _ = models
    store = tmp_path / "g.db"
    probe = faces(range(3), 1, seed=2)[0]
    with Recognizer(model, store=store, threshold=0.4) as rec:
        rec.enroll("a", list(faces(range(0, 1), 2)))
        rec.enroll("b", list(faces(range(1, 2), 2)))
        rec.enroll("a", list(faces(range(0, 1), 3, seed=3)))  # adds to a
        before = rec.identify(probe)
        assert rec.image_count("a") == 5
    assert stat.S_IMODE(store.stat().st_mode) == 0o600  # biometric data: owner only
    with Recognizer(model, store=store, threshold=0.4) as rec:
        assert rec.people() == ["a", "b"] and rec.identify(probe) == before
        rec.forget("a")
        assert rec.people() == ["b"]
        with pytest.raises(UnknownPerson):
            rec.verify(probe, "a")
    with sqlite3.connect(store) as db:
        assert db.execute("SELECT COUNT(*) FROM faces").fetchone() == (2,)
        assert db.execute("SELECT name FROM people").fetchall() == [("b",)]
        crop = db.execute("SELECT crop_png FROM faces LIMIT 1").fetchone()[0]
        assert crop[:8] == b"\x89PNG\r\n\x1a\n"  # the aligned crop is kept to re-embed later


def test_reopening_with_another_model_reembeds(models: tuple[Path, Path], tmp_path: Path) -> None:
    a, b = models
    images = faces(range(2), 2)
    probe = faces(range(5), 1, seed=6)[0]
    with Recognizer(a, store=tmp_path / "g.db", threshold=0.4) as rec:
        rec.enroll("x", list(images[:2]))
    with Recognizer(b, store=tmp_path / "g.db", threshold=0.4) as rec:
        ref = OnnxEmbedder(b)
        expected = float(ref.embed(probe[None])[0] @ _template(ref, images[:2]))
        assert rec.verify(probe, "x").score == pytest.approx(expected, abs=1e-5)


def test_swap_model_is_atomic_for_concurrent_queries(models: tuple[Path, Path], tmp_path: Path) -> None:
    a, b = models
    gallery = {f"p{k}": faces(range(k, k + 1), 2) for k in range(3)}
    probe = faces(range(7), 1, seed=9)[0]
    expected = {}
    for path in (a, b):
        ref = OnnxEmbedder(path)
        p = ref.embed(probe[None])[0]
        expected[path] = float(p @ _template(ref, gallery["p1"]))
    # a query mixing model B's probe embedding with model A's gallery (or the reverse) would give this:
    ref_a, ref_b = OnnxEmbedder(a), OnnxEmbedder(b)
    mixed = {
        float(ref_b.embed(probe[None])[0] @ _template(ref_a, gallery["p1"])),
        float(ref_a.embed(probe[None])[0] @ _template(ref_b, gallery["p1"])),
    }
    assert min(abs(m - e) for m in mixed for e in expected.values()) > 1e-3  # the test can see a mix

    with Recognizer(a, store=tmp_path / "g.db", threshold=0.3, threads=1) as rec:
        for name, imgs in gallery.items():
            rec.enroll(name, list(imgs))
        stop = threading.Event()
        seen: list[float] = []
        errors: list[BaseException] = []

        def query() -> None:
            try:
                while not stop.is_set():
                    seen.append(rec.verify(probe, "p1").score)
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        threads = [threading.Thread(target=query) for _ in range(2)]
        for t in threads:
            t.start()
        for k in range(6):
            rec.swap_model(b if k % 2 == 0 else a)
        stop.set()
        for t in threads:
            t.join(timeout=30)
        assert not errors and len(seen) > 6
        for score in seen:
            assert min(abs(score - e) for e in expected.values()) < 1e-5, (score, expected)
        assert rec.model_path == a and rec.verify(probe, "p1").score == pytest.approx(expected[a], abs=1e-5)
        # a failed swap keeps the current model
        with pytest.raises(RecognizerError, match="does not exist"):
            rec.swap_model(tmp_path / "missing.onnx")
        assert rec.model_path == a


def test_refresh_recognizer_swaps_in_the_personalized_model(
    models: tuple[Path, Path], tmp_path: Path
) -> None:
    model, _ = models
    work = tmp_path / "work"
    probe = faces(range(4), 1, seed=3)[0]
    with Recognizer(model, store=tmp_path / "g.db", threshold=0.3) as rec:
        rec.enroll("a", list(faces(range(0, 1), 3)))
        rec.enroll("b", list(faces(range(1, 2), 3)))
        first = refresh_recognizer(rec, write_device_state(tmp_path / "s1", seed=1), work)
        assert rec.model_path == first and first.name.startswith("personalized-")
        ref = OnnxEmbedder(first)
        assert ref.metadata["facefl.kind"] == "personalized"
        expected = float(ref.embed(probe[None])[0] @ _template(ref, faces(range(1, 2), 3)))
        assert rec.verify(probe, "b").score == pytest.approx(expected, abs=1e-5)
        # the next round: int8, calibrated on the gallery's crops; the previous file is removed
        second = refresh_recognizer(rec, write_device_state(tmp_path / "s2", seed=2), work, int8=True)
        assert rec.model_path == second and second.name.endswith("-int8.onnx")
        assert sorted(p.name for p in work.iterdir()) == [second.name]
        with pytest.raises(RecognizerError, match="cannot rebuild"):
            refresh_recognizer(rec, tmp_path / "no-state", work)
        assert rec.model_path == second
    # with public faces the rebuilt model carries its own stranger bank, embedded by itself
    public = list(faces(range(10, 30), 2, seed=5))
    with Recognizer(model, store=tmp_path / "g.db", target_far=0.05) as rec:
        # the generic model has no bank, and 9 impostor pairs are too few to calibrate for 0.05
        assert rec.threshold_info.source == "default"
        third = refresh_recognizer(
            rec, write_device_state(tmp_path / "s3", seed=3), work, public_faces=public
        )
        info = rec.threshold_info
        assert (rec.model_path, info.source, info.strangers) == (third, "strangers", 40)
        bank = decode_stranger_bank(OnnxEmbedder(third).metadata[STRANGER_BANK_KEY])
        assert np.allclose(bank, OnnxEmbedder(third).embed(np.stack(public)), atol=1e-5)
        with pytest.raises(RecognizerError, match="cannot rebuild"):
            refresh_recognizer(
                rec,
                write_device_state(tmp_path / "s4", seed=4),
                work,
                public_faces=[np.zeros((4, 4), np.uint8)],
            )
        assert rec.model_path == third


# ------------------------------------------------------------------------------- detection (dlib)

needs_dlib = pytest.mark.skipif(
    not detection_available(), reason="dlib / face_recognition_models not installed"
)


@needs_dlib
def test_align_refuses_a_photo_without_a_face(models: tuple[Path, Path], tmp_path: Path) -> None:
    model, _ = models
    blank = np.full((200, 200, 3), 128, np.uint8)
    with Recognizer(model, store=tmp_path / "g.db") as rec:
        with pytest.raises(NoFaceFound, match="no face found in image 0"):
            rec.enroll("a", [blank], align=True)
        assert rec.people() == []


def _raw_photos() -> list[tuple[str, Path]]:
    root = SHARED / "raw_photos"
    return sorted((p.parent.name, p) for p in root.glob("*/*.jpg"))


@pytest.mark.realdata
@needs_dlib
@pytest.mark.skipif(not (SHARED / "raw_photos").is_dir(), reason="../shared/data/raw_photos is absent")
def test_raw_photos_align_like_the_dataset(tmp_path: Path) -> None:
    """Each raw photo's crop matches the dataset's aligned crop of the same photo better than any other.

    The raw photos are downscaled copies of CelebA images whose aligned crops are in celeba/ under the
    same file name, made with the same detector, landmarks and get_face_chip settings; downscaling
    changes pixels slightly, so the test asks for closeness and for the right match, not identity.
    """
    from device_sdk.align import FaceAligner

    aligner = FaceAligner()
    photos = _raw_photos()
    assert len(photos) == 20
    dataset = np.stack(
        [np.asarray(Image.open(SHARED / "celeba" / ident / p.name).convert("RGB")) for ident, p in photos]
    ).astype(np.float32)
    several = []
    for k, (_, path) in enumerate(photos):
        try:
            crop = aligner.align(np.asarray(Image.open(path).convert("RGB")), str(path)).astype(np.float32)
        except MultipleFaces:  # e.g. a second, partial face at the border: refused, never guessed
            several.append(path.name)
            continue
        assert crop.shape == (112, 112, 3)
        errors = np.abs(dataset - crop).mean(axis=(1, 2, 3))
        assert int(errors.argmin()) == k, (path, errors[k], errors.min())
        assert errors[k] < 20.0, (path, errors[k])  # mean absolute difference, in 0-255 levels
    assert len(several) <= 2, several  # measured: 1 of the 20 photos has a second face
    # two faces side by side: refused, not guessed
    left, right = (np.asarray(Image.open(p).convert("RGB").resize((200, 240))) for _, p in photos[:2])
    with pytest.raises(MultipleFaces, match=r"[23] faces found in photo"):
        aligner.align(np.concatenate([left, right], axis=1))

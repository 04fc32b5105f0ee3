"""The strong profiles' helpers in benchmarks/accuracy.py: the small evaluation set, the capped public set,
the served column and the profiles' settings (the profiles themselves run minutes to an hour)."""

from __future__ import annotations

from pathlib import Path

from benchmarks.accuracy import DLIB_LOSS, PROFILES, Row, capped_public_set, served_cell, small_lfw, table
from facefl.data.lfw import LfwProtocol, write_synthetic_lfw
from facefl.data.public import load_public_set
from facefl.models import resolve_trainable


def test_small_lfw_keeps_the_first_pairs_of_every_fold(tmp_path: Path) -> None:
    lfw = write_synthetic_lfw(tmp_path / "lfw", pairs_per_fold=4, identities_per_fold=3)
    small = small_lfw(lfw, 2, tmp_path / "out")
    full, sub = LfwProtocol.from_root(lfw), LfwProtocol.from_root(small)
    assert sub.num_folds == full.num_folds == 10
    for fold in range(1, 11):
        want = [p for p in full.pairs if p.fold == fold]
        got = [p for p in sub.pairs if p.fold == fold]
        assert [(p.left.name, p.right.name, p.same) for p in got] == [
            (p.left.name, p.right.name, p.same) for p in want[:2] + want[4:6]
        ]


def test_capped_public_set_is_a_spread_subset_of_the_public_split(tmp_path: Path) -> None:
    lfw = write_synthetic_lfw(tmp_path / "lfw", pairs_per_fold=2, identities_per_fold=2, extra_identities=6)
    root = capped_public_set(lfw, 10, tmp_path / "out")
    public = LfwProtocol.from_root(lfw)
    capped = load_public_set(root, 64)
    assert len(capped.images) == 10
    assert set(capped.identities) <= set(public.public_identities)
    test_identities = public.fold_identities(public.test_folds)
    assert not set(capped.identities) & test_identities
    assert capped_public_set(lfw, 10, tmp_path / "out") == root  # a second call reuses the links


def test_served_cell_names_the_served_and_the_held_back_versions() -> None:
    curves = [
        {"round": 0, "generic": {"accuracy": 0.99}, "personalized": None},
        {"round": 1, "model_version": 2, "served_version": 2, "generic": {"accuracy": 0.991}},
        {"round": 2, "model_version": 3, "served_version": 2, "generic": {"accuracy": 0.95}},
    ]
    assert served_cell(curves) == "v2 (LFW acc 0.9910); held back: v3"
    assert served_cell(curves[:2]) == ""
    # every version held back: the initial model (round 0's numbers) stays served
    curves[1]["served_version"] = 1
    curves[2]["served_version"] = 1
    assert served_cell(curves) == "v1 (LFW acc 0.9900); held back: v2, v3"
    rows = [Row("FedAvg", {"accuracy": 0.95}, {}, 1.0, served_cell(curves)), Row("x", {}, {}, 0.0)]
    text = table(rows, "1e-3")
    assert text.splitlines()[0].endswith(
        "| device DIR@1e-3 | TAR, no strangers | DIR, no strangers | served (gate) | seconds |"
    )
    assert "| last version |" in text


def test_strong_profiles_are_valid() -> None:
    for name in ("strong", "strong-18", "strong-smoke"):
        p = PROFILES[name]
        assert p.model == "dlib-resnet" and p.import_pretrained == "dlib-resnet" and p.fars == "1e-3"
        assert resolve_trainable(p.model, p.trainable) == ("level0.", "fc.")
        assert p.gate is not None and p.gate.startswith("accuracy:")
    wide = PROFILES["strong-18"]
    assert (wide.devices, wide.methods, wide.local_only) == (18, (DLIB_LOSS,), False)
    # the same training as strong's row, only more devices
    strong = PROFILES["strong"]
    assert (wide.lr, wide.rounds, wide.trainable, wide.gate) == (
        strong.lr,
        strong.rounds,
        strong.trainable,
        strong.gate,
    )

"""Data planning (who holds which identities) and the held-out metric, without a server."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from facefl.data.synthetic import write_image_folder
from simulator import worker
from simulator.config import SimulationConfig
from simulator.evaluation import rank1_identification
from simulator.plan import HELDOUT_OFFSET, plan_data
from simulator.worker import load_device_data


def test_synthetic_plan_is_disjoint_and_deterministic() -> None:
    cfg = SimulationConfig(devices=4, ids_per_device=3, images_per_id=4, heldout_ids=5).validate()
    plan = plan_data(cfg, image_size=64)
    ids = [i for spec in plan.device_specs for i in spec.identities]
    assert len(ids) == len(set(ids)) == 12
    assert all(int(i) < HELDOUT_OFFSET for i in ids)
    assert plan.heldout.num_identities == 5 and len(plan.heldout) == 20
    assert [s.identities for s in plan_data(cfg, 64).device_specs] == [
        s.identities for s in plan.device_specs
    ]
    data = load_device_data(plan.device_specs[0])
    assert data.images.shape == (12, 64, 64, 3) and data.num_identities == 3


def test_folder_plan_keeps_heldout_identities_off_devices(tmp_path: Path) -> None:
    root = write_image_folder(tmp_path / "faces", range(12), images_per_identity=3, image_size=72)
    cfg = SimulationConfig(devices=3, ids_per_device=2, heldout_ids=4, data=str(root)).validate()
    plan = plan_data(cfg, image_size=64)
    device_names = {n for spec in plan.device_specs for n in spec.identities}
    assert len(device_names) == 6 and not device_names & set(plan.heldout.identities)
    assert plan.heldout.images.shape == (12, 64, 64, 3)
    data = load_device_data(plan.device_specs[1])
    assert data.identities == plan.device_specs[1].identities and len(data) == 6

    too_many = SimulationConfig(devices=5, ids_per_device=2, heldout_ids=4, data=str(root)).validate()
    with pytest.raises(ValueError, match="device identities"):
        plan_data(too_many, image_size=64)


def test_folder_plan_leaves_excluded_identities_out(tmp_path: Path) -> None:
    root = write_image_folder(tmp_path / "faces", range(12), images_per_identity=3, image_size=72)
    base = SimulationConfig(devices=3, ids_per_device=2, heldout_ids=4, data=str(root)).validate()
    before = plan_data(base, image_size=64)
    dropped = (before.device_specs[0].identities[0], before.heldout.identities[0])
    cfg = SimulationConfig(
        devices=3,
        ids_per_device=2,
        heldout_ids=4,
        data=str(root),
        exclude_identities=tuple(map(str, dropped)),
    ).validate()
    plan = plan_data(cfg, image_size=64)
    used = {n for spec in plan.device_specs for n in spec.identities} | set(plan.heldout.identities)
    assert len(used) == 10 and not used & set(dropped)
    typo = SimulationConfig(
        devices=3, ids_per_device=2, heldout_ids=4, data=str(root), exclude_identities=("x",)
    )
    with pytest.raises(ValueError, match="excluded identities not in"):
        plan_data(typo.validate(), image_size=64)


def test_rank1_identification() -> None:
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(5, 16))
    labels = np.repeat(np.arange(5), 4)
    tight = centres[labels] + 0.01 * rng.normal(size=(20, 16))
    assert rank1_identification(tight, labels) == 1.0
    swapped = tight.copy()
    swapped[[3, 7]] = swapped[[7, 3]]  # a probe of identity 0 now looks like identity 1 and vice versa
    assert rank1_identification(swapped, labels) == pytest.approx(1 - 2 / 10)
    with pytest.raises(ValueError, match="fewer than two"):
        rank1_identification(tight[:5], np.arange(5))


def test_device_data_stored_once_is_read_back_by_another_process(tmp_path: Path) -> None:
    # the pool's processes share a device's data through its directory; another process starts with an
    # empty in-memory cache, which clearing it here stands for
    root = write_image_folder(tmp_path / "faces", range(6), images_per_identity=3, image_size=72)
    cfg = SimulationConfig(devices=2, ids_per_device=2, heldout_ids=2, data=str(root)).validate()
    spec = plan_data(cfg, image_size=64).device_specs[0]
    store = tmp_path / "device" / "data"
    built = load_device_data(spec, store)
    (stored,) = store.glob("dataset-*.npz")
    worker._DATA_CACHE.clear()
    read = load_device_data(spec, store)
    assert read is not built
    assert read.identities == built.identities == spec.identities
    np.testing.assert_array_equal(read.images, built.images)
    np.testing.assert_array_equal(read.labels, built.labels)
    # what another process reads is the stored file, not data built again
    np.savez(
        stored, images=np.zeros_like(built.images), labels=built.labels, identities=np.array(spec.identities)
    )
    worker._DATA_CACHE.clear()
    assert not load_device_data(spec, store).images.any()
    # a damaged file is not trusted: the data is built again and the file replaced
    stored.write_bytes(b"PK\x03\x04 not a whole archive")
    worker._DATA_CACHE.clear()
    rebuilt = load_device_data(spec, store)
    np.testing.assert_array_equal(rebuilt.images, built.images)
    worker._DATA_CACHE.clear()
    np.testing.assert_array_equal(load_device_data(spec, store).labels, built.labels)
    assert [p.name for p in store.iterdir()] == [stored.name]

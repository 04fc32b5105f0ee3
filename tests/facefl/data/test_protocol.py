from pathlib import Path

import numpy as np
import pytest

from facefl.data import DataError, ImageFolder, write_image_folder
from facefl.data.protocol import device_split, load_identities, plan_devices


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> ImageFolder:
    root = write_image_folder(tmp_path_factory.mktemp("faces"), range(12), 4, image_size=32)
    return ImageFolder(root)


def test_plan_is_disjoint_deterministic_and_holds_out(folder: ImageFolder) -> None:
    plan = plan_devices(folder, num_devices=3, ids_per_device=2, heldout_ids=4, seed=7)
    assert plan == plan_devices(folder, num_devices=3, ids_per_device=2, heldout_ids=4, seed=7)
    on_devices = [name for part in plan.devices for name in part]
    assert len(plan.devices) == 3 and all(len(p) == 2 for p in plan.devices)
    assert len(set(on_devices)) == 6 and len(plan.heldout) == 4
    assert not set(on_devices) & set(plan.heldout)
    assert plan != plan_devices(folder, num_devices=3, ids_per_device=2, heldout_ids=4, seed=8)


def test_plan_refuses_too_few_identities(folder: ImageFolder) -> None:
    with pytest.raises(DataError, match="needs 4 held-out identities"):
        plan_devices(folder, num_devices=5, ids_per_device=2, heldout_ids=4, seed=0)


def test_plan_leaves_excluded_identities_out(folder: ImageFolder) -> None:
    plan = plan_devices(folder, num_devices=3, ids_per_device=2, heldout_ids=4, seed=7)
    # nothing excluded: the same plan as before the option existed (the seeded order is unchanged)
    assert plan == plan_devices(folder, num_devices=3, ids_per_device=2, heldout_ids=4, seed=7, exclude=())
    excluded = {plan.heldout[0], plan.devices[1][0]}
    replan = plan_devices(folder, num_devices=3, ids_per_device=2, heldout_ids=4, seed=7, exclude=excluded)
    used = {*replan.heldout, *(n for part in replan.devices for n in part)}
    assert len(used) == 10 and not used & excluded
    with pytest.raises(DataError, match=r"excluded identities not in .*: nobody"):
        plan_devices(folder, num_devices=3, ids_per_device=2, heldout_ids=4, seed=7, exclude={"nobody"})
    # 12 folders less 3 excluded cannot hold 4 + 3 x 2
    with pytest.raises(DataError, match="9 identity folders not excluded"):
        plan_devices(folder, 3, 2, 4, 7, exclude=set(folder.identities[:3]))


def test_load_identities_and_split(folder: ImageFolder) -> None:
    names = [folder.identities[3], folder.identities[0]]
    images, labels = load_identities(folder.root, names, image_size=16, max_images_per_identity=3)
    assert images.shape == (6, 16, 16, 3) and images.dtype == np.uint8
    assert sorted(labels.tolist()) == [0, 0, 0, 1, 1, 1]
    train, test = device_split(labels, test_fraction=0.4, seed=1)
    assert len(train) + len(test) == 6 and not set(train) & set(test)
    assert all((labels[train] == k).sum() >= 1 for k in (0, 1))
    with pytest.raises(DataError, match="no identity folder"):
        load_identities(folder.root, ["nobody"], image_size=16)


def test_simulator_trains_only_on_the_train_split(folder: ImageFolder, tmp_path: Path) -> None:
    from device_sdk import LocalDataset

    full = LocalDataset.from_folder(folder.root, 16, identities=list(folder.identities[:2]))
    train, test = full.train_test_split(0.5, seed=3)
    images, labels = load_identities(folder.root, list(folder.identities[:2]), 16)
    tr, te = device_split(labels, 0.5, 3, list(folder.identities[:2]))
    np.testing.assert_array_equal(train.images, images[tr])
    np.testing.assert_array_equal(test.images, images[te])


def test_device_split_keyed_on_names_ignores_the_other_identities() -> None:
    import numpy as np

    from facefl.data.protocol import device_split

    labels = np.array([0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2])
    names = ["ann", "bob", "cy"]
    train, test = device_split(labels, 0.4, seed=7, identities=names)
    # bob alone on a device (FedFace) gets the same test images as bob among others (FedFR)
    bob = np.flatnonzero(labels == 1)
    alone_train, alone_test = device_split(np.zeros(5, np.int64), 0.4, seed=7, identities=["bob"])
    assert (bob[alone_test]).tolist() == [i for i in test.tolist() if labels[i] == 1]
    assert (bob[alone_train]).tolist() == [i for i in train.tolist() if labels[i] == 1]
    assert len(test) == 6 and sorted(train.tolist() + test.tolist()) == list(range(15))
    # and the key matters: another name splits differently for some seed
    assert any(
        device_split(np.zeros(5, np.int64), 0.4, seed=s, identities=["bob"])[1].tolist()
        != device_split(np.zeros(5, np.int64), 0.4, seed=s, identities=["zed"])[1].tolist()
        for s in range(5)
    )

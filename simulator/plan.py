"""What a simulation run sets up before its first round: each device's data, the held-out identities, the
task (created through the SDK's AdminClient) and the enrolled devices."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from device_sdk import AdminClient, DeviceCredentials, FederatedClient, LocalDataset, TaskInfo
from facefl.data import ImageFolder, partition_identities
from facefl.data.partition import held_out_count
from facefl.data.protocol import plan_devices

from .config import SimulationConfig, parse_gate
from .worker import DataSpec

__all__ = ["HELDOUT_OFFSET", "DataPlan", "create_task", "plan_data", "register_devices"]

# synthetic held-out identities are numbered from here: disjoint from every device's identities
HELDOUT_OFFSET = 1_000_000
# the smallest synthetic face generated; a model taking smaller images (tiny: 4 px) gets them resized
# by its preprocessing
SYNTHETIC_MIN_SIZE = 8


@dataclass(frozen=True)
class DataPlan:
    device_specs: list[DataSpec]
    heldout: LocalDataset


def plan_data(cfg: SimulationConfig, image_size: int) -> DataPlan:
    """Which identities each device holds (disjoint), and the held-out identities (disjoint from all)."""
    n, k = cfg.devices, cfg.ids_per_device
    if cfg.data == "synthetic":
        image_size = max(image_size, SYNTHETIC_MIN_SIZE)
        id_parts = partition_identities(list(range(n * k)), n, k, cfg.seed)
        specs = [DataSpec("synthetic", tuple(p), image_size, cfg.images_per_id, cfg.seed) for p in id_parts]
        heldout_ids = list(range(HELDOUT_OFFSET, HELDOUT_OFFSET + cfg.heldout_ids))
        heldout = LocalDataset.synthetic(heldout_ids, cfg.images_per_id or 10, image_size, cfg.seed)
        return DataPlan(specs, heldout)

    root = Path(cfg.data)
    folder = ImageFolder(root)  # DataError (a ValueError) when the layout is wrong
    device_plan = plan_devices(
        folder,
        n,
        k,
        cfg.heldout_ids,
        cfg.seed,
        cfg.images_per_id,
        min_device_images=1 if cfg.skip_small_devices else 2,
        exclude=frozenset(cfg.exclude_identities),
    )
    parts = device_plan.devices
    if cfg.skip_small_devices:
        counts = Counter(label for _, label in folder.samples)
        usable = {name: counts[i] for i, name in enumerate(folder.identities)}

        def train_images(name: str) -> int:
            n_img = min(usable[name], cfg.images_per_id) if cfg.images_per_id else usable[name]
            return n_img - held_out_count(n_img, cfg.test_fraction)  # as facefl.data.protocol.device_split

        parts = [part for part in parts if sum(train_images(name) for name in part) >= 2]
    specs = [
        DataSpec(
            "folder",
            tuple(part),
            image_size,
            cfg.images_per_id,
            cfg.seed,
            str(root.resolve()),
            cfg.test_fraction,
        )
        for part in parts
    ]
    heldout = LocalDataset.from_folder(
        root, image_size, identities=device_plan.heldout, max_images_per_identity=cfg.images_per_id
    )
    return DataPlan(specs, heldout)


def create_task(
    admin: AdminClient, cfg: SimulationConfig, eval_name: str | None, initial_version: int | None
) -> TaskInfo:
    """Create the run's task: the algorithm's hyper-parameters and the round policy of ``cfg``."""
    return admin.create_task(
        f"simulate-{datetime.now():%Y%m%d-%H%M%S}",
        algorithm=cfg.algorithm,
        architecture=cfg.model,
        seed=cfg.seed,
        rounds=cfg.rounds,
        trainable=cfg.trainable,
        initial_version=initial_version,
        eval_set=eval_name,
        # the server the simulator starts names its public set "public"; an external one's is --public-set
        hyperparams=cfg.hyperparams("public" if cfg.server is None else cfg.public_set),
        policy={
            "target_reports": cfg.target_reports,
            "over_selection": cfg.over_selection,
            "min_reports": cfg.min_reports,
            "round_timeout_s": cfg.round_timeout_s,
            "gate": parse_gate(cfg.gate) if cfg.gate is not None else None,
            "dp": cfg.dp_policy(),
            "update_encoding": cfg.update_encoding,
            "update_error_feedback": cfg.update_error_feedback,
            "secure_aggregation": cfg.secagg_policy(),
        },
    )


def register_devices(
    base_url: str, secret: str, run_dir: Path, specs: Sequence[DataSpec], *, threads: int = 1
) -> list[Path]:
    """Enroll every simulated device; credentials go to ``run_dir/devices/<i>/credentials.json``.

    ``threads`` clients enroll them, each a share of the devices (each registration hands its client the
    new device's token): a client per device would pay for a new connection pool and SSL context each
    time, and a thousand devices one after the other wait on the server a thousand times."""
    dirs = [run_dir / "devices" / str(i) for i in range(len(specs))]
    threads = max(1, min(threads, len(specs)))

    def enroll(share: range) -> None:
        with FederatedClient(base_url, timeout=60.0) as client:
            for i in share:
                creds: DeviceCredentials = client.register(secret, name=f"sim-device-{i}")
                creds.save(dirs[i] / "credentials.json")

    shares = [range(t, len(specs), threads) for t in range(threads)]
    if threads == 1:
        enroll(shares[0])
    else:
        with ThreadPoolExecutor(max_workers=threads) as pool:
            for done in [pool.submit(enroll, share) for share in shares]:
                done.result()  # the first failure, if any
    return dirs

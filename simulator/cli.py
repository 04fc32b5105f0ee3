"""Command line of the simulator: ``facefl simulate ...`` or ``python -m simulator ...``."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from .privacy_options import add_privacy_arguments, privacy_options

if TYPE_CHECKING:  # the heavy imports (torch, ...) wait until a simulation actually runs
    from .run import SimulationConfig

__all__ = ["add_arguments", "main", "run"]


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text}")
    return value


def _probability(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a probability, got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a probability in [0, 1], got {text}")
    return value


def _kill_at(text: str) -> str:
    from .faults import parse_kill_at

    try:
        parse_kill_at(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("--kill-server-at ")) from None
    return text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the simulator's options to ``parser`` (used by ``facefl simulate`` and ``python -m simulator``)."""
    from facefl.algorithms import registry  # the algorithms' choices and help (imports torch)

    g = parser.add_argument_group("simulation")
    g.add_argument("--devices", type=_positive_int, default=20, help="number of simulated devices (20)")
    g.add_argument("--rounds", type=_positive_int, default=2, help="federated rounds to run (2)")
    g.add_argument(
        "--model",
        choices=["small", "mobilefacenet", "tiny", "dlib-resnet"],  # facefl.models.ARCHITECTURES (tested)
        default=None,
        help="backbone (default: the --initial-model checkpoint's architecture, else small); tiny: ~1k "
        "floats, protocol benchmarks only; dlib-resnet: dlib's face ResNet (`facefl import-model`)",
    )
    g.add_argument(
        "--data",
        default="synthetic",
        help="'synthetic' (generated faces, the default) or an image folder <DIR>/<identity>/<image>",
    )
    g.add_argument("--ids-per-device", type=_positive_int, default=5, help="identities per device (5)")
    g.add_argument(
        "--images-per-id",
        type=_positive_int,
        default=None,
        help="images per identity: synthetic 10 by default; with a directory, a cap (default: all)",
    )
    g.add_argument(
        "--heldout-ids", type=_positive_int, default=50, help="held-out identities for evaluation (50)"
    )
    g.add_argument(
        "--test-fraction",
        type=float,
        default=0.0,
        help="with an image folder: share of each identity's images kept off training as the device's "
        "test images (0)",
    )
    g.add_argument(
        "--exclude-identities",
        default="",
        help="with an image folder: comma-separated identity folders left out of the plan "
        "(facefl audit-data finds candidates: a person filed twice, a folder mixing people)",
    )
    g.add_argument(
        "--initial-model",
        default=None,
        help="start from these weights (a `facefl pretrain` checkpoint) instead of a random model",
    )
    g.add_argument(
        "--eval-set",
        default=None,
        help="server-side generic evaluation of every model version: a directory (LFW layout with "
        "pairs.txt, or any image folder) for the server the simulator starts; with --server, the name "
        "of a set configured there (FACEFL_EVAL_SETS)",
    )
    g.add_argument("--seed", type=_non_negative_int, default=0, help="seed of data, model and schedule (0)")
    g.add_argument(
        "--dropout",
        type=_non_negative_float,
        default=0.0,
        help="probability that a device vanishes mid-round (after check-in, download or training) "
        "and never uploads (0)",
    )

    f = parser.add_argument_group("faults (per device and round, seeded by --seed; see simulator/faults.py)")
    f.add_argument(
        "--stragglers", type=_probability, default=0.0, help="probability that a device is a straggler (0)"
    )
    f.add_argument(
        "--slow-factor",
        type=_positive_float,
        default=3.0,
        help="a straggler's training takes this many times longer (>= 1; 3)",
    )
    f.add_argument(
        "--corrupt",
        type=_probability,
        default=0.0,
        help="probability that a device uploads a corrupt update (NaN, wrong shape or garbage bytes) (0)",
    )
    f.add_argument(
        "--kill-server-at",
        type=_kill_at,
        default=None,
        metavar="ROUND:SECONDS",
        help="SIGKILL the started server SECONDS into ROUND, then restart it on the same DB and blobs",
    )

    t = parser.add_argument_group("training (the task's hyper-parameters)")
    t.add_argument(
        "--algorithm",
        choices=list(registry.NAMES),
        default=registry.DEFAULT,
        help=f"({registry.DEFAULT}) "
        + "; ".join(
            a.title
            + (" [needs --public-set]" if "public_set" in a.hyperparams.model_fields else "")
            + (" [--ids-per-device 1]" if a.one_identity_per_device else "")
            for a in registry.ALGORITHMS.values()
        )
        + ". --hp sets any other hyper-parameter of the algorithm",
    )
    t.add_argument(
        "--skip-small-devices",
        action="store_true",
        help="leave out devices with fewer than two training images (e.g. FedFace devices of a person with "
        "one photo) instead of refusing the plan",
    )
    t.add_argument(
        "--public-set",
        default=None,
        metavar="DIR|NAME",
        help="FedFR's public face set: a directory (LFW layout: its public split) for the server the "
        "simulator starts, or a set name configured on --server",
    )
    t.add_argument(
        "--hp",
        dest="extra_hyperparams",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any other task hyper-parameter, validated by the server (repeatable), e.g. --hp dfc_weight=0",
    )
    t.add_argument(
        "--trainable",
        default=None,
        metavar="GROUP[,GROUP]",
        help="partial training: the model's parameter groups that train on devices (facefl.models "
        "parameter_groups, e.g. small: early, last_block, embedding); only their deltas are uploaded",
    )
    t.add_argument("--mu", type=_non_negative_float, default=None, help="FedProx mu (0.01 with fedprox)")
    t.add_argument("--local-epochs", type=_positive_int, default=1, help="local epochs per round (1)")
    t.add_argument("--batch-size", type=_positive_int, default=16, help="local batch size (16)")
    t.add_argument("--lr", type=_positive_float, default=0.05, help="local SGD learning rate (0.05)")

    p = parser.add_argument_group("round policy")
    p.add_argument(
        "--target-reports", type=_positive_int, default=None, help="reports that close a round (N)"
    )
    p.add_argument(
        "--min-reports", type=_positive_int, default=None, help="reports needed to aggregate (ceil(target/2))"
    )
    p.add_argument("--round-timeout-s", type=_positive_float, default=300.0, help="round deadline (300)")
    p.add_argument(
        "--update-encoding",
        choices=["float32", "float16", "int8", "int8_channel"],  # facefl.compression.ENCODINGS (tested)
        default="float32",
        help="how devices encode their uploads (the task's policy.update_encoding): float32, float16, or "
        "int8 with a scale per tensor or per output channel (float32)",
    )
    p.add_argument(
        "--update-error-feedback",
        action="store_true",
        help="devices add what the encoding dropped from a delta to their next one (a lossy encoding)",
    )
    p.add_argument(
        "--gate",
        default=None,
        metavar="METRIC:MAX_DROP",
        help="release gate (needs --eval-set): a version whose METRIC (accuracy, auc, tar@far=1e-2, "
        "tar@far=1e-3) falls more than MAX_DROP below the served one's is held back, e.g. auc:0.003",
    )

    add_privacy_arguments(parser, _positive_int, _positive_float, _non_negative_float)

    s = parser.add_argument_group("server and execution")
    s.add_argument("--server", default=None, help="URL of a running server (default: start one on 127.0.0.1)")
    s.add_argument(
        "--db", default=None, help="SQLAlchemy URL for the started server (default: SQLite in work dir)"
    )
    s.add_argument(
        "--admin-token", default=None, help="admin token (default: $FACEFL_ADMIN_TOKEN or dev token)"
    )
    s.add_argument(
        "--enrollment-secret",
        default=None,
        help="enrollment secret (default: $FACEFL_ENROLLMENT_SECRET or dev)",
    )
    s.add_argument("--workers", type=_positive_int, default=None, help="worker processes (CPU count)")
    s.add_argument(
        "--device-threads",
        type=_positive_int,
        default=1,
        help="device jobs each worker runs at once in threads, sharing its connection pool; their "
        "trainings take turns; up to 8 threads register the devices (1; e.g. 8 for thousands of "
        "tiny-model devices)",
    )
    s.add_argument(
        "--overlap",
        type=_positive_int,
        default=1,
        help="worker processes per training slot (1): with 2, at most --workers devices train at once "
        "while as many more check in, download or upload (their network waits hide behind training)",
    )
    s.add_argument(
        "--backend",
        choices=["local", "ray"],
        default="local",
        help="run device jobs in local worker processes (default) or as Ray tasks (the 'ray' extra)",
    )
    s.add_argument(
        "--ray-address",
        default=None,
        metavar="ADDR",
        help="with --backend ray: join this Ray cluster (default: start a local Ray with --workers CPUs)",
    )
    s.add_argument(
        "--work-dir",
        default=None,
        metavar="DIR",
        help="keep each run's server DB and log, blobs and device state under DIR/run-* "
        "(default: a temporary directory, removed afterwards)",
    )
    s.add_argument("--json", dest="json_path", default=None, metavar="PATH", help="write results as JSON")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")


def _checkpoint_architecture(path: str | None) -> str | None:
    """The architecture a facefl checkpoint declares (metadata only, no tensors), None if unreadable:
    the config's own validation then reports the file."""
    if path is None:
        return None
    from facefl.codec import CodecError, read_file_header

    try:
        return read_file_header(path).metadata.get("architecture")
    except (OSError, CodecError):
        return None


def config_from_args(args: argparse.Namespace) -> SimulationConfig:
    from .run import SimulationConfig

    return SimulationConfig(
        devices=args.devices,
        rounds=args.rounds,
        model=args.model or _checkpoint_architecture(args.initial_model) or "small",
        data=args.data,
        ids_per_device=args.ids_per_device,
        images_per_id=args.images_per_id,
        heldout_ids=args.heldout_ids,
        eval_set=args.eval_set,
        initial_model=args.initial_model,
        trainable=[g.strip() for g in args.trainable.split(",") if g.strip()] if args.trainable else None,
        gate=args.gate,
        test_fraction=args.test_fraction,
        exclude_identities=tuple(n.strip() for n in args.exclude_identities.split(",") if n.strip()),
        server=args.server,
        db=args.db,
        admin_token=args.admin_token,
        enrollment_secret=args.enrollment_secret,
        json_path=args.json_path,
        workers=args.workers,
        device_threads=args.device_threads,
        overlap=args.overlap,
        seed=args.seed,
        local_epochs=args.local_epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        algorithm=args.algorithm,
        mu=args.mu,
        public_set=args.public_set,
        skip_small_devices=args.skip_small_devices,
        extra_hyperparams=_parse_hyperparams(args.extra_hyperparams),
        target_reports=args.target_reports,
        min_reports=args.min_reports,
        round_timeout_s=args.round_timeout_s,
        update_encoding=args.update_encoding,
        update_error_feedback=args.update_error_feedback,
        dropout=args.dropout,
        stragglers=args.stragglers,
        slow_factor=args.slow_factor,
        corrupt=args.corrupt,
        kill_server_at=args.kill_server_at,
        backend=args.backend,
        ray_address=args.ray_address,
        **privacy_options(args),
        work_dir=args.work_dir,
        progress=not args.no_progress,
    )


def _parse_hyperparams(items: list[str]) -> dict[str, float | int | str]:
    out: dict[str, float | int | str] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--hp expects KEY=VALUE (got {item!r})")
        value: float | int | str
        try:
            value = int(raw)
        except ValueError:
            try:
                value = float(raw)
            except ValueError:
                value = raw
        out[key.strip()] = value
    return out


def run(args: argparse.Namespace) -> int:
    """Run a simulation from parsed arguments; prints the per-round table. Exit status: 0 ok,
    1 the run failed, 2 invalid arguments, 130 interrupted."""
    import httpx

    from device_sdk import FaceflError

    from .run import SimulationError, simulate
    from .server import ServerStartError

    try:
        config = config_from_args(args)
        config.validate()
    except ValueError as exc:
        print(f"facefl simulate: error: {exc}", file=sys.stderr)
        return 2
    try:
        result = simulate(config)
    except ValueError as exc:  # e.g. a data directory too small for the requested run
        print(f"facefl simulate: error: {exc}", file=sys.stderr)
        return 2
    except (SimulationError, ServerStartError, FaceflError, httpx.HTTPError) as exc:
        print(f"facefl simulate: failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("facefl simulate: interrupted", file=sys.stderr)
        return 130
    print(result.table())
    for err in result.errors[:20]:
        print(f"warning: {err}", file=sys.stderr)
    if config.json_path:
        print(f"results written to {config.json_path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m simulator", description="Simulate federated devices against a real facefl server."
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))

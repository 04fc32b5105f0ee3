"""``facefl pretrain``'s command line: options (defaults from the recipe of ``--model``) -> a
:class:`PretrainConfig` -> :func:`facefl.pretrain.loop.pretrain`, errors as exit codes."""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from pathlib import Path

from facefl.pretrain.config import RECIPES, Augmentation, PretrainConfig
from facefl.pretrain.loop import pretrain
from facefl.pretrain.malloc import tune_malloc

__all__ = ["DESCRIPTION", "add_arguments", "config_from_args", "main", "run"]

DESCRIPTION = (
    "Centralized pretraining on the LFW public split: ``facefl pretrain --data LFW --out model.safetensors``."
)


def _int_at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {value}")
        return value

    return parse


def _float_in(low: float, high: float = math.inf, open_low: bool = False) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        ok = math.isfinite(value) and (value > low if open_low else value >= low) and value <= high
        if not ok:
            bound = f"> {low}" if open_low else f">= {low}"
            raise argparse.ArgumentTypeError(
                f"expected a number {bound}{'' if high == math.inf else f' and <= {high}'}, got {text}"
            )
        return value

    return parse


def _folds(text: str) -> tuple[int, ...]:
    """'6-10' or '4,5' or '' -> sorted distinct fold numbers."""
    out: set[int] = set()
    for part in filter(None, (p.strip() for p in text.split(","))):
        try:
            if "-" in part:
                lo, hi = (int(v) for v in part.split("-", 1))
                if lo > hi:
                    raise ValueError
                out.update(range(lo, hi + 1))
            else:
                out.add(int(part))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected folds like '6-10' or '4,5', got {text!r}") from None
    if any(f < 1 for f in out):
        raise argparse.ArgumentTypeError(f"fold numbers start at 1, got {text!r}")
    return tuple(sorted(out))


def _recipe_help(name: str) -> str:
    """'(small: 40, mobilefacenet: 20)': the recipe defaults of an option, for --help."""
    defaults = asdict(PretrainConfig(data=Path(), out=Path()))
    return "(" + ", ".join(f"{m}: {r.get(name, defaults[name]):g}" for m, r in RECIPES.items()) + ")"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``facefl pretrain``; training defaults come from ``RECIPES[--model]``."""
    aug_defaults = ", ".join(f"{k}={v:g}" for k, v in asdict(Augmentation()).items())
    g = parser.add_argument_group("data and output")
    g.add_argument("--data", required=True, type=Path, help="LFW-layout directory with pairs.txt")
    g.add_argument("--out", required=True, type=Path, help="model checkpoint to write (.safetensors)")
    g.add_argument("--model", choices=sorted(RECIPES), default="small", help="backbone (small)")
    g.add_argument("--test-folds", type=_folds, default=(6, 7, 8, 9, 10), help="held-out test folds (6-10)")
    g.add_argument(
        "--val-folds",
        type=_folds,
        default=(),
        help="also hold these folds out of training and report them instead of the test folds "
        "(for choosing hyper-parameters, e.g. 4,5)",
    )
    g.add_argument(
        "--min-images",
        type=_int_at_least(1),
        default=None,
        help="skip public identities with fewer images " + _recipe_help("min_images"),
    )
    t = parser.add_argument_group("training (defaults: the recipe of --model)")
    t.add_argument("--epochs", type=_int_at_least(1), default=None, help="epochs " + _recipe_help("epochs"))
    t.add_argument(
        "--batch-size", type=_int_at_least(2), default=None, help="batch size " + _recipe_help("batch_size")
    )
    t.add_argument(
        "--lr",
        type=_float_in(0.0, open_low=True),
        default=None,
        help="peak learning rate " + _recipe_help("lr"),
    )
    t.add_argument("--momentum", type=_float_in(0.0, 0.999), default=None, help="SGD momentum (0.9)")
    t.add_argument(
        "--weight-decay",
        type=_float_in(0.0),
        default=None,
        help="weight decay " + _recipe_help("weight_decay"),
    )
    t.add_argument(
        "--warmup-epochs",
        type=_float_in(0.0),
        default=None,
        help="linear warmup epochs, then cosine decay " + _recipe_help("warmup_epochs"),
    )
    t.add_argument(
        "--embedding-dim", type=_int_at_least(1), default=None, help="embedding size (architecture's: 128)"
    )
    t.add_argument("--scale", type=_float_in(0.0, open_low=True), default=None, help="CosFace scale s (30)")
    t.add_argument("--margin", type=_float_in(0.0), default=None, help="CosFace margin m (0.4)")
    t.add_argument("--augment", default=None, help=f"augmentation overrides NAME=VALUE,... ({aug_defaults})")
    t.add_argument(
        "--seed", type=_int_at_least(0), default=0, help="seed of init, data order, augmentation (0)"
    )
    r = parser.add_argument_group("run")
    r.add_argument("--workers", type=_int_at_least(1), default=2, help="image-decoding threads (2)")
    r.add_argument(
        "--threads",
        type=_int_at_least(1),
        default=None,
        help="torch threads for training (1). 2 runs 1.8x faster on an idle 2-core machine but 3-5x "
        "slower while another process competes for the cores (OpenMP threads spin-wait)",
    )
    r.add_argument(
        "--resume",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="continue from <out>.state.safetensors when it exists and matches (default: yes)",
    )
    r.add_argument("--eval-every", type=_int_at_least(1), default=1, help="evaluate every N epochs (1)")
    r.add_argument(
        "--stop-after", type=_int_at_least(1), default=None, help="stop after epoch N (resume later)"
    )
    r.add_argument(
        "--json", dest="json_path", type=Path, default=None, help="also write the final metrics here"
    )


def _parse_augment(text: str | None, base: Augmentation) -> Augmentation:
    if not text:
        return base
    values: dict[str, float] = {}
    names = set(asdict(base))
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        if not sep or name.strip() not in names:
            raise ValueError(f"--augment: expected NAME=VALUE with NAME in {sorted(names)}, got {part!r}")
        try:
            values[name.strip()] = float(value)
        except ValueError:
            raise ValueError(f"--augment: {name.strip()} needs a number, got {value!r}") from None
    return replace(base, **values)


def config_from_args(args: argparse.Namespace) -> PretrainConfig:
    recipe = {**RECIPES[args.model]}
    augmentation = recipe.pop("augmentation", Augmentation())
    overrides = {
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "momentum": args.momentum,
        "weight_decay": args.weight_decay,
        "warmup_epochs": args.warmup_epochs,
        "embedding_dim": args.embedding_dim,
        "scale": args.scale,
        "margin": args.margin,
        "min_images": args.min_images,
        "threads": args.threads,
    }
    recipe.update({k: v for k, v in overrides.items() if v is not None})
    return PretrainConfig(
        data=args.data,
        out=args.out,
        model=args.model,
        augmentation=_parse_augment(args.augment, augmentation),
        seed=args.seed,
        workers=args.workers,
        resume=args.resume,
        eval_every=args.eval_every,
        test_folds=tuple(args.test_folds),
        val_folds=tuple(args.val_folds),
        stop_after=args.stop_after,
        **recipe,
    )


def run(args: argparse.Namespace) -> int:
    from facefl.checkpoint import CheckpointError
    from facefl.data import DataError

    tune_malloc()
    try:
        config = config_from_args(args)
    except ValueError as exc:
        print(f"facefl pretrain: error: {exc}", file=sys.stderr)
        return 2
    try:
        t0 = time.perf_counter()
        metrics = pretrain(config, log=print)
    except (DataError, CheckpointError, ValueError, FloatingPointError) as exc:
        print(f"facefl pretrain: error: {exc}", file=sys.stderr)
        return 1
    wall = time.perf_counter() - t0
    summary = {k: v for k, v in metrics.items() if k != "history"}
    print(f"wrote {config.out} ({wall:.0f}s); " + json.dumps(summary, sort_keys=True))
    if args.json_path:
        args.json_path.parent.mkdir(parents=True, exist_ok=True)
        args.json_path.write_text(json.dumps({**metrics, "wall_s": wall}, indent=2) + "\n")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="facefl pretrain", description=DESCRIPTION)
    add_arguments(parser)
    return run(parser.parse_args(argv))

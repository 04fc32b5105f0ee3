"""Pretraining's training loop: CosFace over the public identities, SGD with warmup + cosine decay.

After every epoch the model checkpoint (:mod:`facefl.checkpoint`) and the resumable training state
(:mod:`facefl.pretrain.state`) are written; every ``eval_every`` epochs (and after the last one) the model
is evaluated on the held-out pairs and a table row is printed. torch is imported when training starts
(``facefl --help`` stays fast).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from facefl.pretrain.augment import augment
from facefl.pretrain.config import PretrainConfig
from facefl.pretrain.data import load_data
from facefl.pretrain.state import Progress, restore, save

__all__ = ["epoch_generators", "lr_at", "pretrain"]


def lr_at(step: int, total_steps: int, warmup_steps: int, base_lr: float, min_lr_ratio: float) -> float:
    """Linear warmup from ~0 to ``base_lr`` over ``warmup_steps``, then cosine to ``base_lr*min_lr_ratio``."""
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    span = max(total_steps - warmup_steps, 1)
    progress = min(max(step - warmup_steps, 0) / span, 1.0)
    low = base_lr * min_lr_ratio
    return low + (base_lr - low) * 0.5 * (1.0 + math.cos(math.pi * progress))


def epoch_generators(seed: int, epoch: int) -> tuple[np.random.Generator, Any]:
    import torch

    rng = np.random.default_rng([seed, epoch, 1])
    gen = torch.Generator().manual_seed(int(np.random.default_rng([seed, epoch, 2]).integers(2**62)))
    return rng, gen


def _param_groups(model: Any, head: Any, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on conv / linear weights and the class centres; none on BatchNorm and PReLU slopes."""
    decay: list[Any] = []
    no_decay: list[Any] = []
    for _, p in model.named_parameters():
        (decay if p.dim() > 1 else no_decay).append(p)
    decay.append(head.weight)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _format_row(values: dict[str, Any], columns: Sequence[tuple[str, str, int]]) -> str:
    cells = []
    for key, fmt, width in columns:
        v = values.get(key)
        cells.append(f"{'-' if v is None else format(v, fmt):>{width}}")
    return " ".join(cells)


_COLUMNS: list[tuple[str, str, int]] = [
    ("epoch", "d", 5),
    ("loss", ".3f", 7),
    ("train_acc", ".3f", 9),
    ("lr", ".4f", 7),
    ("steps_per_s", ".2f", 7),
    ("accuracy", ".4f", 8),
    ("accuracy_std", ".4f", 7),
    ("auc", ".4f", 7),
    ("tar@far=1e-2", ".4f", 8),
    ("tar@far=1e-3", ".4f", 8),
    ("epoch_s", ".0f", 6),
]
_HEADER = " ".join(
    f"{name:>{width}}"
    for name, width in [
        ("epoch", 5),
        ("loss", 7),
        ("train_acc", 9),
        ("lr", 7),
        ("step/s", 7),
        ("acc", 8),
        ("std", 7),
        ("auc", 7),
        ("tar@1e-2", 8),
        ("tar@1e-3", 8),
        ("time_s", 6),
    ]
)


def pretrain(config: PretrainConfig, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Train (or resume) per ``config``; returns the checkpoint's metrics dict (history included)."""
    import torch
    import torch.nn.functional as F
    from tqdm import tqdm

    from facefl.checkpoint import save_checkpoint, training_state_path
    from facefl.embedders import TorchEmbedder
    from facefl.evaluation import evaluate_verification
    from facefl.losses import CosFaceHead
    from facefl.models import build_backbone, get_architecture

    def say(text: str) -> None:
        (log or tqdm.write)(text)

    arch = get_architecture(config.model)
    dim = config.embedding_dim or arch.default_embedding_dim
    pre = arch.preprocessing
    mean, std = pre.channel_stats()
    torch.set_num_threads(config.threads)

    data = load_data(config, arch.image_size, say, f"pretrain {arch.name} (d={dim}, {arch.image_size}px)")
    images, labels = data.images, data.labels

    model = build_backbone(arch.name, dim, seed=config.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed + 1)
        head = CosFaceHead(dim, data.num_identities, scale=config.scale, margin=config.margin)
    optimizer = torch.optim.SGD(
        _param_groups(model, head, config.weight_decay), lr=config.lr, momentum=config.momentum
    )
    n = len(images)
    batch = min(config.batch_size, n)
    steps_per_epoch = n // batch
    total_steps = steps_per_epoch * config.epochs
    warmup_steps = round(config.warmup_epochs * steps_per_epoch)
    key = {**config.training_key(), "embedding_dim": dim, "data_fingerprint": data.fingerprint}

    out = Path(config.out)
    state_path = training_state_path(out)
    named = {f"model.{k}": v for k, v in model.state_dict().items()} | {"head.weight": head.weight}
    progress = Progress()
    if config.resume and state_path.exists():
        progress = restore(state_path, key, named, optimizer)
        say(f"resuming from {state_path} after epoch {progress.epoch} (step {progress.step})")
        if progress.epoch >= config.epochs:
            say(f"already trained {progress.epoch} >= {config.epochs} epochs: nothing to do")
            return {**progress.metrics, "history": progress.history}
    # the schedule is a function of the global step and the (current) total; see training_key
    last_epoch = config.epochs if config.stop_after is None else min(config.epochs, config.stop_after)

    say(_HEADER)
    for epoch in range(progress.epoch + 1, last_epoch + 1):
        model.train()
        head.train()
        rng, gen = epoch_generators(config.seed, epoch)
        order = rng.permutation(n)
        t_epoch = time.perf_counter()
        loss_sum, correct, seen = 0.0, 0, 0
        lr = config.lr
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch}/{config.epochs}", leave=False, disable=None)
        t_steps = time.perf_counter()
        for b in bar:
            idx = np.sort(order[b * batch : (b + 1) * batch])
            x = torch.from_numpy(pre.normalize(images[idx]))
            y = torch.from_numpy(labels[idx])
            x = augment(x, config.augmentation, gen, mean, std)
            lr = lr_at(progress.step, total_steps, warmup_steps, config.lr, config.min_lr_ratio)
            for g in optimizer.param_groups:
                g["lr"] = lr
            optimizer.zero_grad(set_to_none=True)
            logits = head(model(x), y)
            loss = F.cross_entropy(logits, y)
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"loss became {loss.item()} at epoch {epoch}, step {progress.step}: lower --lr"
                )
            loss.backward()
            optimizer.step()
            progress.step += 1
            loss_sum += loss.item() * len(idx)
            with torch.no_grad():  # accuracy without the margin: the class with the highest cosine
                plain = logits.index_put(
                    (torch.arange(len(y)), y), logits[torch.arange(len(y)), y] + head.scale * head.margin
                )
                correct += int((plain.argmax(1) == y).sum())
            seen += len(idx)
            if b % 10 == 0:
                bar.set_postfix(loss=f"{loss_sum / seen:.3f}", lr=f"{lr:.4f}")
        bar.close()
        train_s = time.perf_counter() - t_steps
        row: dict[str, Any] = {
            "epoch": epoch,
            "step": progress.step,
            "loss": loss_sum / max(seen, 1),
            "train_acc": correct / max(seen, 1),
            "lr": lr,
            "steps_per_s": steps_per_epoch / train_s if train_s > 0 else 0.0,
        }
        if epoch % config.eval_every == 0 or epoch == last_epoch:
            embedder = TorchEmbedder(model, arch.name, device="cpu", batch_size=256)
            report = evaluate_verification(embedder, data.eval_set)
            row.update(report)
            progress.metrics = {"evaluated_on": data.eval_name, "epoch": epoch, **report}
        row["epoch_s"] = time.perf_counter() - t_epoch
        progress.history.append(row)
        progress.epoch = epoch
        say(_format_row(row, _COLUMNS))
        model.eval()
        metrics = progress.metrics
        checkpoint_metrics = (
            {**metrics, "history": progress.history} if metrics else {"history": progress.history}
        )
        save_checkpoint(
            out,
            model,
            arch.name,
            dim,
            metrics=checkpoint_metrics,
            extra={"recipe": key, "epochs_done": epoch, "epochs_planned": config.epochs},
        )
        save(
            state_path,
            key,
            named,
            optimizer,
            progress,
            total_steps=total_steps,
            warmup_steps=warmup_steps,
            seed=config.seed,
        )
    return {**progress.metrics, "history": progress.history}

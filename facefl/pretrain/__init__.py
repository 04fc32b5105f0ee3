"""Centralized pretraining on the LFW public split: ``facefl pretrain --data LFW --out model.safetensors``.

The mini-FedFR protocol (docs/architecture.md, "Evaluation protocol") pretrains the generic model on the
server's public set -- the LFW identities of pair folds 1-5 plus those in no fold -- and evaluates on LFW
pair folds 6-10, which share no identity with it (checked by :class:`facefl.data.lfw.LfwProtocol`).

Training: CosFace (s=30, m=0.4 by default) over the public identities, light augmentation (horizontal
flip, small random scale / shift / rotation, colour jitter), SGD with momentum and weight decay, linear
warmup then cosine decay per step. All training images are decoded once, at the model's input size, into
one uint8 array in memory. After every epoch the model checkpoint (:mod:`facefl.checkpoint`) and a
resumable training state are written; every ``--eval-every`` epochs (and after the last one) the model is
evaluated on the held-out pairs and a table row is printed. With ``--val-folds`` the given folds are also
held out of training and the table reports *them* instead of the test folds: use that to choose
hyper-parameters without looking at the test folds.

The package, one concept per module: :mod:`~facefl.pretrain.config` (the run's settings and the
per-model recipes), :mod:`~facefl.pretrain.data` (decoding the split), :mod:`~facefl.pretrain.augment`,
:mod:`~facefl.pretrain.loop` (the training loop and its schedule), :mod:`~facefl.pretrain.state` (the
resumable state), :mod:`~facefl.pretrain.malloc` and :mod:`~facefl.pretrain.cli` (``facefl pretrain``).

Resuming is at epoch granularity and exact: the data order and augmentation of epoch ``e`` depend only on
``(seed, e)``, and the state file holds the full module state, head and momentum buffers.

Speed (2 shared CPU cores): the CLI tunes glibc malloc in-process (:func:`tune_malloc`, through
``mallopt``; the same settings as the ``MALLOC_*_`` variables, which glibc reads only at start-up, so no
re-exec is needed): a training step of the small model then takes ~10% less time (page faults per step
drop from thousands to tens). Training uses one torch thread by default (see ``--threads``).
"""

from facefl.pretrain.augment import augment
from facefl.pretrain.cli import add_arguments, config_from_args, main, run
from facefl.pretrain.config import RECIPES, Augmentation, PretrainConfig
from facefl.pretrain.loop import lr_at, pretrain
from facefl.pretrain.malloc import MALLOC_ENV, tune_malloc

__all__ = [
    "MALLOC_ENV",
    "RECIPES",
    "Augmentation",
    "PretrainConfig",
    "add_arguments",
    "augment",
    "config_from_args",
    "lr_at",
    "main",
    "pretrain",
    "run",
    "tune_malloc",
]

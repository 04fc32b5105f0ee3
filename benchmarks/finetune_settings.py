"""The fine-tuning settings that benchmarks/finetune_study.py compares: optimizer, learning rate, rounds,
loss and what else each one changes (see that script's docstring)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Setting:
    name: str
    optimizer: str  # "sgd" (momentum 0.9, weight decay 5e-4: the SDK's) or "adam"
    lr: float
    rounds: int = 3
    epochs: int = 1
    margin: float = 0.4
    public: bool = False
    local: bool = False
    # "cosface": the SDK's CosFace head; "metric": dlib's own training loss (loss_metric: pairwise hinge
    # on Euclidean distances of the unnormalized embeddings, threshold 0.6, margin 0.04, hardest negatives)
    loss: str = "cosface"
    # aimed at device DIR (metric loss only): every violating negative pair instead of dlib's hardest ones,
    # dlib's margin widened, only ``fc`` trained (level0 frozen), and after the federated rounds each
    # device fine-tuning its own copy of the global model for this many epochs (tested with its own)
    all_negatives: bool = False
    pair_margin: float = 0.04
    fc_only: bool = False
    personalize_epochs: int = 0
    # with public=True: the strangers are negatives only (each device image against each stranger, the
    # same hinge on the raw distance), never pairs among themselves
    strangers_only_negative: bool = False
    # > 0: only this many public images, those closest to the device's class means (cosine, the model the
    # device starts from), are its strangers: DIR's threshold is set by the closest impostor, a look-alike
    hard_strangers: int = 0


SETTINGS = {
    s.name: s
    for s in (
        Setting("sgd-1e-5", "sgd", 1e-5),  # the strong profile's setting
        Setting("sgd-3e-5", "sgd", 3e-5),
        Setting("sgd-1e-4", "sgd", 1e-4),
        Setting("sgd-1e-3", "sgd", 1e-3),
        Setting("adam-3e-6", "adam", 3e-6),
        Setting("adam-1e-5", "adam", 1e-5),
        Setting("adam-1e-4", "adam", 1e-4),
        Setting("adam-1e-5-6rounds", "adam", 1e-5, rounds=6),
        Setting("adam-3e-5", "adam", 3e-5),
        Setting("adam-3e-5-6rounds", "adam", 3e-5, rounds=6),
        Setting("public-adam-3e-5", "adam", 3e-5, public=True),
        Setting("public-adam-3e-5-6rounds", "adam", 3e-5, rounds=6, public=True),
        Setting("public-adam-1e-4", "adam", 1e-4, public=True),
        Setting("metric-adam-1e-5", "adam", 1e-5, loss="metric"),
        Setting("metric-adam-3e-5", "adam", 3e-5, loss="metric"),
        Setting("metric-adam-1e-4", "adam", 1e-4, loss="metric"),
        Setting("metric-adam-5e-6", "adam", 5e-6, loss="metric"),
        Setting("metric-adam-2e-5", "adam", 2e-5, loss="metric"),
        Setting("metric-adam-1e-5-6rounds", "adam", 1e-5, rounds=6, loss="metric"),
        Setting("metric-adam-1e-5-2epochs", "adam", 1e-5, epochs=2, loss="metric"),
        Setting("metric-adam-1e-5-10rounds", "adam", 1e-5, rounds=10, loss="metric"),
        Setting("metric-allneg-adam-1e-5-6rounds", "adam", 1e-5, rounds=6, loss="metric", all_negatives=True),
        Setting("metric-public-adam-1e-5", "adam", 1e-5, loss="metric", public=True),
        Setting("metric-sgd-1e-4", "sgd", 1e-4, loss="metric"),
        Setting("metric-allneg-adam-1e-5", "adam", 1e-5, loss="metric", all_negatives=True),
        Setting("metric-margin0.1-adam-1e-5", "adam", 1e-5, loss="metric", pair_margin=0.1),
        Setting("metric-fc-adam-1e-4", "adam", 1e-4, loss="metric", fc_only=True),
        Setting("metric-fc-adam-3e-4", "adam", 3e-4, loss="metric", fc_only=True),
        Setting("metric-adam-1e-5-personalize", "adam", 1e-5, loss="metric", personalize_epochs=1),
        Setting(
            "metric-strangers-adam-1e-5",
            "adam",
            1e-5,
            loss="metric",
            public=True,
            strangers_only_negative=True,
        ),
        Setting(
            "metric-hardstrangers-adam-1e-5",
            "adam",
            1e-5,
            loss="metric",
            public=True,
            strangers_only_negative=True,
            hard_strangers=64,
        ),
        Setting("local-metric-adam-3e-5", "adam", 3e-5, loss="metric", local=True),
        Setting("adam-1e-5-margin0.2", "adam", 1e-5, margin=0.2),
        Setting("public-adam-1e-5", "adam", 1e-5, public=True),
        Setting("public-sgd-1e-4", "sgd", 1e-4, public=True),
        Setting("local-sgd-1e-5", "sgd", 1e-5, local=True),
        Setting("local-public-adam-1e-5", "adam", 1e-5, public=True, local=True),
        Setting("local-public-adam-3e-5", "adam", 3e-5, public=True, local=True),
        Setting("local-public-sgd-1e-4", "sgd", 1e-4, public=True, local=True),
    )
}

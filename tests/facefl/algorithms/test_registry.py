"""The registry: one home per algorithm, consulted everywhere else (names, docs, hyper-parameters)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from facefl.algorithms import registry
from facefl.models import backbone_state, global_extra_prefixes, trainable_names

ROOT = Path(__file__).resolve().parents[3]


def test_names_and_local_updates() -> None:
    assert registry.NAMES[:4] == ("fedavg", "fedprox", "fedfr", "fedface")
    assert {"fedavgm", "fedadam", "fedyogi"} <= set(registry.NAMES)
    assert registry.local_update_names() == ("fedavg", "fedprox", "fedfr", "fedface")
    assert registry.get("FedAdam").name == "fedadam"
    with pytest.raises(ValueError, match="fedavg, fedprox, fedfr and fedface"):
        registry.get("scaffold")


def test_global_extras_come_from_the_algorithms() -> None:
    assert global_extra_prefixes() == ("public_head.",)
    tensors = {"a.weight": 1, "public_head.weight": 2}
    assert list(backbone_state(tensors)) == ["a.weight"]  # type: ignore[arg-type]
    assert trainable_names(tensors, ("b.",)) == ["public_head.weight"]


def test_protocol_docs_table_is_the_registry() -> None:
    doc = (ROOT / "docs" / "protocol.md").read_text()
    block = doc.split("<!-- algorithms:begin -->\n", 1)[1].split("<!-- algorithms:end -->", 1)[0]
    assert block == registry.markdown(), "regenerate with: python -m facefl.algorithms"


def test_the_api_enum_is_the_registry() -> None:
    from server_api.task_schemas import TaskIn

    enum = TaskIn.model_json_schema()["properties"]["algorithm"]["enum"]
    assert tuple(enum) == registry.NAMES


def test_no_algorithm_name_is_compared_outside_its_module() -> None:
    """server_api, device_sdk, simulator, export and facefl (outside facefl/algorithms) never spell an
    algorithm's name: they ask the registry."""
    names = "|".join(registry.NAMES)
    pattern = re.compile(rf"""["']({names})["']""")
    out = subprocess.run(
        ["git", "ls-files", "server_api", "device_sdk", "simulator", "export", "facefl"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    offenders = [
        f"{path}:{i}"
        for path in out
        if path.endswith(".py") and not path.startswith("facefl/algorithms/")
        for i, line in enumerate((ROOT / path).read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert offenders == []


def test_the_local_loss_belongs_to_fedavgs_local_update_only() -> None:
    hp = registry.task_hyperparams("fedprox", {"mu": 0.01, "loss": "pair_margin", "optimizer": "adam"})
    assert (hp.loss, hp.optimizer) == ("pair_margin", "adam")
    with pytest.raises(ValueError, match=r"hyperparams\.loss applies to"):
        registry.task_hyperparams("fedfr", {"loss": "pair_margin"})
    with pytest.raises(ValueError, match=r"hyperparams\.loss"):
        registry.task_hyperparams("fedavg", {"loss": "triplet"})
    with pytest.raises(ValueError, match=r"hyperparams\.optimizer"):
        registry.task_hyperparams("fedface", {"optimizer": "rmsprop"})

"""The task-creation schema the API documents: one branch per registry algorithm with that algorithm's
hyper-parameter model, and a server that accepts exactly the bodies the document allows (through the ASGI
app on a real SQLite file)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import jsonschema
import pytest
from fastapi.testclient import TestClient

from facefl.algorithms import registry
from server_api.app import create_app
from server_api.settings import Settings
from tests.conftest import ADMIN, make_settings

ADMIN_H = {"Authorization": f"Bearer {ADMIN}"}


def _openapi() -> dict[str, Any]:
    return create_app(Settings(dev_mode=True, migrate_on_start=False)).openapi()


@pytest.fixture(scope="module")
def spec() -> dict[str, Any]:
    return _openapi()


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    with TestClient(create_app(make_settings(tmp_path_factory.mktemp("schema")))) as c:
        yield c


def _documented_valid(spec: dict[str, Any], body: dict[str, Any]) -> bool:
    """``body`` against the published TaskIn schema (its $refs resolved within the document)."""
    schema = {**spec["components"]["schemas"]["TaskIn"], "components": spec["components"]}
    validator = jsonschema.Draft202012Validator(schema, format_checker=None)
    return validator.is_valid(body)


def test_one_branch_per_algorithm_with_its_own_model(spec: dict[str, Any]) -> None:
    task_in = spec["components"]["schemas"]["TaskIn"]
    branches = {b["title"]: b for b in task_in["oneOf"]}
    assert list(branches) == list(registry.NAMES)
    for name, algorithm in registry.ALGORITHMS.items():
        branch = branches[name]
        assert branch["properties"]["algorithm"] == {"const": name}
        hp = branch["properties"]["hyperparams"]
        assert hp["title"] == algorithm.hyperparams.__name__
        assert set(hp["properties"]) == set(algorithm.hyperparams.model_fields)
        assert hp["additionalProperties"] is False
        # a body without "algorithm" is the default's: only that branch may match it
        assert ("required" in branch) == (name != registry.DEFAULT)
    fedprox = branches["fedprox"]["properties"]["hyperparams"]["properties"]["mu"]
    assert fedprox["type"] == "number" and fedprox["maximum"] == 100
    public_set = branches["fedfr"]["properties"]["hyperparams"]["properties"]["public_set"]
    assert any("pattern" in option for option in public_set["anyOf"])  # no control characters


BODIES: list[tuple[dict[str, Any], str | None]] = [
    # (task fields, the field a 422 names; None: accepted)
    ({}, None),
    ({"hyperparams": {"lr": 0.1, "batch_size": 8}}, None),
    ({"algorithm": "fedprox", "hyperparams": {"mu": 0.01}}, None),
    ({"algorithm": "fedadam", "hyperparams": {"server_lr": 0.1, "beta1": 0.5, "lr": 1}}, None),
    ({"algorithm": "fedyogi", "hyperparams": {"tau": 0.01}}, None),
    ({"algorithm": "fedavgm", "hyperparams": {"server_momentum": 0.0}}, None),
    ({"algorithm": "fedface", "hyperparams": {"spreadout_steps": 3}}, None),
    ({"hyperparams": {"nope": 1}}, "hyperparams.nope"),
    ({"hyperparams": {"mu": 0.1}}, "hyperparams.mu"),  # fedprox's, not fedavg's
    ({"algorithm": "fedadam", "hyperparams": {"server_momentum": 0.9}}, "hyperparams.server_momentum"),
    ({"algorithm": "fedprox", "hyperparams": {"mu": 1000}}, "hyperparams.mu"),
    ({"hyperparams": {"lr": -1}}, "hyperparams.lr"),
    # JSON types are not coerced, as the document says and as in every other request field
    ({"hyperparams": {"lr": True}}, "hyperparams.lr"),
    ({"hyperparams": {"batch_size": "8"}}, "hyperparams.batch_size"),
    ({"hyperparams": {"batch_size": 8.5}}, "hyperparams.batch_size"),
    ({"algorithm": "fedface", "hyperparams": {"spreadout_steps": False}}, "hyperparams.spreadout_steps"),
]


@pytest.mark.parametrize(("fields", "named"), BODIES)
def test_the_server_accepts_exactly_what_the_schema_documents(
    spec: dict[str, Any], client: TestClient, fields: dict[str, Any], named: str | None
) -> None:
    body = {"name": "t", "architecture": "tiny", "embedding_dim": 8, "rounds": 1, **fields}
    assert _documented_valid(spec, body) == (named is None)
    r = client.post("/v1/tasks", json=body, headers=ADMIN_H)
    if named is None:
        assert r.status_code == 201, r.text
        hp = r.json()["hyperparams"]
        assert set(hp) == set(registry.get(body.get("algorithm", "fedavg")).hyperparams.model_fields)
        for key, value in fields.get("hyperparams", {}).items():
            assert hp[key] == value
    else:
        assert r.status_code == 422, r.text
        assert named in r.json()["detail"]


def test_task_checks_beyond_the_schema_still_refuse(spec: dict[str, Any], client: TestClient) -> None:
    """What the schema cannot say (FedProx needs mu > 0, FedFR a configured public set) is still refused
    at creation, naming the field."""
    for fields, named in (
        ({"algorithm": "fedprox"}, "hyperparams.mu"),
        ({"algorithm": "fedfr", "hyperparams": {}}, "hyperparams.public_set"),
    ):
        body = {"name": "t", "architecture": "tiny", "embedding_dim": 8, **fields}
        assert _documented_valid(spec, body)
        r = client.post("/v1/tasks", json=body, headers=ADMIN_H)
        assert r.status_code == 422 and named in r.json()["detail"], r.text

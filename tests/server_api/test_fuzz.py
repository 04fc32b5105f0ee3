"""Schemathesis fuzzing of the OpenAPI spec against a real uvicorn server on a real SQLite file.

For every operation (bounded examples, deterministic): never a 5xx, and a refused request (4xx) leaves
every table, the blob store and the staging area exactly as they were. The deadline ticker is parked
(a very long tick interval) so that only requests change state, and rate limits are off (tested
elsewhere) so that the fuzzer reaches the handlers.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
import sqlalchemy as sa
from hypothesis import HealthCheck, settings
from schemathesis.checks import CHECKS, load_all_checks
from schemathesis.core.parameters import ParameterLocation

from tests.conftest import ADMIN, SECRET, LiveServer
from tests.server_api.fleet import database

pytestmark = pytest.mark.slow

ADMIN_ONLY = {
    ("POST", "/v1/tasks"),
    ("POST", "/v1/models"),
    # the operator's actions and views
    ("POST", "/v1/tasks/{task_id}/pause"),
    ("POST", "/v1/tasks/{task_id}/resume"),
    ("POST", "/v1/rounds/{round_id}/abandon"),
    ("GET", "/v1/rounds/{round_id}/participants"),
    ("GET", "/v1/devices"),
}


class Target:
    def __init__(self, server: LiveServer, device_token: str) -> None:
        self.server = server
        self.device_token = device_token

    def snapshot(self) -> dict[str, Any]:
        queries = {
            "devices": "SELECT id, name, token_hash, capabilities FROM devices ORDER BY id",
            "tasks": "SELECT id, status, current_version, aggregated_rounds FROM tasks ORDER BY id",
            "rounds": "SELECT id, status, assigned, reported, result_version FROM rounds ORDER BY id",
            "assignments": "SELECT id, round_id, device_id, upload_token_hash, reported FROM assignments"
            " ORDER BY id",
            "updates": "SELECT id, round_id, device_id, blob_key FROM updates ORDER BY id",
            "model_versions": "SELECT version, blob_key FROM model_versions ORDER BY version",
        }
        with database(self.server.database_url) as conn:
            state: dict[str, Any] = {
                k: [tuple(r) for r in conn.execute(sa.text(q))] for k, q in queries.items()
            }
        blobs = self.server.data_dir / "blobs"
        state["blobs"] = sorted(p.name for p in blobs.glob("??/??/*"))
        state["staging"] = sorted(p.name for p in (blobs / "staging").rglob("*.part"))
        return state


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    tmp: Path = tmp_path_factory.mktemp("fuzz")
    server = LiveServer(
        tmp, FACEFL_TICK_INTERVAL_S="100000", FACEFL_RATE_LIMIT_PER_S="0", FACEFL_MAX_UPLOAD_BYTES="2000000"
    ).start()
    try:
        with httpx.Client(base_url=server.base_url, timeout=30) as c:
            admin = {"Authorization": f"Bearer {ADMIN}"}
            r = c.post("/v1/tasks", json={"name": "fuzz", "embedding_dim": 8}, headers=admin)
            assert r.status_code == 201, r.text
            token = c.post("/v1/devices", json={"enrollment_secret": SECRET}).json()["token"]
            r = c.post("/v1/checkin", json={}, headers={"Authorization": f"Bearer {token}"})
            assert r.json()["action"] == "train"
        yield Target(server, token)
    finally:
        server.stop()


def _openapi() -> dict[str, Any]:
    """The spec the server publishes at /openapi.json (built without starting the app)."""
    from server_api.app import create_app
    from server_api.settings import Settings

    return create_app(Settings(dev_mode=True, migrate_on_start=False)).openapi()


schema = schemathesis.openapi.from_dict(_openapi())


# Every schemathesis check (the CLI's `--checks all`), against a real server, except:
EXCLUDED_CHECKS: dict[str, str] = {
    # The OpenAPI schema of an upload body is "any bytes"; it cannot say "a safetensors payload whose
    # tensors match this round's base model", so schema-valid random bytes are rightly refused (422).
    # Likewise a generated task may name an eval set or initial version that does not exist (422).
    "positive_data_acceptance": "schema-valid bodies the schema cannot tell are invalid (safetensors)",
}
load_all_checks()
CHECKS_TO_RUN = [c for c in CHECKS.get_all() if c.__name__ not in EXCLUDED_CHECKS]


def _check_case(case: Any, target: Target) -> None:
    admin = (case.method.upper(), case.path) in ADMIN_ONLY
    token = ADMIN if admin else target.device_token
    headers = {"Authorization": f"Bearer {token}"}
    if case.meta is not None and case.meta.is_negative_at(ParameterLocation.HEADER):
        # a case that mutates the headers (e.g. drops the required Authorization) is sent as generated:
        # adding a valid token would undo its mutation, and the server rightly accept it
        headers = {}
    before = target.snapshot()
    response = case.call(base_url=target.server.base_url, headers=headers, timeout=30)
    assert response.status_code < 500, (
        f"{case.method} {case.formatted_path}: {response.status_code} {response.text}"
    )
    if 400 <= response.status_code < 500:
        assert target.snapshot() == before, f"{case.method} {case.formatted_path} {response.status_code}"
    # then every check: documented status codes, headers and bodies, 405 + Allow, auth not ignored, ...
    case.validate_response(
        response,
        checks=CHECKS_TO_RUN,
        headers=headers,
        transport_kwargs={"base_url": target.server.base_url, "headers": headers, "timeout": 30},
    )


def _fuzz_test(method: str, path: str) -> Callable[[Any, Target], None]:
    """One test function per operation. `schema.parametrize()` over the whole schema gives all its items
    one node id, and pytest-xdist (`make test` runs on two workers) schedules by node id: it ran only
    the first operation. A function per operation keeps every node id distinct."""

    @schema.include(method=method, path=path).parametrize()
    @settings(
        max_examples=25,
        deadline=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
        database=None,
    )
    def test(case: Any, target: Target) -> None:
        _check_case(case, target)

    return test


OPERATIONS = sorted(
    (op.method.upper(), op.path) for op in (result.ok() for result in schema.get_all_operations())
)
for _method, _path in OPERATIONS:
    _name = "test_no_5xx_and_refusals_change_nothing_" + re.sub(r"\W+", "_", f"{_method}{_path}").strip("_")
    globals()[_name] = _fuzz_test(_method, _path)
    globals()[_name].__name__ = _name


def test_every_operation_has_its_own_fuzz_test() -> None:
    names = [n for n in globals() if n.startswith("test_no_5xx_and_refusals_change_nothing_")]
    assert len(names) == len(OPERATIONS) == len(set(names)) >= 20

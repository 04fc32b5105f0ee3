"""Bounded resources and crafted input (issue 14): body limits before authentication and parsing, body
timeouts, uploads in flight, registration rate limits, staging swept after a crash, and crafted headers,
metrics, names and metadata that must be a 4xx (never a 500) and change nothing.

Stalled and aborted uploads run against a real uvicorn server on 127.0.0.1 over raw sockets (a client
that stops sending mid-body is exactly what they test); the rest goes through the ASGI app on a real
SQLite file and on PostgreSQL.
"""

from __future__ import annotations

import json
import select
import socket
import struct
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from facefl import codec
from server_api.app import create_app
from tests.conftest import ADMIN, SECRET, LiveServer, make_settings
from tests.server_api.test_api import ADMIN_H, Api, task_body, unchanged, wait_for

# --- through the ASGI app, SQLite and PostgreSQL ---------------------------------------------------


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def api(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Api]:
    url = request.getfixturevalue("pg_url") if request.param == "postgres" else None
    settings = make_settings(tmp_path, url, max_upload_bytes=4 * 1024 * 1024, max_json_bytes=4096)
    with TestClient(create_app(settings)) as client:
        yield Api(client)


@pytest.fixture
def assigned(api: Api) -> tuple[dict[str, str], dict[str, Any]]:
    api.task(policy={"target_reports": 5, "min_reports": 1, "update_norm_bound": 100.0})
    dev = api.device()
    return dev, api.assignment(dev)


def _chunks(n: int, size: int = 1024) -> Iterator[bytes]:
    for _ in range(n):
        yield b" " * size


@pytest.mark.parametrize(
    ("method", "path", "admin"),
    [("POST", "/v1/devices", False), ("POST", "/v1/tasks", True), ("POST", "/v1/checkin", False)],
)
def test_json_bodies_above_the_limit_are_413_declared_or_streamed(
    api: Api, method: str, path: str, admin: bool
) -> None:
    headers = {"Content-Type": "application/json", **(ADMIN_H if admin else {})}
    # declared: refused from the Content-Length alone, whatever the credentials (none here for devices)
    r = unchanged(api, lambda: api.c.request(method, path, content=b" " * 5000, headers=headers))
    assert r.status_code == 413 and r.json()["code"] == "too_large"
    # no Content-Length (chunked): refused while streaming
    r = unchanged(api, lambda: api.c.request(method, path, content=_chunks(8), headers=headers))
    assert r.status_code == 413 and r.json()["code"] == "too_large"


def test_json_body_below_the_limit_still_works(api: Api) -> None:
    body = json.dumps({"enrollment_secret": SECRET, "name": "p"}).encode() + b" " * 3000
    r = api.c.post("/v1/devices", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 201, r.text


@pytest.mark.parametrize(
    "body",
    [
        {"enrollment_secret": SECRET, "name": "phone\u0000"},
        {"enrollment_secret": SECRET, "name": "tab\there"},
        {"enrollment_secret": SECRET, "name": "\ud800"},
        {"enrollment_secret": SECRET, "capabilities": {"accelerator": "c\u0000pu"}},
        {"enrollment_secret": SECRET + "\u0000"},
    ],
)
def test_control_characters_in_device_fields_are_422(api: Api, body: dict[str, Any]) -> None:
    # json.dumps escapes them (\u0000): valid JSON that decodes to a control character
    content = json.dumps(body).encode()
    r = unchanged(
        api, lambda: api.c.post("/v1/devices", content=content, headers={"Content-Type": "application/json"})
    )
    assert r.status_code == 422 and r.json()["code"] == "invalid_request", r.text


@pytest.mark.parametrize("name", ["t\u0000", "new\nline", "\u0085", "\udfff"])
def test_control_characters_in_task_fields_are_422(api: Api, name: str) -> None:
    for body in (task_body(name=name), task_body(eval_set=name)):
        content = json.dumps(body).encode()
        r = unchanged(
            api,
            lambda c=content: api.c.post(
                "/v1/tasks", content=c, headers={**ADMIN_H, "Content-Type": "application/json"}
            ),
        )
        assert r.status_code == 422, r.text


def test_unicode_names_without_control_characters_are_fine(api: Api) -> None:
    r = api.c.post("/v1/devices", json={"enrollment_secret": SECRET, "name": "téléphone ² 电话"})
    assert r.status_code == 201, r.text


@pytest.mark.parametrize(
    "metrics",
    [
        "[" * 2000 + "]" * 2000,  # nested arrays (a RecursionError, i.e. a 500, before the fix)
        '{"loss": ' + "[" * 1900 + "]" * 1900 + "}",
        '{"loss": 1' + "0" * 400 + "}",  # 10^400: an int that overflows a float
        '{"loss": 1e400}',
        '{"loss": NaN}',
        '{"loss": Infinity}',
        '{"lo\\u0000ss": 1.0}',
        '{"loss": ' + "9" * 4090 + "}",
    ],
)
def test_crafted_metrics_are_422(
    api: Api, assigned: tuple[dict[str, str], dict[str, Any]], metrics: str
) -> None:
    dev, a = assigned
    body = api.delta_bytes(a)
    r = unchanged(api, lambda: api.upload(dev, a, body, **{"X-Metrics": metrics[:4096]}))
    assert r.status_code == 422 and r.json()["code"] in {"bad_metrics", "invalid_request"}, r.text


@pytest.mark.parametrize("value", [" 5", "5 ", "+5", "5_0", "5.0", "0x5", "\u0665"])
def test_num_samples_is_parsed_strictly(
    api: Api, assigned: tuple[dict[str, str], dict[str, Any]], value: str
) -> None:
    dev, a = assigned
    body = api.delta_bytes(a)
    q = urllib.parse.quote(value)
    r = unchanged(
        api,
        lambda: api.c.post(
            f"/v1/rounds/{a['round_id']}/updates?num_samples={q}",
            content=body,
            headers={**dev, "X-Upload-Token": a["upload_token"]},
        ),
    )
    assert r.status_code == 422, r.text
    assert api.upload(dev, a, body, num_samples=5).status_code == 202


def _raw_header(header: str, body: bytes = b"") -> bytes:
    raw = header.encode()
    return struct.pack("<Q", len(raw)) + raw + body


def _crafted_updates(w: dict[str, np.ndarray]) -> dict[str, bytes]:
    name = next(iter(w))
    return {
        "f64": codec.encode({k: np.zeros(v.shape, np.float64) for k, v in w.items()}),
        "shape_2_70": _raw_header(
            json.dumps({name: {"dtype": "F32", "shape": [2**70], "data_offsets": [0, 4]}}), b"\0" * 4
        ),
        "nested_5000": _raw_header("[" * 5000 + "]" * 5000),
        "nested_metadata": _raw_header(json.dumps({"__metadata__": {"a": [[[]]]}})),
        "huge_header_length": struct.pack("<Q", 2**63) + b"{}",
        "bool_shape": _raw_header(
            json.dumps({name: {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}}), b"\0" * 4
        ),
    }


@pytest.mark.parametrize(
    "case", ["f64", "shape_2_70", "nested_5000", "nested_metadata", "huge_header_length", "bool_shape"]
)
def test_crafted_update_headers_are_422(
    api: Api, assigned: tuple[dict[str, str], dict[str, Any]], case: str
) -> None:
    dev, a = assigned
    body = _crafted_updates(api.weights(a["base_version"]))[case]
    r = unchanged(api, lambda: api.upload(dev, a, body))
    assert r.status_code == 422 and r.json()["code"] == "bad_update", r.text
    assert not api.ctx.blobs.staging_files()
    assert api.upload(dev, a, api.delta_bytes(a)).status_code == 202  # the assignment was not used up


def _small_model() -> dict[str, np.ndarray]:
    from facefl.models import build_backbone, state_to_numpy

    return state_to_numpy(build_backbone("small", 64, seed=5))


@pytest.mark.parametrize(
    "case", ["superscript_dim", "arabic_dim", "dim_out_of_range", "nested_header", "f64", "deep_header"]
)
def test_crafted_model_imports_are_422(api: Api, case: str) -> None:
    w = _small_model()
    small = {"architecture": "small", "embedding_dim": "64"}
    bodies = {
        "superscript_dim": codec.encode(w, metadata={**small, "embedding_dim": "²"}),
        "arabic_dim": codec.encode(w, metadata={**small, "embedding_dim": "٦٤"}),
        "dim_out_of_range": codec.encode(w, metadata={**small, "embedding_dim": "0064000"}),
        "nested_header": _raw_header(json.dumps({"__metadata__": {"architecture": {"x": [1]}}})),
        "f64": codec.encode({k: v.astype(np.float64) for k, v in w.items()}, metadata=small),
        "deep_header": _raw_header('{"__metadata__": ' + "[" * 5000 + "]" * 5000 + "}"),
    }
    r = unchanged(api, lambda: api.c.post("/v1/models", content=bodies[case], headers=ADMIN_H))
    assert r.status_code == 422, r.text


def test_registration_is_rate_limited_per_address_and_in_all(tmp_path: Path) -> None:
    settings = make_settings(
        tmp_path, register_rate_per_s=0.001, register_burst=2, register_global_rate_per_s=0
    )
    with TestClient(create_app(settings), client=("10.0.0.1", 1000)) as client:
        api = Api(client)
        api.device(), api.device()
        r = unchanged(api, lambda: client.post("/v1/devices", json={"enrollment_secret": SECRET}))
        assert r.status_code == 429 and r.json()["code"] == "rate_limited"
        assert int(r.headers["Retry-After"]) >= 1
        # a wrong secret is limited too (guessing it costs tokens), and still 429 first
        r = unchanged(api, lambda: client.post("/v1/devices", json={"enrollment_secret": "wrong-secret"}))
        assert r.status_code == 429
        other = TestClient(client.app, client=("10.0.0.2", 1000))  # same app, another address
        assert other.post("/v1/devices", json={"enrollment_secret": SECRET}).status_code == 201

    settings = make_settings(
        tmp_path / "global", register_rate_per_s=0, register_global_rate_per_s=0.001, register_global_burst=3
    )
    with TestClient(create_app(settings), client=("10.0.0.1", 1000)) as client:
        api = Api(client)
        codes = [
            TestClient(client.app, client=(f"10.0.1.{i}", 1000))
            .post("/v1/devices", json={"enrollment_secret": SECRET})
            .status_code
            for i in range(5)
        ]
        assert codes == [201, 201, 201, 429, 429]


# --- a real server: stalled, trickling, aborted and concurrent uploads --------------------------


class Live:
    def __init__(self, server: LiveServer) -> None:
        self.server = server
        self.http = httpx.Client(base_url=server.base_url, timeout=30)

    def device(self) -> dict[str, str]:
        r = self.http.post("/v1/devices", json={"enrollment_secret": SECRET})
        assert r.status_code == 201, r.text
        return {"Authorization": f"Bearer {r.json()['token']}"}

    def assignment(self, dev: dict[str, str]) -> dict[str, Any]:
        r = self.http.post("/v1/checkin", json={}, headers=dev)
        assert r.json()["action"] == "train", r.text
        return dict(r.json()["assignment"])

    def delta(self, a: dict[str, Any]) -> bytes:
        r = self.http.get(f"/v1/models/{a['base_version']}", headers={"Authorization": f"Bearer {ADMIN}"})
        return codec.encode({k: np.full_like(v, 0.01) for k, v in codec.decode(r.content).items()})

    def upload(self, dev: dict[str, str], a: dict[str, Any], body: bytes) -> httpx.Response:
        return self.http.post(
            f"/v1/rounds/{a['round_id']}/updates?num_samples=3",
            content=body,
            headers={**dev, "X-Upload-Token": a["upload_token"]},
        )

    def reported(self, a: dict[str, Any]) -> int:
        r = self.http.get(f"/v1/rounds/{a['round_id']}", headers={"Authorization": f"Bearer {ADMIN}"})
        return int(r.json()["reported"])

    def staged(self) -> list[Path]:
        return sorted((self.server.data_dir / "blobs" / "staging").rglob("*.part"))

    def open_upload(
        self, dev: dict[str, str], a: dict[str, Any], declared: int, first: bytes
    ) -> socket.socket:
        """An upload that declares ``declared`` bytes and sends only ``first`` (the caller goes on)."""
        assert self.server.port is not None
        sock = socket.create_connection(("127.0.0.1", self.server.port), timeout=30)
        head = (
            f"POST /v1/rounds/{a['round_id']}/updates?num_samples=3 HTTP/1.1\r\n"
            f"Host: 127.0.0.1\r\nAuthorization: {dev['Authorization']}\r\n"
            f"X-Upload-Token: {a['upload_token']}\r\nContent-Type: application/octet-stream\r\n"
            f"Content-Length: {declared}\r\n\r\n"
        )
        sock.sendall(head.encode() + first)
        return sock


def _status_and_body(sock: socket.socket, timeout: float = 30.0) -> tuple[int, dict[str, Any]]:
    """Read one HTTP response (the server closes the connection after it)."""
    sock.settimeout(timeout)
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            break
        if not chunk:
            break
        data += chunk
        head, sep, rest = data.partition(b"\r\n\r\n")
        length = [
            int(v)
            for k, _, v in (h.partition(b":") for h in head.split(b"\r\n"))
            if k.lower() == b"content-length"
        ]
        if sep and length and len(rest) >= length[0]:
            break
    head, _, rest = data.partition(b"\r\n\r\n")
    assert head, "no response"
    return int(head.split()[1]), json.loads(rest) if rest else {}


def _until(predicate: Callable[[], bool], timeout: float = 30.0) -> None:
    wait_for(predicate, timeout)


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    server = LiveServer(
        tmp_path_factory.mktemp("limits"),
        FACEFL_BODY_IDLE_TIMEOUT_S="5",
        FACEFL_BODY_DEADLINE_S="8",
        FACEFL_MAX_CONCURRENT_UPLOADS="3",
        FACEFL_RATE_LIMIT_PER_S="0",
        FACEFL_LOG_LEVEL="INFO",
    ).start()
    live = Live(server)
    try:
        body = task_body(name="limits", embedding_dim=8)
        body["policy"] = {"target_reports": 1000, "min_reports": 1, "round_timeout_s": 3600}
        r = live.http.post("/v1/tasks", json=body, headers={"Authorization": f"Bearer {ADMIN}"})
        assert r.status_code == 201, r.text
        yield live
    finally:
        live.http.close()
        server.stop()


def test_stalled_upload_gets_408_and_its_staging_file_is_deleted(live: Live) -> None:
    dev = live.device()
    a = live.assignment(dev)
    before = live.reported(a)
    sock = live.open_upload(dev, a, 100_000, b"\0" * 1000)
    with sock:
        status, body = _status_and_body(sock)
    assert status == 408 and body["code"] == "body_timeout"
    assert not live.staged() and live.reported(a) == before
    assert live.upload(dev, a, live.delta(a)).status_code == 202  # the assignment is still usable


def test_trickling_upload_hits_the_body_deadline(live: Live) -> None:
    dev = live.device()
    a = live.assignment(dev)
    sock = live.open_upload(dev, a, 100_000, b"\0")
    with sock:
        for _ in range(150):  # one byte every 0.2 s: never idle, never complete; bounded at 30 s
            if select.select([sock], [], [], 0.2)[0]:
                break
            sock.sendall(b"\0")
        status, body = _status_and_body(sock)
    assert status == 408 and body["code"] == "body_timeout" and "deadline" in body["detail"]
    _until(lambda: not live.staged())


def test_second_concurrent_upload_for_one_assignment_is_409(live: Live) -> None:
    dev = live.device()
    a = live.assignment(dev)
    body = live.delta(a)
    before = live.reported(a)
    sock = live.open_upload(dev, a, len(body), body[:100])
    try:
        _until(lambda: len(live.staged()) == 1)  # the first one is streaming
        r = live.upload(dev, a, body)
        assert r.status_code == 409 and r.json()["code"] == "upload_in_progress"
        assert len(live.staged()) == 1 and live.reported(a) == before
        sock.sendall(body[100:])  # the first one completes and is accepted
        status, _ = _status_and_body(sock)
        assert status == 202 and live.reported(a) == before + 1
    finally:
        sock.close()


def test_uploads_beyond_the_cap_get_503_before_anything_is_staged(live: Live) -> None:
    pairs = [(d, live.assignment(d)) for d in (live.device() for _ in range(4))]
    socks = [live.open_upload(d, a, 100_000, b"\0" * 10) for d, a in pairs[:3]]
    try:
        _until(lambda: len(live.staged()) == 3)
        dev, a = pairs[3]
        r = live.upload(dev, a, live.delta(a))
        assert r.status_code == 503 and r.json()["code"] == "busy" and int(r.headers["Retry-After"]) >= 1
        assert len(live.staged()) == 3
    finally:
        for s in socks:
            s.close()
    _until(lambda: not live.staged())
    assert live.upload(dev, a, live.delta(a)).status_code == 202


def test_aborted_upload_logs_one_info_line_and_no_traceback(live: Live) -> None:
    dev = live.device()
    a = live.assignment(dev)
    log_before = live.server.log_tail(10**9)
    with live.open_upload(dev, a, 100_000, b"\0" * 500):
        _until(lambda: len(live.staged()) == 1)
    _until(lambda: "client disconnected" in live.server.log_tail(10**9)[len(log_before) :])
    _until(lambda: not live.staged())
    new = live.server.log_tail(10**9)[len(log_before) :]
    assert "Traceback" not in new and "ClientDisconnect" not in new and " ERROR " not in new
    assert next(line for line in new.splitlines() if "client disconnected" in line).split()[2] == "INFO"


def test_content_length_above_the_limit_is_refused_before_the_body(live: Live) -> None:
    assert live.server.port is not None
    for path in ("/v1/devices", "/v1/tasks"):
        with socket.create_connection(("127.0.0.1", live.server.port), timeout=30) as sock:
            sock.sendall(
                f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                f"Content-Length: {100 * 1024 * 1024}\r\n\r\n".encode()
            )
            status, body = _status_and_body(sock)  # answered without a single body byte sent
        assert status == 413 and body["code"] == "too_large"


def test_stalled_json_body_gets_408_before_any_parsing(live: Live) -> None:
    assert live.server.port is not None
    with socket.create_connection(("127.0.0.1", live.server.port), timeout=30) as sock:
        sock.sendall(
            b"POST /v1/devices HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b'Content-Length: 100\r\n\r\n{"enrollment_secret": '
        )
        status, body = _status_and_body(sock)
    assert status == 408 and body["code"] == "body_timeout"


def test_staging_files_of_a_killed_server_are_swept_at_start(tmp_path: Path) -> None:
    server = LiveServer(tmp_path, FACEFL_RATE_LIMIT_PER_S="0", FACEFL_LOG_LEVEL="INFO").start()
    try:
        live = Live(server)
        r = live.http.post(
            "/v1/tasks", json=task_body(embedding_dim=8), headers={"Authorization": f"Bearer {ADMIN}"}
        )
        assert r.status_code == 201
        dev = live.device()
        a = live.assignment(dev)
        sock = live.open_upload(dev, a, 100_000, b"\0" * 5000)
        with sock:
            _until(lambda: len(live.staged()) == 1)
            server.kill()  # SIGKILL: nothing cleans up
        assert len(live.staged()) == 1
        server.restart()
        assert not live.staged()
        assert "staging: removed 1 files" in server.log_tail(10**9)
        live.http.close()
    finally:
        server.stop()


# --- the OpenAPI document describes what the server answers (schemathesis checks it in test_fuzz) --


def test_openapi_declares_error_out_and_every_refusal(api: Api) -> None:
    spec = api.c.get("/openapi.json").json()
    assert "HTTPValidationError" not in spec["components"]["schemas"]
    error_ref = {"$ref": "#/components/schemas/ErrorOut"}
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            responses = op["responses"]
            assert {"408", "413", "422"} <= responses.keys(), (method, path)
            assert responses["422"]["content"]["application/json"]["schema"] == error_ref, (method, path)
            security = any("HTTPBearer" in s for s in op.get("security", []))
            if security:
                assert "401" in responses, (method, path)
    upload = spec["paths"]["/v1/rounds/{round_id}/updates"]["post"]["responses"]
    assert {"401", "403", "404", "409", "410", "429", "503"} <= upload.keys()
    assert "Retry-After" in upload["503"]["headers"] and "Retry-After" in upload["429"]["headers"]
    assert "429" in spec["paths"]["/v1/devices"]["post"]["responses"]
    # a 422 really has the declared shape
    r = api.c.post("/v1/devices", json={})
    assert (
        r.status_code == 422 and set(r.json()) == {"detail", "code"} and isinstance(r.json()["detail"], str)
    )


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("PUT", "/v1/models", {"GET", "POST"}),
        ("DELETE", "/v1/tasks", {"GET", "POST"}),
        ("DELETE", "/v1/devices", {"GET", "POST"}),  # GET: the operator's device roster
    ],
)
def test_405_lists_every_allowed_method(api: Api, method: str, path: str, allowed: set[str]) -> None:
    r = unchanged(api, lambda: api.c.request(method, path, headers=ADMIN_H))
    assert r.status_code == 405 and r.json()["code"] == "method_not_allowed"
    assert {m.strip() for m in r.headers["Allow"].split(",")} == allowed

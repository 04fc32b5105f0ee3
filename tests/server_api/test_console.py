"""The operator's console against a real uvicorn server on a real SQLite file: login and its cookie,
pages behind the session, CSRF on every action, escaping of user input, junk ids."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from tests.conftest import ADMIN, SECRET, LiveServer

ADMIN_HEADERS = {"Authorization": f"Bearer {ADMIN}"}
XSS = "<script>alert(1)</script>"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    srv = LiveServer(tmp_path_factory.mktemp("console")).start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def api(server: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.base_url, timeout=30) as c:
        yield c


def make_task(api: httpx.Client, name: str = "console", **overrides: Any) -> dict[str, Any]:
    body = {"name": name, "architecture": "tiny", "embedding_dim": 8, "rounds": 3, **overrides}
    r = api.post("/v1/tasks", json=body, headers=ADMIN_HEADERS)
    assert r.status_code == 201, r.text
    task: dict[str, Any] = r.json()
    return task


def register(api: httpx.Client, name: str | None = None) -> dict[str, str]:
    r = api.post("/v1/devices", json={"enrollment_secret": SECRET, "name": name})
    assert r.status_code == 201, r.text
    out: dict[str, str] = r.json()
    return out


@contextmanager
def console(server: LiveServer) -> Iterator[tuple[httpx.Client, str]]:
    """A client holding a console session, and the session's CSRF token (read from a page's form)."""
    with httpx.Client(base_url=server.base_url, timeout=30) as c:
        r = c.post("/console/login", data={"token": ADMIN, "next": "/console"})
        assert r.status_code == 303, r.text
        page = c.get("/console")
        assert page.status_code == 200
        match = re.search(r'name="csrf" value="([^"]+)"', page.text)
        assert match is not None
        yield c, match.group(1)


def task_status(api: httpx.Client, task_id: int) -> str:
    return str(api.get(f"/v1/tasks/{task_id}", headers=ADMIN_HEADERS).json()["status"])


PAGES = [
    "/console",
    "/console/tasks/1",
    "/console/tasks/1/versions",
    "/console/rounds/1",
    "/console/devices",
    "/console/tasks/1/pause",
    "/console/rounds/1/abandon",
    "/console/models/1/weights",
]


@pytest.mark.parametrize("path", PAGES)
def test_every_page_needs_a_session(server: LiveServer, api: httpx.Client, path: str) -> None:
    make_task(api)
    r = api.get(path)
    assert r.status_code == 303
    assert r.headers["location"] == "/console/login?next=" + quote(path)
    # a forged or tampered cookie is no session
    for value in ("x", "9999999999.AAAAAAAAAAAAAAAAAAAAAA." + "A" * 43):
        api.cookies.set("facefl_console", value)
        r = api.get(path)
        assert r.status_code == 303 and r.headers["location"].startswith("/console/login")


def test_login_sets_a_strict_httponly_cookie_and_the_token_stays_out_of_urls(
    server: LiveServer, api: httpx.Client
) -> None:
    form = api.get("/console/login")
    assert form.status_code == 200 and 'type="password"' in form.text and 'method="post"' in form.text
    r = api.post("/console/login", data={"token": ADMIN, "next": "/console/devices"})
    assert r.status_code == 303 and r.headers["location"] == "/console/devices"
    cookie = r.headers["set-cookie"]
    flags = {part.strip().lower() for part in cookie.split(";")}
    assert "httponly" in flags and "samesite=strict" in flags and "path=/console" in flags
    assert ADMIN not in cookie and ADMIN not in r.headers["location"]
    with httpx.Client(base_url=server.base_url, timeout=30) as browser:
        browser.cookies.set("facefl_console", r.cookies["facefl_console"])
        page = browser.get("/console/devices")
        assert page.status_code == 200 and "Devices" in page.text
        assert ADMIN not in page.text


@pytest.mark.parametrize("token", ["wrong-token", "", ADMIN + "x", ADMIN[:-1], "dev-admin-token"])
def test_a_wrong_token_gets_no_session(api: httpx.Client, token: str) -> None:
    r = api.post("/console/login", data={"token": token, "next": "/console"})
    assert r.status_code == 401
    assert "set-cookie" not in r.headers
    assert "not the admin token" in r.text


def test_login_refuses_junk_and_never_redirects_elsewhere(server: LiveServer, api: httpx.Client) -> None:
    assert (
        api.post("/console/login", content=b"token=x", headers={"content-type": "text/plain"}).status_code
        == 415
    )
    bad_utf8 = api.post(
        "/console/login",
        content=b"token=\xff\xfe",
        headers={"content-type": "application/x-www-form-urlencoded"},
    )
    assert bad_utf8.status_code in (400, 401)
    foreign = api.post("/console/login", data={"token": ADMIN}, headers={"Origin": "https://evil.example"})
    assert foreign.status_code == 403 and "set-cookie" not in foreign.headers
    for target in (
        "https://evil.example/",
        "//evil.example",
        "/console/../v1/tasks",
        "/v1/tasks",
        "javascript:x",
    ):
        r = api.post("/console/login", data={"token": ADMIN, "next": target})
        assert r.status_code == 303 and r.headers["location"] == "/console", target


def test_logout_needs_csrf_then_ends_the_session(server: LiveServer) -> None:
    with console(server) as (c, csrf):
        assert c.post("/console/logout", data={}).status_code == 403
        assert c.get("/console").status_code == 200
        r = c.post("/console/logout", data={"csrf": csrf})
        assert r.status_code == 303 and r.headers["location"] == "/console/login"
        assert c.get("/console").status_code == 303


def test_actions_refuse_a_missing_or_wrong_csrf_token_and_change_nothing(
    server: LiveServer, api: httpx.Client
) -> None:
    task = make_task(api)
    round_id = task["current_round"]["id"]
    # another session's token is wrong for this one
    with console(server) as (c, csrf), console(server) as (_, other_csrf):
        for path in (f"/console/tasks/{task['id']}/pause", f"/console/rounds/{round_id}/abandon"):
            for form in ({}, {"csrf": ""}, {"csrf": "x" * 43}, {"csrf": other_csrf}, {"csrf": csrf + "x"}):
                r = c.post(path, data=form)
                assert r.status_code == 403, (path, form)
                assert "CSRF" in r.text
            # the right token from another site (a browser names it in Origin) is refused as well
            r = c.post(path, data={"csrf": csrf}, headers={"Origin": "https://evil.example"})
            assert r.status_code == 403
            # no session at all: to the login form, nothing done
            assert api.post(path, data={"csrf": csrf}).status_code == 303
        assert task_status(api, task["id"]) == "running"
        assert api.get(f"/v1/rounds/{round_id}", headers=ADMIN_HEADERS).json()["status"] == "open"


def test_confirmed_actions_pause_resume_and_abandon(server: LiveServer, api: httpx.Client) -> None:
    task = make_task(api)
    task_id, round_id = task["id"], task["current_round"]["id"]
    with console(server) as (c, csrf):
        confirm = c.get(f"/console/tasks/{task_id}/pause")
        assert confirm.status_code == 200 and "Pause task" in confirm.text
        assert f'action="/console/tasks/{task_id}/pause"' in confirm.text and csrf in confirm.text
        assert task_status(api, task_id) == "running"  # the confirmation page alone changes nothing
        r = c.post(f"/console/tasks/{task_id}/pause", data={"csrf": csrf})
        assert r.status_code == 303 and r.headers["location"] == f"/console/tasks/{task_id}"
        assert task_status(api, task_id) == "paused"
        page = c.get(f"/console/tasks/{task_id}").text
        assert "Resume task" in page and "Pause task" not in page
        assert c.post(f"/console/tasks/{task_id}/resume", data={"csrf": csrf}).status_code == 303
        assert task_status(api, task_id) == "running"

        assert "Abandon round 1" in c.get(f"/console/tasks/{task_id}").text
        r = c.post(f"/console/rounds/{round_id}/abandon", data={"csrf": csrf})
        assert r.status_code == 303 and r.headers["location"] == f"/console/rounds/{round_id}"
        abandoned = api.get(f"/v1/rounds/{round_id}", headers=ADMIN_HEADERS).json()
        assert abandoned["status"] == "abandoned"
        assert abandoned["metrics"]["abandoned_reason"] == "abandoned by the operator"
        assert "abandoned by the operator" in c.get(f"/console/rounds/{round_id}").text
        # a second time: the round is no longer open (409), shown as a page, not a 500
        again = c.post(f"/console/rounds/{round_id}/abandon", data={"csrf": csrf})
        assert again.status_code == 409 and "not open" in again.text


def test_user_input_is_escaped_everywhere(server: LiveServer, api: httpx.Client) -> None:
    task = make_task(api, name=XSS)
    device = register(api, name=XSS)
    r = api.post(
        "/v1/checkin", json={"task_id": task["id"]}, headers={"Authorization": f"Bearer {device['token']}"}
    )
    assert r.json()["action"] == "train"
    with console(server) as (c, _):
        pages = [
            "/console",
            f"/console/tasks/{task['id']}",
            f"/console/tasks/{task['id']}/versions",
            f"/console/rounds/{task['current_round']['id']}",
            f"/console/tasks/{task['id']}/pause",
        ]
        pages += [f"/console/devices?page={n}" for n in range(1, 6)]
        escaped = "&lt;script&gt;alert(1)&lt;/script&gt;"
        seen = {path: c.get(path) for path in pages}
        for path, r in seen.items():
            assert r.status_code == 200, path
            assert "<script" not in r.text.lower(), path  # the console has no script of its own
            assert "script-src" not in r.headers["content-security-policy"]  # default-src 'none' applies
            assert "default-src 'none'" in r.headers["content-security-policy"]
        assert escaped in seen["/console"].text and escaped in seen[f"/console/tasks/{task['id']}"].text
        # the round is open: its pages reload themselves (no script: a meta refresh)
        assert '<meta http-equiv="refresh" content="5">' in seen[f"/console/tasks/{task['id']}"].text
        assert any(escaped in r.text for path, r in seen.items() if path.startswith("/console/devices"))


JUNK = [
    "0",
    "-1",
    "abc",
    "1.0",
    "1e3",
    "%00",
    "%20%201",
    "99999999999999999999",
    "2147483648",
    "\uff11",  # a fullwidth digit: str.isdigit() says yes
    "x" * 3000,
]


@pytest.mark.parametrize("junk", JUNK)
def test_junk_and_unknown_ids_are_404_pages(server: LiveServer, junk: str) -> None:
    with console(server) as (c, csrf):
        paths = [
            f"/console/tasks/{junk}",
            f"/console/tasks/{junk}/versions",
            f"/console/rounds/{junk}",
            f"/console/models/{junk}/weights",
            f"/console/tasks/{junk}/pause",
            f"/console/rounds/{junk}/abandon",
            f"/console/tasks/1?before={junk}",
            f"/console/tasks/1/versions?before={junk}",
            f"/console/devices?page={junk}",
        ]
        for path in paths:
            r = c.get(path)
            assert r.status_code == 404, (path, r.status_code)
            assert r.headers["content-type"].startswith("text/html")
        for path in (f"/console/tasks/{junk}/pause", f"/console/rounds/{junk}/abandon"):
            assert c.post(path, data={"csrf": csrf}).status_code == 404


def test_unknown_task_round_version_and_action_are_404(server: LiveServer) -> None:
    with console(server) as (c, csrf):
        for path in (
            "/console/tasks/987654",
            "/console/tasks/987654/versions",
            "/console/rounds/987654",
            "/console/models/987654/weights",
            "/console/tasks/987654/pause",
            "/console/tasks/1/explode",
            "/console/rounds/987654/abandon",
        ):
            r = c.get(path)
            assert r.status_code == 404, path
            assert "not found" in r.text or "no such" in r.text
        assert c.post("/console/tasks/987654/resume", data={"csrf": csrf}).status_code == 404
        assert c.post("/console/tasks/1/explode", data={"csrf": csrf}).status_code == 404


def test_refused_uploads_show_on_the_round_and_device(server: LiveServer, api: httpx.Client) -> None:
    task = make_task(api)
    device = register(api, name="phone")
    auth = {"Authorization": f"Bearer {device['token']}"}
    a = api.post("/v1/checkin", json={"task_id": task["id"]}, headers=auth).json()["assignment"]
    for _ in range(2):  # a wrong upload token: 403, refused before the body is read
        r = api.post(
            f"/v1/rounds/{a['round_id']}/updates",
            params={"num_samples": 1},
            content=b"x",
            headers={**auth, "X-Upload-Token": "wrong"},
        )
        assert r.status_code == 403
    with console(server) as (c, _):
        assert "403 forbidden x2" in c.get(f"/console/rounds/{a['round_id']}").text
        assert "403 forbidden x2" in c.get(f"/console/tasks/{task['id']}").text


def test_weights_download_for_the_operator(server: LiveServer, api: httpx.Client, tmp_path: Path) -> None:
    task = make_task(api)
    with console(server) as (c, _):
        r = c.get(f"/console/models/{task['current_version']}/weights")
        listing = c.get(f"/console/tasks/{task['id']}/versions").text
    assert f'href="/console/models/{task["current_version"]}/weights"' in listing
    v = task["current_version"]  # the API has no ONNX endpoint: the page gives the CLI command
    assert f"facefl export --server {server.base_url} --version {v} --out v{v}.onnx" in listing
    assert r.status_code == 200
    rest = api.get(f"/v1/models/{task['current_version']}", headers=ADMIN_HEADERS)
    assert r.content == rest.content and r.headers["etag"] == rest.headers["etag"]
    assert "attachment" in r.headers["content-disposition"]

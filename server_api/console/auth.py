"""Logging in to the console: the admin token, typed into a form, buys a signed session cookie
(HttpOnly, SameSite=Strict); every state change also needs the session's CSRF token and, when the
browser names one, this server as its Origin. The token never appears in a URL."""

from __future__ import annotations

import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Annotated
from urllib.parse import parse_qs, quote

from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from starlette.responses import RedirectResponse, Response

from server_api import security
from server_api.console import render, session
from server_api.console.session import Session
from server_api.ratelimit import RateLimiter
from server_api.services.context import ServiceContext, log

router = APIRouter(prefix="/console", include_in_schema=False)

#: wrong tokens per client address: a burst of 10, then one every 2 s (guessing the token is slow)
LOGIN_RATE_PER_S, LOGIN_BURST = 0.5, 10.0
_MAX_FIELDS = 8
_SAFE_NEXT = re.compile(r"/console(/[A-Za-z0-9_./-]*)?(\?[A-Za-z0-9_=&.-]*)?")


class LoginRequired(Exception):
    """No valid session: a page redirects to the login form, and comes back after it."""

    def __init__(self, next_path: str) -> None:
        super().__init__(next_path)
        self.next_path = next_path


class FormError(Exception):
    def __init__(self, status_code: int, message: str) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message


def context_of(request: Request) -> ServiceContext:
    ctx: ServiceContext = request.app.state.ctx
    return ctx


def admin_token(request: Request) -> str:
    return context_of(request).settings.admin_token_value


def current_session(request: Request) -> Session:
    found = session.decode(request.cookies.get(session.COOKIE_NAME), admin_token(request))
    if found is None:
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        raise LoginRequired(target if request.method == "GET" else "/console")
    return found


Operator = Annotated[Session, Depends(current_session)]


def csrf_of(request: Request, s: Session) -> str:
    return session.csrf_token(s, admin_token(request))


def safe_next(value: str | None) -> str:
    """Only a console path (no scheme, host or '//'): the login form is no open redirect."""
    if value and _SAFE_NEXT.fullmatch(value) and "//" not in value and ".." not in value:
        return value
    return "/console"


def to_login(next_path: str) -> Response:
    return render.secure(RedirectResponse(f"/console/login?next={quote(safe_next(next_path))}", 303))


async def read_form(request: Request) -> dict[str, str]:
    """A small urlencoded form (the body is already bounded by FACEFL_MAX_JSON_BYTES); each field once."""
    body = await request.body()
    if not body:
        return {}
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "application/x-www-form-urlencoded":
        raise FormError(415, "expected a form (application/x-www-form-urlencoded)")
    try:
        text = body.decode("utf-8")
        fields = parse_qs(text, keep_blank_values=True, max_num_fields=_MAX_FIELDS)
    except (UnicodeDecodeError, ValueError) as exc:
        raise FormError(400, "malformed form") from exc
    return {name: values[0] for name, values in fields.items() if len(values) == 1}


def same_origin(request: Request) -> bool:
    """A browser names the page that posted a form in Origin: it must be this server."""
    origin = request.headers.get("origin")
    if origin is None:
        return True  # not a browser (or a very old one): the CSRF token still decides
    return origin == f"{request.url.scheme}://{request.headers.get('host', '')}"


def check_post(request: Request, s: Session, form: dict[str, str]) -> None:
    """403 unless the form carries the session's CSRF token and came from this server."""
    if not same_origin(request):
        raise FormError(403, "this form was posted from another site")
    if not session.csrf_ok(s, admin_token(request), form.get("csrf")):
        raise FormError(403, "the form's CSRF token is missing or wrong: reload the page and try again")


class LoginThrottle:
    """Wrong tokens per client address: a burst of ``LOGIN_BURST`` failures, then one every
    1/``LOGIN_RATE_PER_S`` s; a blocked address is refused (429) before its token is even compared.
    Successful logins cost nothing. Per worker process, at most ``max_keys`` addresses remembered."""

    def __init__(self, max_keys: int = 10_000, clock: Callable[[], float] = time.monotonic) -> None:
        self._failures = RateLimiter(LOGIN_RATE_PER_S, LOGIN_BURST, max_keys=max_keys, clock=clock)
        self._blocked: OrderedDict[str, float] = OrderedDict()
        self._max_keys = max_keys
        self._clock = clock
        self._lock = threading.Lock()

    def wait(self, address: str) -> float:
        with self._lock:
            until = self._blocked.get(address)
            if until is None:
                return 0.0
            remaining = until - self._clock()
            if remaining <= 0:
                del self._blocked[address]
            return max(remaining, 0.0)

    def failed(self, address: str) -> None:
        wait = self._failures.check(address)
        if wait > 0:
            with self._lock:
                self._blocked[address] = self._clock() + wait
                self._blocked.move_to_end(address)
                if len(self._blocked) > self._max_keys:
                    self._blocked.popitem(last=False)


def _throttle(request: Request) -> LoginThrottle:
    throttle: LoginThrottle | None = getattr(request.app.state, "console_login_throttle", None)
    if throttle is None:
        throttle = request.app.state.console_login_throttle = LoginThrottle()
    return throttle


def _login_page(next_path: str, status_code: int = 200, message: str | None = None) -> Response:
    return render.page(
        "login.html", status_code, title="Log in", next_path=safe_next(next_path), message=message
    )


@router.get("/login")
async def login_form(request: Request, next: str | None = None) -> Response:
    if session.decode(request.cookies.get(session.COOKIE_NAME), admin_token(request)) is not None:
        return render.secure(RedirectResponse(safe_next(next), 303))
    return await run_in_threadpool(_login_page, next or "/console")


@router.post("/login")
async def login(request: Request) -> Response:
    address = request.client.host if request.client is not None else "unknown"
    throttle = _throttle(request)
    wait = throttle.wait(address)
    if wait > 0:
        refused = render.error(429, "too many login attempts from this address: wait and try again")
        refused.headers["Retry-After"] = RateLimiter.retry_after_header(wait)
        return refused
    try:
        if not same_origin(request):
            raise FormError(403, "this form was posted from another site")
        form = await read_form(request)
    except FormError as exc:
        return await run_in_threadpool(render.error, exc.status_code, exc.message)
    next_path = safe_next(form.get("next"))
    if not security.constant_time_equals(form.get("token", ""), admin_token(request)):
        throttle.failed(address)
        log.info("console login refused", extra={"client": address})
        return await run_in_threadpool(_login_page, next_path, 401, "That is not the admin token.")
    response = RedirectResponse(next_path, 303)
    response.set_cookie(
        session.COOKIE_NAME,
        session.encode(session.new_session(), admin_token(request)),
        max_age=session.LIFETIME_S,
        path=session.COOKIE_PATH,
        secure=request.url.scheme == "https",
        httponly=True,
        samesite="strict",
    )
    log.info("console login", extra={"client": address})
    return render.secure(response)


@router.post("/logout")
async def logout(request: Request, s: Operator) -> Response:
    try:
        check_post(request, s, await read_form(request))
    except FormError as exc:
        return await run_in_threadpool(render.error, exc.status_code, exc.message, csrf_of(request, s))
    response = RedirectResponse("/console/login", 303)
    response.delete_cookie(session.COOKIE_NAME, path=session.COOKIE_PATH, httponly=True, samesite="strict")
    return render.secure(response)

"""Jinja2 rendering (autoescape on for every template) and the headers every console response gets."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from jinja2 import Environment, PackageLoader, StrictUndefined
from starlette.responses import HTMLResponse, Response

from server_api.console import views

_env = Environment(
    loader=PackageLoader("server_api.console", "templates"),
    autoescape=True,  # every template, whatever its name: device names and task fields are user input
    undefined=StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)
_env.filters.update(
    duration=views.duration,
    utc=views.utc,
    size=views.size,
    reasons=views.reasons,
    policy=views.policy_summary,
)

#: no script may run, nothing may be framed, forms post to this server only; the style sheet is ours
CSP = (
    "default-src 'none'; style-src 'self'; img-src 'self' data:; form-action 'self'; "
    "frame-ancestors 'none'; base-uri 'none'"
)


def secure(response: Response) -> Response:
    response.headers["Content-Security-Policy"] = CSP
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["X-Content-Type-Options"] = "nosniff"
    # same-origin: with no-referrer, browsers send "Origin: null" on our own forms
    response.headers["Referrer-Policy"] = "same-origin"
    response.headers.setdefault("Cache-Control", "no-store")
    return response


def page(template: str, status_code: int = 200, **context: Any) -> HTMLResponse:
    """Render a template (CPU work: callers run this off the event loop)."""
    now = datetime.now(UTC)
    context.setdefault("refresh", None)
    context.setdefault("csrf", None)
    html = _env.get_template(template).render(now=now, ago=lambda t: views.ago(t, now), **context)
    response = HTMLResponse(html, status_code=status_code)
    secure(response)
    return response


def error(status_code: int, message: str, csrf: str | None = None) -> HTMLResponse:
    return page("error.html", status_code, title=f"{status_code}", message=message, csrf=csrf)

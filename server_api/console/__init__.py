"""The operator's console: HTML pages under /console, served by the aggregation server itself.

Tasks, a task's rounds and quality curves, a round's participants, model versions and devices, read
through the same services as the REST API; pause/resume a task and abandon the open round behind a
confirmation and CSRF. Server-rendered (Jinja2, autoescaped), inline SVG charts, no JavaScript.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from starlette.responses import Response

from server_api.console import actions, auth, pages
from server_api.console.refusals import RefusalTally

__all__ = ["install"]


def install(app: FastAPI) -> None:
    """Add the console's routes to ``app``, and the refusal tally its pages show."""
    app.state.refusals = RefusalTally()

    @app.exception_handler(auth.LoginRequired)
    async def _login_required(request: Request, exc: auth.LoginRequired) -> Response:
        return auth.to_login(exc.next_path)

    for module in (auth, pages, actions):  # pages first: /tasks/{id}/versions before /tasks/{id}/{action}
        app.include_router(module.router)

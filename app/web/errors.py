"""Error pages: every refusal is a friendly page (or fragment for htmx), never a traceback."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

from jinja2_fragments import render_block
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Match, Mount, Route
from starlette.staticfiles import StaticFiles

from app.database import driver_error, is_missing_schema, is_storage_full, is_unavailable
from app.htmx import wants_fragment
from app.templating import env, render

log = logging.getLogger("app")

REQUEST_ERRORS = {
    400: ("We could not read that form", "Something in the request was malformed. Please fill in the form again."),
    413: ("That was too much to send", "The form was larger than we accept. Please fill it in again."),
}


def allowed_methods(request: Request) -> list[str]:
    """Every method some route takes at this path (for the Allow header of a 405)."""
    methods: set[str] = set()
    for route in request.app.router.routes:
        if isinstance(route, Route) and route.methods:
            match, _ = route.matches({**request.scope, "method": "__none__"})
            if match is not Match.NONE:
                methods |= route.methods
        elif (isinstance(route, Mount) and isinstance(route.app, StaticFiles)
              # Inside the mount the scope's root_path is the mount's: match from the app's root.
              and route.matches({**request.scope, "root_path": request.scope.get("app_root_path", "")})[0]
              is not Match.NONE):
            methods |= {"GET", "HEAD"}  # all that StaticFiles takes
    return sorted(methods)


async def not_found(request: Request, exc: Exception) -> Response:
    status = exc.status_code if isinstance(exc, HTTPException) else 404
    if status == 405:
        allow = ", ".join(allowed_methods(request))
        return render(request, "errors/405.html", status=405, headers={"Allow": allow} if allow else None)
    path = request.url.path
    if status == 404 and len(path) > 1 and path.endswith("/"):
        # /login/ -> /login: a relative Location, never built from the Host header.
        bare = path.rstrip("/") or "/"
        probe = {**request.scope, "path": bare}
        if any(r.matches(probe)[0] is not Match.NONE for r in request.app.router.routes):
            query = request.url.query
            return RedirectResponse(bare + (f"?{query}" if query else ""), status_code=308)
    return render(request, "errors/404.html", status=status)


async def request_error(request: Request, exc: Exception) -> Response:
    status = exc.status_code if isinstance(exc, HTTPException) else 400
    title, message = REQUEST_ERRORS.get(status, REQUEST_ERRORS[400])
    return render(request, "errors/request.html", {"title": title, "message": message}, status=status)


def server_error(request: Request, exc: BaseException) -> Response:
    """503 when the database cannot be reached (it will be back: Retry-After), else 500."""
    if is_storage_full(exc):
        # The failed transaction rolled back whole; the customer is told to try again soon, the
        # operator what to do. Only the error's name: its text may quote the statement.
        driver = driver_error(exc)
        name = getattr(driver, "sqlite_errorname", None) or (driver.args[0] if driver.args else type(exc).__name__)
        log.error("the database's disk is full or failing (%s): the write failed and was rolled back; "
                  "free space on it", name)
        return plain_error("errors/503.html", 503, request)
    if is_unavailable(exc):
        # SQLite's own name says more than the class (SQLITE_IOERR_WRITE, SQLITE_BUSY, ...).
        log.error("database unavailable: %s", getattr(exc, "sqlite_errorname", None) or type(exc).__name__)
        return plain_error("errors/503.html", 503, request)
    if is_missing_schema(exc):
        log.error("the database lacks a table or column this version needs (%s): run `python -m app migrate`",
                  type(exc).__name__)
    return plain_error("errors/500.html", 500, request)


def plain_error(name: str, status: int, request: Request) -> Response:
    # The session may be unreadable here: render without touching it.
    ctx: dict[str, Any] = {"request": request, "csrf_token": "", "dev": False, "signed_in": None,
                           "now": datetime.now(UTC)}
    html = render_block(env, name, "main", ctx) if wants_fragment(request) else env.get_template(name).render(ctx)
    headers = {"Retry-After": "30"} if status == 503 else None
    return HTMLResponse(html, status_code=status, headers=headers)

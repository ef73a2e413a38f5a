"""Jinja environment and render(): a whole page, or one named block of it for htmx."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jinja2
from jinja2_fragments import render_block
from starlette.requests import Request
from starlette.responses import HTMLResponse

from app.htmx import wants_fragment
from app.security.csrf import csrf_token

TEMPLATES = Path(__file__).resolve().parent.parent / "templates"
HTMX_VERSION = "2.0.11"

env = jinja2.Environment(
    loader=jinja2.FileSystemLoader(TEMPLATES),
    autoescape=True,  # every template, whatever its name
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)
env.globals["htmx_version"] = HTMX_VERSION


def compile_all() -> int:
    """Compile every page template now (start-up) rather than on a first request."""
    names = [n for n in env.list_templates() if n.endswith(".html")]
    for name in names:
        env.get_template(name)
    return len(names)


def _hhmm(value: datetime) -> str:
    return value.astimezone(UTC).strftime("%H:%M")


def _datetime(value: datetime) -> str:
    return value.astimezone(UTC).strftime("%d %b %Y, %H:%M UTC")


def _browser(user_agent: str) -> str:
    """A short, human name for a user agent."""
    ua = user_agent or ""
    for needle, name in (("Edg/", "Edge"), ("OPR/", "Opera"), ("Firefox/", "Firefox"), ("Chrome/", "Chrome"),
                         ("Safari/", "Safari"), ("python-httpx", "script"), ("testclient", "test client")):
        if needle in ua:
            device = "Android" if "Android" in ua else "iPhone" if "iPhone" in ua else "Mac" if "Mac OS" in ua \
                else "Windows" if "Windows" in ua else "Linux" if "Linux" in ua else ""
            return f"{name} on {device}" if device else name
    return "Unknown browser"


env.filters.update(hhmm=_hhmm, datetime=_datetime, browser=_browser)


def render(
    request: Request,
    name: str,
    context: dict[str, Any] | None = None,
    *,
    status: int = 200,
    headers: dict[str, str] | None = None,
    block: str = "main",
    fragment: bool | None = None,
) -> HTMLResponse:
    """The page, or only `block` when htmx asked for a fragment."""
    ctx: dict[str, Any] = {"request": request, "csrf_token": csrf_token(request), "dev": _dev(request)}
    ctx.update(context or {})
    as_fragment = wants_fragment(request) if fragment is None else fragment
    html = render_block(env, name, block, ctx) if as_fragment else env.get_template(name).render(ctx)
    return HTMLResponse(html, status_code=status, headers=headers)


def _dev(request: Request) -> bool:
    settings = getattr(request.app.state, "settings", None)
    return bool(settings and settings.is_development)

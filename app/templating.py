"""Jinja environment and render(): a whole page, or one named block of it for htmx."""

from __future__ import annotations

import math
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
from jinja2_fragments import render_block
from markupsafe import escape
from starlette.requests import Request
from starlette.responses import HTMLResponse

from app.htmx import wants_fragment
from app.mail import describe
from app.security.csrf import csrf_token

TEMPLATES = Path(__file__).resolve().parent.parent / "templates"
HTMX_VERSION = "2.0.11"
WEBAUTHN_VERSION = "13.3.0"  # static/vendor/simplewebauthn-browser-<version>.umd.min.js

env = jinja2.Environment(
    loader=jinja2.FileSystemLoader(TEMPLATES),
    autoescape=True,  # every template, whatever its name
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)
env.globals["htmx_version"] = HTMX_VERSION
env.globals["webauthn_version"] = WEBAUTHN_VERSION


def compile_all() -> int:
    """Compile every page template now (start-up) rather than on a first request."""
    names = [n for n in env.list_templates() if n.endswith(".html")]
    for name in names:
        env.get_template(name)
    return len(names)


def ago(moment: datetime, now: datetime) -> str:
    """How long ago, in words ("just now", "5 minutes ago"): no clock time a customer must convert."""
    seconds = (now - moment).total_seconds()
    if seconds < 45:
        return "just now"
    minutes = round(seconds / 60)
    if minutes < 2:
        return "a minute ago"
    if minutes < 60:
        return f"{minutes} minutes ago"
    hours = round(minutes / 60)
    if hours < 2:
        return "an hour ago"
    if hours < 24:
        return f"{hours} hours ago"
    days = round(hours / 24)
    return "yesterday" if days < 2 else f"{days} days ago"


def remaining(moment: datetime, now: datetime) -> str:
    """How much longer, in words ("15 more minutes", "less than a minute")."""
    seconds = (moment - now).total_seconds()
    if seconds < 60:
        return "less than a minute"
    minutes = math.ceil(seconds / 60)
    if minutes < 60:
        return f"{minutes} more minute{'s' if minutes != 1 else ''}"
    hours = round(minutes / 60)
    return "about one more hour" if hours < 2 else f"about {hours} more hours"


def _browser(user_agent: str) -> str:
    name = describe.browser(user_agent)
    return "Unknown browser" if name.startswith("an ") else name


env.filters.update(browser=_browser)
env.globals.update(ago=ago, remaining=remaining)


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
    services = getattr(request.app.state, "services", None)
    ctx: dict[str, Any] = {
        "request": request, "csrf_token": csrf_token(request),
        "dev": bool(services and services.settings.is_development),
        "now": services.clock.now() if services else datetime.now().astimezone(),
        # Who is signed in, when this request already asked (the header shows it; no I/O here).
        "signed_in": getattr(request.state, "signed_in", None),
    }
    ctx.update(context or {})
    as_fragment = wants_fragment(request) if fragment is None else fragment
    if as_fragment:
        html = render_block(env, name, block, ctx)
        if block == "main":
            # htmx sets document.title from a <title> in the swapped content: the tab names the step.
            title = render_block(env, name, "title", ctx).strip()
            html = f"<title>{escape(title)}</title>\n{html}" if title else html
    else:
        html = env.get_template(name).render(ctx)
    return HTMLResponse(html, status_code=status, headers=headers)

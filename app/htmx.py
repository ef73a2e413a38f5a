"""Small helpers for answering htmx and plain browsers from the same endpoints."""

from __future__ import annotations

import json

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response


def wants_fragment(request: Request) -> bool:
    """htmx asked, and it is neither a boosted navigation nor a history restore."""
    h = request.headers
    return (
        h.get("hx-request") == "true"
        and h.get("hx-boosted") != "true"
        and h.get("hx-history-restore-request") != "true"
    )


def location(path: str) -> str:
    """An HX-Location value that swaps the page's main region."""
    return json.dumps({"path": path, "target": "#main", "swap": "innerHTML"})


def redirect(request: Request, url: str) -> Response:
    """303 for plain browsers; for htmx a 200 with HX-Location (no HX-* header on a 3xx)."""
    if wants_fragment(request):
        return Response(status_code=200, headers={"HX-Location": location(url)})
    return RedirectResponse(url, status_code=303)

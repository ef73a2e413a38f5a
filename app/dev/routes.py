"""/dev/mail in development; /_test/clock in test. Neither is mounted in any other mode."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from app.clock import ShiftedClock
from app.mail import outbox
from app.mail.messages import SUBJECTS
from app.mail.messages import render as render_mail
from app.templating import render
from app.web.request import services


def _local(request: Request) -> bool:
    """The inbox shows codes: only to a browser on this machine, even in development."""
    host = request.client.host if request.client else ""
    return host in ("127.0.0.1", "::1", "localhost", "testclient") or host.startswith("127.")


async def dev_mail(request: Request) -> Response:
    if not _local(request):
        return HTMLResponse("Not found", status_code=404)
    svc = services(request)
    items = []
    for item in await outbox.recent(svc.db, svc.sealer, limit=50):
        text = html = None
        if item["context"] is not None:
            _, text, html = render_mail(item["kind"], item["context"])
        code = (item["context"] or {}).get("code")
        items.append({**item, "subject": SUBJECTS.get(item["kind"], item["kind"]), "text": text, "html": html,
                      "code": code})
    return render(request, "dev/mail.html", {"messages": items}, fragment=False)


async def dev_mail_html(request: Request) -> Response:
    """One message's HTML part, framed by /dev/mail; its own CSP lets the mail's inline styles work."""
    if not _local(request):
        return HTMLResponse("Not found", status_code=404)
    svc = services(request)
    wanted = request.path_params["message_id"]
    for item in await outbox.recent(svc.db, svc.sealer, limit=50):
        if item["id"] == wanted and item["context"] is not None:
            _, _, html = render_mail(item["kind"], item["context"])
            return HTMLResponse(html, headers={
                "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'self'",
                "X-Frame-Options": "SAMEORIGIN",
            })
    return HTMLResponse("Not found", status_code=404)


async def test_clock(request: Request) -> Response:
    """APP_ENV=test only: move the server's clock forward (expiry and cooldown tests)."""
    clock = services(request).clock
    if not isinstance(clock, ShiftedClock):
        return JSONResponse({"error": "clock is not movable"}, status_code=409)
    if request.method == "POST":
        body = await request.json()
        clock.advance(float(body.get("advance", 0)))
    return JSONResponse({"now": clock.now().isoformat(), "offset": clock.offset.total_seconds()})


dev_routes = [
    Route("/dev/mail", dev_mail, methods=["GET"], name="dev:mail"),
    Route("/dev/mail/{message_id:int}", dev_mail_html, methods=["GET"], name="dev:mail_html"),
]
test_routes = [Route("/_test/clock", test_clock, methods=["GET", "POST"], name="test:clock")]

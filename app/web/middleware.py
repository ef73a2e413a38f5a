"""Middlewares every request passes: a body size limit, and the last-resort error page."""

from __future__ import annotations

import logging

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.audit import safe
from app.database import is_unavailable
from app.web.errors import request_error, server_error

log = logging.getLogger("app")
MAX_BODY = 64 * 1024  # every form here is a few hundred bytes


class BodyLimitMiddleware:
    """Refuse request bodies over MAX_BODY with the friendly 413 page (inside the session)."""

    def __init__(self, app: ASGIApp, max_body: int = MAX_BODY) -> None:
        self.app, self.max_body = app, max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD"):
            await self.app(scope, receive, send)
            return
        length = Headers(scope=scope).get("content-length", "")
        if length.isascii() and length.isdigit() and int(length) > self.max_body:
            response = await request_error(Request(scope), HTTPException(413))
            await response(scope, receive, send)
            return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_body:
                raise HTTPException(413)
            return message

        await self.app(scope, counted, send)


class ErrorPageMiddleware:
    """Any unhandled error becomes the friendly 500 (or 503) page, inside the security headers.
    A client that went away mid-request is one log line, not an error with a traceback."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def watch(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, watch)
        except ClientDisconnect:
            log.info("client disconnected before its request was read: %s %s", scope["method"],
                     safe(scope.get("path", "")))
        except Exception as exc:
            if not is_unavailable(exc):  # an outage is one line (server_error), not a traceback per request
                log.exception("unhandled %s on %s", type(exc).__name__, safe(scope.get("path", "")))
            if started:
                raise
            response = server_error(Request(scope), exc)
            await response(scope, receive, send)

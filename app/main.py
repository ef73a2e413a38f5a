"""The ASGI application: create_app(settings) wires settings, database, mail and routes."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import sqlite3
import time
from collections.abc import AsyncIterator
from typing import Any

import pymysql
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.sessions import SessionMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app import otp, sql, templating
from app.account.routes import routes as account_routes
from app.audit import safe
from app.auth import sessions
from app.auth.routes import routes as auth_routes
from app.clock import Clock, ShiftedClock, SystemClock
from app.database import ROOT, make_database, ping
from app.dev.routes import dev_routes, test_routes
from app.logs import configure_logging
from app.mail import messages
from app.mail.dispatcher import Dispatcher
from app.mail.outbox import Sealer
from app.mail.transport import ConsoleTransport, SmtpTransport, Transport
from app.otp.cleanup import run_cleanup_forever
from app.ratelimit import RateLimiter
from app.security import SecurityHeadersMiddleware, configure_hashing, derive_key
from app.services import Services
from app.settings import Settings, load_settings
from app.templating import render

log = logging.getLogger("app")
MAX_BODY = 64 * 1024  # every form here is a few hundred bytes
DB_DOWN = (OSError, ConnectionError, pymysql.err.OperationalError, pymysql.err.InterfaceError, sqlite3.OperationalError)


def make_transport(settings: Settings) -> Transport:
    if settings.smtp_host:
        return SmtpTransport(
            settings.smtp_host, settings.smtp_port, username=settings.smtp_username, password=settings.smtp_password,
            security=settings.smtp_security, timeout=settings.smtp_timeout, size=settings.smtp_pool_size,
        )
    return ConsoleTransport()


async def home(request: Request) -> Response:
    signed = await sessions.current(request)
    return render(request, "home.html", {"signed_in": signed is not None})


async def healthz(request: Request) -> Response:
    ok = await ping(request.state.db)
    return JSONResponse({"database": "ok" if ok else "unavailable"}, status_code=200 if ok else 503)


async def not_found(request: Request, exc: Exception) -> Response:
    status = exc.status_code if isinstance(exc, HTTPException) else 404
    if status == 405:
        return render(request, "errors/405.html", status=405)
    return render(request, "errors/404.html", status=status)


REQUEST_ERRORS = {
    400: ("We could not read that form", "Something in the request was malformed. Please fill in the form again."),
    413: ("That was too much to send", "The form was larger than we accept. Please fill it in again."),
}


async def request_error(request: Request, exc: Exception) -> Response:
    status = exc.status_code if isinstance(exc, HTTPException) else 400
    title, message = REQUEST_ERRORS.get(status, REQUEST_ERRORS[400])
    return render(request, "errors/request.html", {"title": title, "message": message}, status=status)


async def server_error(request: Request, exc: Exception) -> Response:
    if isinstance(exc, DB_DOWN):
        log.error("database unavailable: %s", type(exc).__name__)
        return _plain_error("errors/503.html", 503, request)
    return _plain_error("errors/500.html", 500, request)


def _plain_error(name: str, status: int, request: Request) -> Response:
    # The session may be unreadable here: render without touching it.
    from app.htmx import wants_fragment
    from app.templating import env

    ctx: dict[str, Any] = {"request": request, "csrf_token": "", "dev": False}
    if wants_fragment(request):
        from jinja2_fragments import render_block

        html = render_block(env, name, "main", ctx)
    else:
        html = env.get_template(name).render(ctx)
    headers = {"Retry-After": "30"} if status == 503 else None
    return HTMLResponse(html, status_code=status, headers=headers)


class BodyLimitMiddleware:
    """Refuse request bodies over MAX_BODY with the friendly 413 page (inside the session)."""

    def __init__(self, app: ASGIApp, max_body: int = MAX_BODY) -> None:
        self.app, self.max_body = app, max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD"):
            await self.app(scope, receive, send)
            return
        length = Headers(scope=scope).get("content-length", "")
        if length.isdigit() and int(length) > self.max_body:
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
    """Any unhandled error becomes the friendly 500 page, inside the security headers."""

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
        except Exception as exc:
            log.exception("unhandled %s on %s", type(exc).__name__, safe(scope.get("path", "")))
            if started:
                raise
            response = await server_error(Request(scope), exc)
            await response(scope, receive, send)


def _steal_ticks() -> int | None:
    """CPU time the hypervisor took from this virtual machine, all cores (Linux /proc/stat)."""
    try:
        with open("/proc/stat", "rb") as f:
            return int(f.readline().split()[8])
    except (OSError, IndexError, ValueError):
        return None


async def loop_monitor(interval: float = 0.005, period: float = 1.0) -> None:
    """Bench aid (LOOP_MONITOR=1): logs the longest event-loop stall of every second, so a
    stall can be placed in time (a start-up stall is not one under load), and beside it the
    longest garbage collection of that second (a stall that long was the collector's) and the
    CPU time the hypervisor took from the machine in it (steal: a stall no code caused).

    A plain timer callback re-armed every `interval`: how late each one runs is how long the
    loop was busy. No task or future per tick (an asyncio.sleep loop cost the bench 0.6 ms
    of CPU per sign-in at C=32)."""
    loop = asyncio.get_running_loop()
    # Measured on the real clock: uvloop's loop.time() is the cached start of the iteration.
    since = time.monotonic()
    due, worst = since + interval, 0.0
    gc_started, gc_worst = 0.0, 0.0
    steal, tick_ms = _steal_ticks(), 1000 / os.sysconf("SC_CLK_TCK")
    handle: asyncio.TimerHandle | None = None

    def tick() -> None:
        nonlocal handle, since, due, worst, gc_worst, steal
        now = time.monotonic()
        worst = max(worst, now - due)
        if now - since >= period:
            stolen, steal = steal, _steal_ticks()
            extra = f" steal_ms={(steal - stolen) * tick_ms:.0f}" if steal is not None and stolen is not None else ""
            log.warning("loop-monitor max_stall_ms=%.1f gc_max_ms=%.1f%s", worst * 1000, gc_worst * 1000, extra)
            worst, gc_worst, since = 0.0, 0.0, now
        due = now + interval
        handle = loop.call_later(interval, tick)

    def collected(phase: str, info: dict[str, int]) -> None:
        nonlocal gc_started, gc_worst
        if phase == "start":
            gc_started = time.monotonic()
        else:
            gc_worst = max(gc_worst, time.monotonic() - gc_started)

    handle = loop.call_later(interval, tick)
    gc.callbacks.append(collected)
    try:
        await loop.create_future()  # until cancelled
    finally:
        handle.cancel()
        gc.callbacks.remove(collected)


def create_app(settings: Settings | None = None, *, transport: Transport | None = None,
               clock: Clock | None = None) -> Starlette:
    """Build the application. Tests pass their own settings, mail transport and clock."""
    settings = settings or load_settings()
    configure_logging(settings)
    if settings.is_production and settings.rate_limit_storage.startswith("memory"):
        log.warning("RATE_LIMIT_STORAGE=memory:// counts per process: with several workers, use redis://")
    if clock is None:
        clock = ShiftedClock() if settings.is_test else SystemClock()
    # Templates are re-read when they change only in development: elsewhere that check is a
    # stat() per template per request.
    for jinja_env in (templating.env, messages.html_env, messages.text_env):
        jinja_env.auto_reload = settings.is_development
    configure_hashing(settings.hash_concurrency)
    db = make_database(settings)
    keys = otp.Keys(code=derive_key(settings.secret_key, "otp-code"), binding=derive_key(settings.secret_key, "otp-binding"))
    sealer = Sealer(derive_key(settings.secret_key, "mail-outbox"))
    mailer = Dispatcher(
        db, transport or make_transport(settings), sealer, clock, sender=settings.mail_from,
        max_tries=settings.mail_max_tries, concurrency=settings.smtp_pool_size,
        console_fallback=settings.is_development and transport is None and bool(settings.smtp_host),
        keep_sent=settings.is_development,
    )
    services = Services(
        settings=settings, db=db, clock=clock, keys=keys, policy=otp.OtpPolicy.from_settings(settings),
        sealer=sealer, mailer=mailer, limiter=RateLimiter(settings.rate_limit_storage, settings.rate_limit, settings.login_account_rate_limit),
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        # Compile the module-level statements and every template before the first request,
        # not on its event-loop time (and before anything starts that a failure would strand).
        sql.prepare_all(db)
        templating.compile_all()
        messages.compile_all()
        await db.connect()
        if settings.is_sqlite:
            with contextlib.suppress(Exception):
                await db.execute("PRAGMA journal_mode=WAL")
        mailer.start()
        # What start-up allocated lives as long as the process: keep it out of every
        # collection, so full collections stay short (event-loop stalls under load).
        gc.collect()
        gc.freeze()
        background = [asyncio.create_task(run_cleanup_forever(services))]
        if settings.loop_monitor:
            background.append(asyncio.create_task(loop_monitor()))
        try:
            yield {"db": db, "clock": clock, "mailer": mailer, "services": services}
        finally:
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            await mailer.stop()
            try:
                await asyncio.wait_for(db.disconnect(), 10)
            except TimeoutError:
                log.warning("database pool did not close within 10 s")

    routes: list[Route | Mount] = [
        Route("/", home, name="home"),
        Route("/healthz", healthz, name="healthz"),
        *auth_routes,
        *account_routes,
        Mount("/static", StaticFiles(directory=ROOT / "static"), name="static"),
    ]
    if settings.is_development:
        routes += dev_routes
    if settings.is_test:
        routes += test_routes

    middleware = [
        Middleware(SecurityHeadersMiddleware, production=settings.is_production),
        Middleware(ErrorPageMiddleware),
        Middleware(
            SessionMiddleware,
            secret_key=settings.secret_key,
            session_cookie=settings.session_cookie,
            max_age=settings.session_absolute_timeout,
            same_site="lax",
            https_only=settings.is_production,
        ),
        Middleware(BodyLimitMiddleware),
    ]
    app = Starlette(
        debug=False,
        routes=routes,
        middleware=middleware,
        lifespan=lifespan,
        exception_handlers={
            400: request_error, 404: not_found, 405: not_found, 413: request_error,
            **dict.fromkeys(DB_DOWN, server_error),
        },
    )
    app.state.settings = settings
    app.state.services = services
    return app


def __getattr__(name: str) -> Any:
    # `app.main:app` is built on first access, so importing this module has no side effects
    # (tests import create_app without a .env or SECRET_KEY in sight).
    if name == "app":
        built = create_app()
        globals()["app"] = built
        return built
    raise AttributeError(name)

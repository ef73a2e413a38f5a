"""The ASGI application: create_app(settings) wires settings, database, mail and routes.
Composition only: the pieces live in their own modules (app/web for the HTTP plumbing)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import Receive, Scope, Send

from app import otp, sql, templating
from app.account.routes import routes as account_routes
from app.account.security_routes import routes as security_routes
from app.auth import sessions
from app.auth.factor_routes import routes as factor_routes
from app.auth.routes import routes as auth_routes
from app.clock import Clock, ShiftedClock, SystemClock
from app.database import ROOT, is_unavailable, make_database, pending_migrations, ping
from app.dev.routes import dev_routes, test_routes
from app.factors import FactorKeys
from app.logs import configure_logging
from app.mail import messages
from app.mail.dispatcher import Dispatcher
from app.mail.messages import Dkim
from app.mail.transport import ConsoleTransport, SmtpTransport, Transport
from app.otp.cleanup import run_cleanup_forever
from app.ratelimit import RateLimiter
from app.security.crypto import Sealer, derive_key
from app.security.headers import SecurityHeadersMiddleware
from app.security.passwords import configure_hashing
from app.security.proxies import ProxyMiddleware, disown_server_proxy_headers
from app.services import AppState, Services
from app.settings import Settings, SettingsError, load_settings
from app.staff.auth_routes import routes as staff_auth_routes
from app.staff.console_routes import routes as console_routes
from app.staff.funnel_routes import routes as funnel_routes
from app.templating import render
from app.web.errors import not_found, request_error
from app.web.loop_monitor import loop_monitor
from app.web.middleware import BodyLimitMiddleware, ErrorPageMiddleware
from app.web.session import SessionCookieMiddleware

log = logging.getLogger("app")


def make_transport(settings: Settings) -> Transport:
    if settings.smtp_host:
        return SmtpTransport(
            settings.smtp_host, settings.smtp_port, username=settings.smtp_username, password=settings.smtp_password,
            security=settings.smtp_security, timeout=settings.smtp_timeout, size=settings.smtp_pool_size,
            max_size=settings.smtp_pool_max,
        )
    return ConsoleTransport()


def make_dkim(settings: Settings) -> Dkim | None:
    if not (settings.dkim_domain and settings.dkim_selector and settings.dkim_private_key):
        return None
    with open(settings.dkim_private_key, "rb") as key:
        return Dkim(settings.dkim_domain, settings.dkim_selector, key.read())


def make_policy(settings: Settings) -> otp.OtpPolicy:
    return otp.OtpPolicy(settings.otp_registration_ttl, settings.otp_login_ttl, settings.otp_resend_cooldown,
                         settings.otp_max_attempts, settings.otp_lockout_schedule)


class WholeFiles(StaticFiles):
    """Static files, always whole: the files are small, and a malformed Range header would
    otherwise be a plain-text 400 from outside the app's error pages."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            scope = {**scope, "headers": [(k, v) for k, v in scope["headers"] if k != b"range"]}
        await super().__call__(scope, receive, send)


async def home(request: Request) -> Response:
    await sessions.current(request)  # the header then names who is signed in
    return render(request, "home.html")


async def healthz(request: Request) -> Response:
    ok = await ping(request.state.db)
    return JSONResponse({"database": "ok" if ok else "unavailable"}, status_code=200 if ok else 503)


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
    keys = otp.Keys(code=derive_key(settings.secret_key, "otp-code"), binding=derive_key(settings.secret_key, "otp-binding"),
                    address=derive_key(settings.secret_key, "address"))
    fallbacks = settings.secret_key_fallbacks
    sealer = Sealer.for_purpose(settings.secret_key, fallbacks, "mail-outbox", aad=b"outbox")
    mailer = Dispatcher(
        db, transport or make_transport(settings), sealer, clock, sender=settings.mail_from,
        max_tries=settings.mail_max_tries, concurrency=settings.smtp_pool_max, smtp_timeout=settings.smtp_timeout,
        code_in_subject=settings.mail_code_in_subject == "end", dkim=make_dkim(settings),
        console_fallback=settings.is_development and transport is None and bool(settings.smtp_host),
        keep_sent=settings.is_development,
    )
    services = Services(
        settings=settings, db=db, clock=clock, keys=keys, policy=make_policy(settings), sealer=sealer,
        # Key rotation reopens sessions and queued mail only (SECURITY.md 34): a registration
        # step's sealed details made under an old key are gone with it.
        claims=Sealer.for_purpose(settings.secret_key, (), "registration-claim"), mailer=mailer,
        limiter=RateLimiter(settings.rate_limit_storage, settings.rate_limit, settings.login_account_rate_limit,
                            clock=clock),
        factors=FactorKeys.from_secret(settings.secret_key),  # no fallbacks: SECURITY.md 34
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[AppState]:
        if settings.is_production:
            try:
                pending = await asyncio.to_thread(pending_migrations, settings.database_url)
            except Exception as exc:
                if not is_unavailable(exc):
                    raise
                # Start anyway: requests answer 503 until it is back (a missing table is then a
                # 500 whose log says to migrate).
                log.warning("database unreachable at start-up (%s): migrations not checked", type(exc).__name__)
            else:
                if pending:
                    raise SettingsError(f"the database lacks migrations {', '.join(pending)}: "
                                        "run `python -m app migrate`")
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
            await services.limiter.close()
            try:
                await asyncio.wait_for(db.disconnect(), 10)
            except TimeoutError:
                log.warning("database pool did not close within 10 s")

    routes: list[Route | Mount] = [
        Route("/", home, name="home"),
        Route("/healthz", healthz, name="healthz"),
        *auth_routes,
        *factor_routes,
        *account_routes,
        *security_routes,
        *staff_auth_routes,
        *console_routes,
        *funnel_routes,
        Mount("/static", WholeFiles(directory=ROOT / "static"), name="static"),
    ]
    if settings.is_development:
        routes += dev_routes
    if settings.is_test:
        routes += test_routes

    middleware = [
        Middleware(ProxyMiddleware, trusted=settings.trusted_proxies, public_origin=settings.public_origin,
                   require_https=settings.is_production),
        Middleware(SecurityHeadersMiddleware, production=settings.is_production),
        Middleware(ErrorPageMiddleware),
        Middleware(
            SessionCookieMiddleware,
            secret_keys=(settings.secret_key, *fallbacks),
            cookie_name=settings.session_cookie,
            https_only=settings.is_production,
            max_age=settings.session_absolute_timeout,
        ),
        Middleware(BodyLimitMiddleware),
    ]
    app = Starlette(
        debug=False,
        routes=routes,
        middleware=middleware,
        lifespan=lifespan,
        # Anything else is ErrorPageMiddleware's: inside the security headers, 503 or 500.
        exception_handlers={400: request_error, 404: not_found, 405: not_found, 413: request_error},
    )
    # /login/ -> /login is ours (errors.not_found): Starlette's would build the Location from Host.
    app.router.redirect_slashes = False
    app.state.settings = settings
    app.state.services = services
    return app


def __getattr__(name: str) -> Any:
    # `app.main:app` is built on first access, so importing this module has no side effects
    # (tests import create_app without a .env or SECRET_KEY in sight).
    if name == "app":
        disown_server_proxy_headers()  # `uvicorn app.main:app`: the app decides whom to believe
        built = create_app()
        globals()["app"] = built
        return built
    raise AttributeError(name)

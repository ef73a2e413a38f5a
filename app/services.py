"""What every request may use, built once per process in the lifespan."""

from __future__ import annotations

from dataclasses import dataclass

from databases import Database
from starlette.requests import Request

from app.clock import Clock
from app.mail.dispatcher import Dispatcher
from app.mail.outbox import Sealer
from app.otp import Keys, OtpPolicy
from app.ratelimit import RateLimiter
from app.security import client_ip
from app.settings import Settings


@dataclass
class Services:
    settings: Settings
    db: Database
    clock: Clock
    keys: Keys
    policy: OtpPolicy
    sealer: Sealer
    mailer: Dispatcher
    limiter: RateLimiter


def services(request: Request) -> Services:
    return request.state.services  # type: ignore[no-any-return]


def ip_of(request: Request) -> str:
    """The client address, worked out once per request (the guard, the route and the audit ask)."""
    ip = request.scope.get("app.client_ip")
    if ip is None:
        ip = request.scope["app.client_ip"] = client_ip(request, services(request).settings.trusted_proxies)
    return ip  # type: ignore[no-any-return]


def ua_of(request: Request) -> str:
    return request.headers.get("user-agent", "")[:255]

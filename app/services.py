"""What every use case may use, built once per process by create_app (no HTTP here)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypedDict

from databases import Database

from app.clock import Clock
from app.factors import FactorKeys
from app.mail.dispatcher import Dispatcher
from app.otp import Keys, OtpPolicy
from app.ratelimit import RateLimiter
from app.security.crypto import Sealer
from app.settings import Settings


@dataclass
class Services:
    settings: Settings
    db: Database
    clock: Clock
    keys: Keys
    policy: OtpPolicy
    sealer: Sealer  # queued mail
    claims: Sealer  # registration details held until their code is entered
    mailer: Dispatcher
    limiter: RateLimiter
    factors: FactorKeys


@dataclass(frozen=True)
class Client:
    """Who is asking, as the audit log, the session list and a code mail record it."""

    ip: str
    user_agent: str
    origin: str = ""  # the address the customer uses (PUBLIC_ORIGIN), for links in mail


class AppState(TypedDict):
    """What the lifespan yields; Starlette copies it into every request's `request.state`."""

    db: Database
    clock: Clock
    mailer: Dispatcher
    services: Services

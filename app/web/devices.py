"""The trusted-device cookie: the random tokens of "Don't ask again on this device", signed
(itsdangerous), at most a few customers' per browser. The server keeps each token's hash as a
row the customer can revoke; the cookie alone proves nothing."""

from __future__ import annotations

from itsdangerous import BadSignature, URLSafeSerializer
from starlette.requests import Request
from starlette.responses import Response

from app.security.crypto import derive_key
from app.web.request import services

KEPT_IN_COOKIE = 5  # a shared browser: the newest few customers' devices


def _name(request: Request) -> str:
    return "__Host-device" if services(request).settings.is_production else "device"


def _serializer(request: Request) -> URLSafeSerializer:
    settings = services(request).settings
    # The current key only (SECURITY.md 34): after a rotation, devices are asked the second step again.
    return URLSafeSerializer(derive_key(settings.secret_key, "device-cookie").hex(), salt="trusted-device")


def device_tokens(request: Request) -> tuple[str, ...]:
    raw = request.cookies.get(_name(request))
    if not raw:
        return ()
    try:
        value = _serializer(request).loads(raw)
    except BadSignature:
        return ()
    if not isinstance(value, list):
        return ()
    return tuple(v for v in value if isinstance(v, str))[:KEPT_IN_COOKIE]


def remember_device(request: Request, response: Response, token: str | None) -> Response:
    """Add this device's new token (newest first) to the cookie, for TRUSTED_DEVICE_DAYS."""
    if not token:
        return response
    settings = services(request).settings
    tokens = [token, *device_tokens(request)][:KEPT_IN_COOKIE]
    response.set_cookie(_name(request), _serializer(request).dumps(tokens),
                        max_age=settings.trusted_device_days * 86400, path="/", httponly=True, samesite="lax",
                        secure=settings.is_production)
    return response

"""Whom to believe about the client: the app alone decides, from TRUSTED_PROXIES.

A request's address, scheme and host are taken from X-Forwarded-For, X-Forwarded-Proto and
X-Forwarded-Host only when the connection comes from a trusted proxy, walking the
X-Forwarded-For chain outwards while each hop is trusted. Uvicorn has proxy-header handling of
its own, on by default and trusting 127.0.0.1: `uvicorn app.main:app` would let a client behind
a local proxy choose its own address. `disown_server_proxy_headers` turns it off when uvicorn
loads this app, so the answer is the same however the app is started.
"""

from __future__ import annotations

import inspect
import ipaddress
import logging
from collections.abc import Iterable
from urllib.parse import urlsplit

from starlette.datastructures import Headers
from starlette.responses import PlainTextResponse, RedirectResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from app.security.csrf import HOSTS_KEY
from app.settings import Network

log = logging.getLogger("app.security")


def is_trusted(address: str, trusted: Iterable[Network]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in net for net in trusted)


def client_from_chain(peer: str, forwarded_for: str, trusted: tuple[Network, ...]) -> str:
    """The client: from the peer, walk X-Forwarded-For from the nearest hop outwards while the
    hop we stand on is trusted; the first address that is not ours is the client."""
    if not trusted:
        return peer
    try:
        chain = [ipaddress.ip_address(peer)]
    except ValueError:
        return peer
    hops = [h.strip() for h in forwarded_for.split(",") if h.strip()]
    for hop in reversed(hops):
        if not any(chain[-1] in net for net in trusted):
            break
        try:
            chain.append(ipaddress.ip_address(hop))
        except ValueError:
            break
    return str(chain[-1])


class ProxyMiddleware:
    """Resolves client address, scheme and acceptable hosts once per request; in production,
    sends a request that arrived over plain HTTP to the same path on PUBLIC_ORIGIN."""

    def __init__(self, app: ASGIApp, *, trusted: tuple[Network, ...], public_origin: str | None,
                 require_https: bool) -> None:
        self.app, self.trusted = app, trusted
        self.public_origin = public_origin.rstrip("/") if public_origin else None
        self.public_host = urlsplit(public_origin).netloc if public_origin else None
        self.require_https = require_https

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        hosts = {headers.get("host", "")}
        if self.public_host:
            hosts.add(self.public_host)
        peer = scope.get("client")
        if self.trusted and peer and is_trusted(peer[0], self.trusted):
            client = client_from_chain(peer[0], headers.get("x-forwarded-for", ""), self.trusted)
            if client != peer[0]:
                scope["client"] = (client, 0)
            # Each proxy overwrites X-Forwarded-Proto; a list means several: the nearest speaks last.
            proto = headers.get("x-forwarded-proto", "").split(",")[-1].strip().lower()
            if proto in ("http", "https"):
                scope["scheme"] = proto if scope["type"] == "http" else proto.replace("http", "ws")
            # Likewise the host the nearest proxy was asked for: the last of a list.
            if forwarded_host := headers.get("x-forwarded-host"):
                hosts.add(forwarded_host.split(",")[-1].strip())
        scope[HOSTS_KEY] = hosts
        if self.require_https and scope["scheme"] in ("http", "ws"):
            response = self._to_https(scope)
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _to_https(self, scope: Scope) -> PlainTextResponse | RedirectResponse:
        if not self.public_origin:
            return PlainTextResponse("This shop is served over HTTPS only.", status_code=400)
        query = scope.get("query_string", b"").decode("latin-1")
        target = self.public_origin + scope["path"] + (f"?{query}" if query else "")
        # 308 keeps the method, and never points anywhere but the configured origin.
        return RedirectResponse(target, status_code=308)


def disown_server_proxy_headers() -> bool:
    """If uvicorn is loading this app right now, switch its own proxy-header handling off.

    Uvicorn wraps the app it loaded in its ProxyHeadersMiddleware after the import, when its
    Config's `proxy_headers` is set (the default, trusting FORWARDED_ALLOW_IPS or 127.0.0.1).
    The Config doing the loading is on the call stack of this import; setting its public
    `proxy_headers` attribute before the wrapping leaves the decision to ProxyMiddleware.
    True when a loading uvicorn Config was found. Tests start `uvicorn app.main:app` with its
    defaults, with one worker and with two, and check that a forged X-Forwarded-For from
    127.0.0.1 is not believed: a uvicorn release that loads apps another way fails them."""
    frame = inspect.currentframe()
    while frame is not None:
        owner = frame.f_locals.get("self")
        kind = type(owner)
        # Config.load() imports through Config.load_app(); `uvicorn.run` with one worker calls
        # load_app() first on its own, to check the import.
        if (frame.f_code.co_name in ("load", "load_app") and kind.__name__ == "Config"
                and kind.__module__ == "uvicorn.config"):
            if getattr(owner, "proxy_headers", False):
                owner.proxy_headers = False  # type: ignore[union-attr]
                log.info("uvicorn's proxy headers are off: TRUSTED_PROXIES decides whom to believe")
            return True
        frame = frame.f_back
    return False

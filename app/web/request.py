"""What an endpoint reads off a request: the services, and who is asking."""

from __future__ import annotations

from starlette.requests import Request

from app.services import Client, Services


def services(request: Request) -> Services:
    return request.state.services  # type: ignore[no-any-return]


def client_of(request: Request) -> Client:
    """The client's address (ProxyMiddleware resolved it from TRUSTED_PROXIES), user agent, and
    the origin links in mail point to: PUBLIC_ORIGIN (required in production); in development
    and test, the address this request came to."""
    origin = services(request).settings.public_origin or f"{request.url.scheme}://{request.url.netloc}"
    return Client(request.client.host if request.client else "", request.headers.get("user-agent", "")[:255], origin)

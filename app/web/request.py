"""What an endpoint reads off a request: the services, and who is asking."""

from __future__ import annotations

from starlette.requests import Request

from app.services import Client, Services


def services(request: Request) -> Services:
    return request.state.services  # type: ignore[no-any-return]


def client_of(request: Request) -> Client:
    """The client's address (ProxyMiddleware resolved it from TRUSTED_PROXIES) and user agent."""
    return Client(request.client.host if request.client else "", request.headers.get("user-agent", "")[:255])

"""Guards every state-changing endpoint passes before it runs."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from functools import wraps

from starlette.requests import Request
from starlette.responses import Response

from app.security.csrf import csrf_ok
from app.templating import render
from app.web.request import client_of, services

Endpoint = Callable[[Request], Awaitable[Response]]


def guarded(scope: str | None) -> Callable[[Endpoint], Endpoint]:
    """CSRF and Origin check, then the per-address rate limit of `scope`, before the endpoint
    runs. `csrf_only` (scope None) is for sign-out alone."""

    def decorate(endpoint: Endpoint) -> Endpoint:
        @wraps(endpoint)
        async def wrapper(request: Request) -> Response:
            svc = services(request)
            if not await csrf_ok(request):
                return render(request, "errors/403.html", status=403)
            wait = await svc.limiter.hit(scope, client_of(request).ip) if scope else 0
            if wait:
                return render(
                    request, "errors/429.html", {"retry_after": wait}, status=429, headers={"Retry-After": str(wait)}
                )
            return await endpoint(request)

        wrapper.csrf_protected = True  # type: ignore[attr-defined]
        return wrapper

    return decorate


# Signing out is never rate limited: customers behind one address (a library, an office)
# share its per-address budget, and a 429 here would leave a session open on a shared
# computer. Without a live session it touches nothing; with a stale one it costs one
# indexed statement, no more than any signed-in page with that cookie.
csrf_only = guarded(None)


def one_connection(endpoint: Endpoint) -> Endpoint:
    """Run the endpoint's statements on one pooled connection (taken once, not per statement).
    Not for endpoints that hash a password: the pool must not wait on Argon2."""

    @wraps(endpoint)
    async def wrapper(request: Request) -> Response:
        async with services(request).db.connection():
            return await endpoint(request)

    return wrapper

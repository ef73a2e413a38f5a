"""Guards every state-changing endpoint passes before it runs."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from functools import wraps

from starlette.requests import Request
from starlette.responses import Response

from app.htmx import redirect
from app.security.csrf import CsrfVerdict, csrf_verdict
from app.templating import render
from app.web.request import client_of, services
from app.web.session import cookie_of

Endpoint = Callable[[Request], Awaitable[Response]]


def guarded(scope: str | None) -> Callable[[Endpoint], Endpoint]:
    """CSRF and Origin check, then the per-address rate limit of `scope`, before the endpoint
    runs. `csrf_only` (scope None) is for sign-out alone."""

    def decorate(endpoint: Endpoint) -> Endpoint:
        @wraps(endpoint)
        async def wrapper(request: Request) -> Response:
            svc = services(request)
            verdict = await csrf_verdict(request)
            if verdict is not CsrfVerdict.OK:
                return render(request, "errors/403.html", {"reason": verdict.value}, status=403)
            wait = await svc.limiter.hit(scope, client_of(request).ip) if scope else 0
            if wait:
                return render(
                    request, "errors/429.html", {"retry_after": wait}, status=429, headers={"Retry-After": str(wait)}
                )
            return await endpoint(request)

        wrapper.csrf_protected = True  # type: ignore[attr-defined]
        return wrapper

    return decorate


def signing_out(endpoint: Endpoint) -> Endpoint:
    """The guard of the sign-out buttons: never rate limited (customers behind one address, a
    library or an office, share its budget, and a 429 would leave a session open on a shared
    computer). From a tab whose session has already ended (signed out in another tab, timed
    out), the answer is that you are signed out, not a refusal: there is nothing left to end.
    A live session is ended only with its CSRF token, from this site."""

    @wraps(endpoint)
    async def wrapper(request: Request) -> Response:
        verdict = await csrf_verdict(request)
        if verdict is CsrfVerdict.FOREIGN:
            return render(request, "errors/403.html", {"reason": verdict.value}, status=403)
        if verdict is CsrfVerdict.ENDED:
            from app.auth import sessions  # the auth package builds on this module

            if await sessions.current(request) is None:
                cookie_of(request).clear()
                return redirect(request, "/login?signed_out=1")
            return render(request, "errors/403.html", {"reason": verdict.value}, status=403)
        return await endpoint(request)

    wrapper.csrf_protected = True  # type: ignore[attr-defined]
    return wrapper


def one_connection(endpoint: Endpoint) -> Endpoint:
    """Run the endpoint's statements on one pooled connection (taken once, not per statement).
    Not for endpoints that hash a password: the pool must not wait on Argon2."""

    @wraps(endpoint)
    async def wrapper(request: Request) -> Response:
        async with services(request).db.connection():
            return await endpoint(request)

    return wrapper

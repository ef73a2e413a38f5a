"""The moving-window limiter itself (the `limits` library under app.ratelimit), in process
memory and in Redis (SECURITY.md 13)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest

from app.ratelimit import RateLimiter
from tests.conftest import redis_url_or_skip

pytestmark = pytest.mark.anyio
@pytest.fixture(params=["memory", "redis"])
async def storage(request: pytest.FixtureRequest) -> AsyncIterator[str]:
    if request.param == "redis":
        yield redis_url_or_skip()
    else:
        yield "memory://"


def key() -> str:
    return uuid.uuid4().hex  # Redis is shared: every test counts on keys of its own


async def test_limit_allows_exactly_n_hits_then_answers_how_long_to_wait(storage: str) -> None:
    limiter = RateLimiter(storage, "3/minute")
    k = key()
    assert [await limiter.hit("login", k) for _ in range(3)] == [0, 0, 0]
    wait = await limiter.hit("login", k)
    assert 55 <= wait <= 60  # the first hit leaves the window in about a minute
    assert await limiter.hit("login", key()) == 0  # another address has its own window
    assert await limiter.hit("verify", k) == 0  # and another route


async def test_refused_hits_do_not_count_and_the_window_moves(storage: str) -> None:
    limiter = RateLimiter(storage, "2/second")
    k = key()
    assert [await limiter.hit("login", k) for _ in range(2)] == [0, 0]
    await asyncio.sleep(0.6)
    assert [await limiter.hit("login", k) for _ in range(5)] == [1] * 5  # under 1 s left, rounded up
    await asyncio.sleep(0.5)
    # The two counted hits have left the window; had the refused ones (0.5 s ago) counted,
    # the window would still be full.
    assert [await limiter.hit("login", k) for _ in range(3)] == [0, 0, 1]


async def test_account_limit_is_its_own_window(storage: str) -> None:
    limiter = RateLimiter(storage, "100/minute", "2/minute")
    k = key()
    assert [await limiter.hit_account("login-account", k) for _ in range(3)] == [False, False, True]
    assert await limiter.hit("login-account", k) == 0  # the per-address limit is separate


async def test_redis_windows_are_shared_between_limiters() -> None:
    url = redis_url_or_skip()
    first, second = RateLimiter(url, "3/minute"), RateLimiter(url, "3/minute")
    k = key()
    answers = [await (first if i % 2 else second).hit("login", k) for i in range(5)]
    assert answers[:3] == [0, 0, 0] and all(a > 0 for a in answers[3:])

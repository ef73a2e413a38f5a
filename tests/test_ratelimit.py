"""The moving-window limiter (app.ratelimit) in process memory and in Redis (SECURITY.md 13):
exact counts on the app's clock, and sign-in kept up while Redis is away."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from app.clock import FixedClock
from app.ratelimit import RateLimiter
from tests.conftest import redis_url_or_skip
from tests.faults import OwnRedis, own_redis_fixture  # noqa: F401  (the own_redis fixture)

pytestmark = pytest.mark.anyio

Make = Callable[..., RateLimiter]


@pytest.fixture(params=["memory", "redis"])
async def storage(request: pytest.FixtureRequest) -> AsyncIterator[str]:
    if request.param == "redis":
        yield redis_url_or_skip()
    else:
        yield "memory://"


@pytest.fixture
async def make() -> AsyncIterator[Make]:
    """RateLimiter(...), closed after the test."""
    made: list[RateLimiter] = []

    def new(*args: Any, **kwargs: Any) -> RateLimiter:
        made.append(RateLimiter(*args, **kwargs))
        return made[-1]

    yield new
    for limiter in made:
        await limiter.close()


def zcard(server: OwnRedis, name: str) -> int:
    """The hits a window holds in this server."""
    with server.client() as c:
        return int(c.zcard(name))


def key() -> str:
    return uuid.uuid4().hex  # Redis is shared: every test counts on keys of its own


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "app.ratelimit" and r.levelno >= logging.WARNING]


async def timed(call: Any) -> tuple[Any, float]:
    start = time.monotonic()
    result = await call
    return result, time.monotonic() - start


# --- the window --------------------------------------------------------------------------


async def test_limit_allows_exactly_n_hits_then_answers_how_long_to_wait(storage: str, make: Make) -> None:
    limiter = make(storage, "3/minute")  # the host clock (SystemClock) when none is given
    k = key()
    assert [await limiter.hit("login", k) for _ in range(3)] == [0, 0, 0]
    wait = await limiter.hit("login", k)
    assert 55 <= wait <= 60  # the first hit leaves the window in about a minute
    assert await limiter.hit("login", key()) == 0  # another address has its own window
    assert await limiter.hit("verify", k) == 0  # and another route
    assert not limiter.degraded


async def test_refused_hits_do_not_count_and_the_window_moves(storage: str, make: Make) -> None:
    clock = FixedClock()
    limiter = make(storage, "2/second", clock=clock)
    k = key()
    assert [await limiter.hit("login", k) for _ in range(2)] == [0, 0]
    clock.advance(0.6)
    assert [await limiter.hit("login", k) for _ in range(5)] == [1] * 5  # under 1 s left, rounded up
    clock.advance(0.5)
    # The two counted hits have left the window; had the refused ones (0.5 s ago) counted,
    # the window would still be full.
    assert [await limiter.hit("login", k) for _ in range(3)] == [0, 0, 1]


async def test_the_window_moves_with_the_app_clock_not_the_host_clock(storage: str, make: Make) -> None:
    """No real waiting: a FixedClock moved past the window frees the budget (and nothing else
    does: the host clock moving on changes nothing)."""
    clock = FixedClock()
    limiter = make(storage, "2/minute", "1/15minutes", clock=clock)
    k = key()
    assert [await limiter.hit("login", k) for _ in range(3)] == [0, 0, 60]
    clock.advance(20)
    assert await limiter.hit("login", k) == 40  # Retry-After counts on the app's clock too
    clock.advance(39.999)
    assert await limiter.hit("login", k) == 1  # a millisecond left
    clock.advance(0.001)
    assert [await limiter.hit("login", k) for _ in range(3)] == [0, 0, 60]  # a minute on: free again
    assert [await limiter.hit_account("login-account", k) for _ in range(2)] == [False, True]
    clock.advance(15 * 60 - 1)
    assert await limiter.hit_account("login-account", k) is True
    clock.advance(1)
    assert await limiter.hit_account("login-account", k) is False


async def test_account_limit_is_its_own_window(storage: str, make: Make) -> None:
    clock = FixedClock()
    limiter = make(storage, "100/minute", "2/minute", clock=clock)
    k = key()
    assert [await limiter.hit_account("login-account", k) for _ in range(3)] == [False, False, True]
    assert await limiter.hit("login-account", k) == 0  # the per-address limit is separate
    clock.advance(30)
    assert await limiter.hit_account("login-account", k) is True  # refused: not counted (as before)
    clock.advance(30)
    # The two counted attempts have left; had the refused ones counted, one would still be in.
    assert [await limiter.hit_account("login-account", k) for _ in range(3)] == [False, False, True]


async def test_keys_are_kept_apart_whatever_their_text(storage: str, make: Make) -> None:
    limiter = make(storage, "1/minute", "1/minute", clock=FixedClock())
    k = key()
    long = "x" * 500 + k
    keys = [("a:b", f"c{k}"), ("a", f"b:c{k}"), ("login", long), ("login", long[:-1] + "?"),
            ("login", f"é ☃ \n {k}"), ("login", f"\udc80 {k}"), ("a%3Ab", f"c{k}"), ("\udc80", k)]
    assert [await limiter.hit(scope, each) for scope, each in keys] == [0] * len(keys)
    assert [await limiter.hit(scope, each) for scope, each in keys] == [60] * len(keys)
    assert [await limiter.hit_account(scope, each) for scope, each in keys] == [False] * len(keys)


async def test_redis_windows_are_shared_between_limiters(make: Make) -> None:
    url = redis_url_or_skip()
    first, second = make(url, "3/minute"), make(url, "3/minute")
    k = key()
    answers = [await (first if i % 2 else second).hit("login", k) for i in range(5)]
    assert answers[:3] == [0, 0, 0] and all(a > 0 for a in answers[3:])


async def test_redis_key_is_namespaced_holds_the_app_times_and_expires_with_the_window(make: Make) -> None:
    import redis

    url = redis_url_or_skip()
    clock = FixedClock()
    limiter = make(url, "3/minute", clock=clock)
    k = key()
    await limiter.hit("login", k)
    clock.advance(1.5)
    await limiter.hit("login", k)
    with redis.Redis.from_url(url, decode_responses=True) as r:
        name = f"rl:addr:login:{k}"
        start = int(FixedClock().now().timestamp() * 1000)
        assert [score for _, score in r.zrange(name, 0, -1, withscores=True)] == [start, start + 1500]
        assert 59_000 < r.pttl(name) <= 60_000
        long = "x" * 10_000 + k  # an attacker's header can be long; the key name is not
        await limiter.hit("login", long)
        assert r.zcard(f"rl:addr:login:#{hashlib.sha256(long.encode()).hexdigest()}") == 1


async def test_memory_is_bounded(make: Make, caplog: pytest.LogCaptureFixture) -> None:
    clock = FixedClock()
    limiter = make("memory://", "2/minute", clock=clock, max_keys=50)
    windows = limiter._address.logs
    hammered = key()
    for i in range(500):
        await limiter.hit("login", hammered)  # refused after two, yet still the latest hit key
        assert await limiter.hit("login", f"198.18.{i // 250}.{i % 250}") == 0
        assert len(windows) <= 50
    assert await limiter.hit("login", hammered) == 60  # kept: it was hit most recently
    assert await limiter.hit("login", "198.18.0.0") == 0  # forgotten (the least recently hit)
    assert len(warnings_of(caplog)) == 1 and "memory full" in warnings_of(caplog)[0]
    clock.advance(60)
    await limiter.hit("login", key())  # a new key: those whose hits have all left go
    assert len(windows) == 1


async def test_reset_forgets_everything(make: Make, own_redis: OwnRedis) -> None:
    for url in ("memory://", own_redis.url):
        limiter = make(url, "1/minute", "1/minute", clock=FixedClock())
        k = key()
        assert [await limiter.hit("login", k), await limiter.hit_account("login-account", k)] == [0, False]
        assert [await limiter.hit("login", k), await limiter.hit_account("login-account", k)] == [60, True]
        await limiter.reset()
        assert [await limiter.hit("login", k), await limiter.hit_account("login-account", k)] == [0, False]


def test_unknown_storage_is_refused() -> None:
    with pytest.raises(ValueError, match="memory:// or redis://"):
        RateLimiter("memcached://127.0.0.1:11211", "3/minute")


# --- Redis away ----------------------------------------------------------------------------


async def test_redis_down_limits_per_process_then_returns_to_redis_by_itself(
    own_redis: OwnRedis, make: Make, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="app.ratelimit")
    clock = FixedClock()
    limiter = make(own_redis.url, "3/minute", "2/minute", clock=clock)
    k = key()
    assert await limiter.hit("login", k) == 0
    assert zcard(own_redis, f"rl:addr:login:{k}") == 1  # counted in Redis
    own_redis.stop()

    # Every hit answers, none raises, quickly, and the limit still holds (counted from zero in
    # this process: it cannot read what Redis held). The first ones fail on Redis together.
    answers, took = await timed(asyncio.gather(*(limiter.hit("login", k) for _ in range(3))))
    assert answers == [0, 0, 0] and took < 0.6
    answer, took = await timed(limiter.hit("login", k))
    assert answer == 60 and took < 0.25
    assert [await limiter.hit_account("login-account", k) for _ in range(3)] == [False, False, True]
    assert limiter.degraded
    assert len(warnings_of(caplog)) == 1
    assert "rate-limit storage unreachable" in warnings_of(caplog)[0]
    assert "limiting per process until it returns" in warnings_of(caplog)[0]

    await asyncio.sleep(1.2)  # Redis is tried again (still down): no second warning, no error
    assert await limiter.hit("login", k) == 60
    assert limiter.degraded and len(warnings_of(caplog)) == 1

    own_redis.start()  # same port, empty
    back = time.monotonic()
    while limiter.degraded:
        assert time.monotonic() - back < 2.5, "not back on Redis within a couple of seconds"
        assert await limiter.hit("probe", key()) == 0
        await asyncio.sleep(0.05)
    assert len(warnings_of(caplog)) == 1
    assert any("reachable again" in r.getMessage() for r in caplog.records if r.name == "app.ratelimit")

    # Shared through Redis again: another worker sees this one's hits.
    other, k2 = make(own_redis.url, "3/minute", clock=clock), key()
    assert [await limiter.hit("login", k2), await other.hit("login", k2), await limiter.hit("login", k2),
            await other.hit("login", k2)] == [0, 0, 0, 60]
    assert zcard(own_redis, f"rl:addr:login:{k2}") == 3


async def test_a_redis_that_does_not_answer_costs_one_short_wait_then_none(make: Make) -> None:
    """A host that accepts connections and never replies (a hung or half-dead Redis): the
    first hit gives up after half a second; the next ones do not try Redis at all until the
    next probe, about a second later."""
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # until the client goes away
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        limiter = make(f"redis://127.0.0.1:{port}", "3/minute", clock=FixedClock())
        k = key()
        answer, took = await timed(limiter.hit("login", k))
        assert answer == 0 and limiter.degraded and 0.3 < took < 1.0
        answers, took = await timed(asyncio.gather(*(limiter.hit("login", k) for _ in range(50))))
        assert sorted(answers) == [0, 0] + [60] * 48 and took < 0.25
        await asyncio.sleep(1.1)
        # One request probes (and waits); the others meanwhile do not.
        probe = asyncio.create_task(limiter.hit("login", key()))
        await asyncio.sleep(0.05)
        assert await limiter.hit("login", key()) == 0 and not probe.done()  # did not wait for it
        answer, took = await timed(probe)
        assert answer == 0 and limiter.degraded and 0.3 < took < 1.0
        await limiter.close()
    finally:
        server.close()
        await server.wait_closed()


async def test_pooled_connections_to_a_restarted_redis_are_replaced_not_failed(
    own_redis: OwnRedis, make: Make, caplog: pytest.LogCaptureFixture,
) -> None:
    """Redis restarted between two hits: the pool still holds connections to the dead
    server. The next hits go to the new server, without an error and without the fallback."""
    limiter = make(own_redis.url, "10/minute", clock=FixedClock())
    keys = [key() for _ in range(5)]
    assert await asyncio.gather(*(limiter.hit("login", k) for k in keys)) == [0] * 5  # several pooled
    own_redis.stop()
    own_redis.start()
    assert await asyncio.gather(*(limiter.hit("login", k) for k in keys)) == [0] * 5
    assert not limiter.degraded and warnings_of(caplog) == []
    assert [zcard(own_redis, f"rl:addr:login:{k}") for k in keys] == [1] * 5  # counted in the new Redis
    assert await limiter.hit("login", keys[0]) == 0  # and the next one too
    assert not limiter.degraded

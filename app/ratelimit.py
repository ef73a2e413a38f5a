"""Moving-window (sliding-log) rate limits on the app's clock: in process memory, or in Redis to
share them between workers (SECURITY.md 13).

Every hit is timestamped with `clock.now()`, never the host clock, so a test clock that moves
moves the windows too. A window of "N/period" allows exactly N hits in any period; refused hits
are not counted, so a client that keeps knocking is let in again one period after its first
counted hit.

With Redis, a hit is one round trip: a Lua script trims the key's sorted set (hit times as
scores) to the window, counts it, adds the hit only when allowed and sets the key to expire
with the window. When Redis cannot be reached, hits are counted in this process instead (same
limits), one WARNING says so, Redis is tried again about once a second, and limits go back to
Redis by themselves when it answers. Dead pooled connections are retried once on a fresh one.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
import os
import time
from bisect import bisect_right, insort
from collections import OrderedDict
from typing import Any
from urllib.parse import quote

from limits import parse
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from app.clock import Clock, SystemClock

log = logging.getLogger(__name__)

MAX_KEYS = 100_000  # per limit, in process memory: the least recently hit key goes first
PROBE_INTERVAL = 1.0  # seconds between tries of an unreachable Redis
CONNECT_TIMEOUT = 0.25  # seconds
HIT_TIMEOUT = 0.5  # seconds for a whole hit on Redis, connecting and the one retry included
HEALTH_CHECK_INTERVAL = 5  # seconds idle after which a pooled connection is PINGed before use
LONG_KEY = 200  # longer keys are hashed in Redis key names

# KEYS[1]: the window's sorted set. ARGV: now (ms), now - window (ms), window (ms), limit, a
# unique member. Returns 0 when the hit is allowed (and counted), else the milliseconds to wait.
# Times go to Redis as the strings Python wrote (Lua would print numbers with 14 digits).
_HIT = """
local key = KEYS[1]
local now, window, limit = tonumber(ARGV[1]), tonumber(ARGV[3]), tonumber(ARGV[4])
redis.call('ZREMRANGEBYSCORE', key, '-inf', ARGV[2])
if redis.call('ZCARD', key) < limit then
  redis.call('ZADD', key, ARGV[1], ARGV[5])
  redis.call('PEXPIRE', key, ARGV[3])
  return 0
end
local oldest = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
if oldest[2] == nil then
  return window
end
local wait = tonumber(oldest[2]) + window - now
if wait < 1 then
  wait = 1
elseif wait > window then
  wait = window
end
return wait
"""


class _Window:
    """One limit over many keys in this process: per key, the sorted hit times (ms) still in
    the window, at most `amount` of them. Keys whose hits have all left the window are dropped
    as new keys arrive; past `max_keys`, the least recently hit key is forgotten."""

    __slots__ = ("amount", "ms", "max_keys", "logs", "evicted")

    def __init__(self, amount: int, ms: int, max_keys: int) -> None:
        self.amount, self.ms, self.max_keys = amount, ms, max_keys
        self.logs: OrderedDict[tuple[str, str], list[int]] = OrderedDict()
        self.evicted = 0

    def hit(self, key: tuple[str, str], now: int) -> int:
        """0 when allowed (and counted), else the milliseconds to wait."""
        logs, start = self.logs, now - self.ms
        times = logs.get(key)
        if times is None:
            self._make_room(start)
            times = logs[key] = []
        else:
            logs.move_to_end(key)
            if times and times[0] <= start:
                del times[: bisect_right(times, start)]
        if len(times) < self.amount:
            if times and now < times[-1]:
                insort(times, now)  # the clock went back
            else:
                times.append(now)
            return 0
        if not times:
            return self.ms
        return min(self.ms, max(1, times[0] + self.ms - now))

    def _make_room(self, start: int) -> None:
        logs = self.logs
        while logs:  # least recently hit first: drop them while all their hits are stale
            oldest = next(iter(logs))
            times = logs[oldest]
            if times and times[-1] > start:
                break
            del logs[oldest]
        if len(logs) >= self.max_keys:
            logs.popitem(last=False)
            self.evicted += 1
            if self.evicted == 1:
                log.warning("rate-limit memory full (%d keys): forgetting the least recently hit", self.max_keys)

    def clear(self) -> None:
        self.logs.clear()


def _window(spec: str, max_keys: int) -> _Window:
    item = parse(spec)
    return _Window(int(item.amount), int(item.get_expiry()) * 1000, max_keys)


class RateLimiter:
    def __init__(self, storage_url: str, limit: str, account_limit: str = "10/15minutes", *,
                 clock: Clock | None = None, max_keys: int = MAX_KEYS) -> None:
        self.clock: Clock = clock or SystemClock()
        self._address = _window(limit, max_keys)
        self._account = _window(account_limit, max_keys)
        url = storage_url.removeprefix("async+")
        self._redis: Redis | None = None
        self._script: Any = None
        if url.startswith("redis://") or url.startswith("rediss://") or url.startswith("unix://"):
            self._redis = Redis.from_url(
                url,
                socket_connect_timeout=CONNECT_TIMEOUT,
                # No socket_timeout: redis-py puts every send under asyncio.wait_for (a task
                # per command on Python 3.11, a fifth of the client's CPU per hit). The hit
                # is bounded as a whole instead (HIT_TIMEOUT), and redis-py drops a
                # connection whose command was cancelled.
                health_check_interval=HEALTH_CHECK_INTERVAL,
                # A pooled connection that Redis closed fails once, then the command is sent
                # again on a new connection; a timeout is not tried again (the fallback is).
                retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
            )
            self._script = self._redis.register_script(_HIT)
        elif not url.startswith("memory://"):
            raise ValueError(f"rate-limit storage must be memory:// or redis://, not {storage_url!r}")
        self._prefixes: dict[tuple[str, str], bytes] = {}
        self._tag = os.urandom(6).hex() + ":"
        self._seq = itertools.count()
        self._down = False  # Redis unreachable: counting in self._address/_account meanwhile
        self._probing = False
        self._probe_at = 0.0  # time.monotonic() of the next try of Redis while down

    @property
    def degraded(self) -> bool:
        """True while Redis is unreachable and this process counts on its own."""
        return self._down

    async def hit(self, scope: str, key: str) -> int:
        """Per client address: 0 when allowed (and counted); otherwise the seconds to wait."""
        wait = await self._hit(self._address, "addr", scope, key)
        return -(-wait // 1000)

    async def hit_account(self, scope: str, key: str) -> bool:
        """True when this account's limit is used up. The attempt is counted whether or not
        the password turns out right; like refused address hits, refused ones are not."""
        return await self._hit(self._account, "acct", scope, key) > 0

    async def _hit(self, window: _Window, kind: str, scope: str, key: str) -> int:
        now = int(self.clock.now().timestamp() * 1000)
        if self._redis is None:
            return window.hit((scope, key), now)
        if self._down:
            if self._probing or time.monotonic() < self._probe_at:
                return window.hit((scope, key), now)
            self._probing = True  # one request tries Redis; the others count here meanwhile
            try:
                wait = await self._on_redis(window, kind, scope, key, now)
            except (RedisError, OSError):
                self._probe_at = time.monotonic() + PROBE_INTERVAL
                return window.hit((scope, key), now)
            finally:
                self._probing = False
            self._back()
            return wait
        try:
            return await self._on_redis(window, kind, scope, key, now)
        except (RedisError, OSError) as exc:  # asyncio's TimeoutError is an OSError
            self._lost(exc)
            return window.hit((scope, key), now)

    async def _on_redis(self, window: _Window, kind: str, scope: str, key: str, now: int) -> int:
        async with asyncio.timeout(HIT_TIMEOUT):
            return int(await self._script(keys=[self._key(kind, scope, key)], args=[
                now, now - window.ms, window.ms, window.amount, f"{self._tag}{next(self._seq)}"]))

    def _key(self, kind: str, scope: str, key: str) -> bytes:
        """rl:addr:<scope>:<key> (rl:acct:... for accounts): the scope %-quoted, so no colon in
        it can make two names alike; a key longer than LONG_KEY bytes as # and its SHA-256."""
        prefix = self._prefixes.get((kind, scope))
        if prefix is None:
            prefix = self._prefixes[(kind, scope)] = f"rl:{kind}:{quote(scope, safe='', errors='surrogatepass')}:".encode()
        raw = key.encode("utf-8", "surrogatepass")
        if len(raw) > LONG_KEY:
            raw = b"#" + hashlib.sha256(raw).hexdigest().encode()
        return prefix + raw

    def _lost(self, exc: BaseException) -> None:
        if self._down:
            return
        self._down = True
        self._probe_at = time.monotonic() + PROBE_INTERVAL
        log.warning("rate-limit storage unreachable (%s%s): limiting per process until it returns",
                    type(exc).__name__, f": {exc}" if str(exc) else "")

    def _back(self) -> None:
        self._down = False
        # What was counted here meanwhile stays here no more: Redis counts again from now.
        self._address.clear()
        self._account.clear()
        log.info("rate-limit storage reachable again: limits are shared through Redis again")

    async def reset(self) -> None:
        """Forget every window (tests)."""
        self._address.clear()
        self._account.clear()
        if self._redis is not None:
            keys = [k async for k in self._redis.scan_iter(match="rl:*", count=1000)]
            for i in range(0, len(keys), 1000):
                await self._redis.unlink(*keys[i:i + 1000])

    async def close(self) -> None:
        """Close the Redis connections (lifespan shutdown)."""
        if self._redis is not None:
            await self._redis.aclose()

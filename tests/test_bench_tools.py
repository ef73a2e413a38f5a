"""The benchmark's own parts that decide what it reports: its HTTP client, the stall report,
the per-run usernames, the Argon2 share measured on the hashing threads."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import pytest

from bench import common, report
from bench.http11 import Connection, HttpError, NoResponse

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class _Server:
    """A real HTTP/1.1 server on a free loopback port for the client tests. Requests are read
    by hand (Content-Length bodies only), not by h11, so the client's framing is checked
    against something else; each answer is raw bytes written by the test's `answer`, which
    returns whether to read another request on that connection (False: the server closes)."""

    def __init__(self, answer: Callable[[_Seen, asyncio.StreamWriter], Awaitable[bool]]) -> None:
        self.answer = answer
        self.seen: list[_Seen] = []
        self.connections = 0
        self._closed: dict[int, asyncio.Event] = {}
        self._handlers: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> _Server:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()
        for task in self._handlers:  # those still holding a connection open on purpose
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        await self.server.wait_closed()

    def lines(self) -> list[bytes]:
        return [s.line for s in self.seen]

    async def closed(self, connection: int) -> None:
        """Wait until the server has closed that connection, then let the client's loop see it."""
        await asyncio.wait_for(self._closed.setdefault(connection, asyncio.Event()).wait(), 2)
        await asyncio.sleep(0.05)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        number, index = self.connections, 0
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    return
                line, *fields = head[:-4].split(b"\r\n")
                headers = {k.strip().lower(): v.strip() for k, _, v in (f.partition(b":") for f in fields)}
                body = await reader.readexactly(int(headers.get(b"content-length", b"0")))
                seen = _Seen(number, index, line, headers, body)
                self.seen.append(seen)
                index += 1
                if not await self.answer(seen, writer):
                    return
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            self._closed.setdefault(number, asyncio.Event()).set()
            self._handlers.discard(task)


@dataclass
class _Seen:
    connection: int  # 1, 2, ...: which TCP connection the server read it on
    index: int  # 0, 1, ...: which request on that connection
    line: bytes  # the request line
    headers: dict[bytes, bytes]  # names lower-cased
    body: bytes


async def _write_slowly(writer: asyncio.StreamWriter, *pieces: bytes) -> None:
    """Each piece in its own write, a moment apart: the client gets the answer in parts."""
    for piece in pieces:
        writer.write(piece)
        await writer.drain()
        await asyncio.sleep(0.01)


async def test_bench_http_client_reads_content_length_bodies_on_one_kept_alive_connection() -> None:
    big = bytes(range(256)) * 400  # 100 KiB: many reads

    async def answer(req: _Seen, writer: asyncio.StreamWriter) -> bool:
        if req.line.startswith(b"POST"):
            writer.write(b"HTTP/1.1 303 See Other\r\nLocation: /next\r\nSet-Cookie: a=1\r\nSet-Cookie: b=2\r\n"
                         b"Content-Length: " + str(len(req.body)).encode() + b"\r\n\r\n" + req.body)
        else:
            head = b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: 102400\r\n\r\n"
            await _write_slowly(writer, head[:20], head[20:] + big[:1000], big[1000:50000], big[50000:])
        return True

    async with _Server(answer) as srv:
        conn = Connection("127.0.0.1", srv.port, timeout=2)
        try:
            r = await conn.post("/login", {"a": "1 2", "b": "&"}, {"Origin": "http://x"})
            assert r.status_code == 303 and r.header("location") == "/next"
            assert r.get_list("set-cookie") == ["a=1", "b=2"] and r.text == "a=1+2&b=%26"
            r = await conn.get("/login", {"X-Forwarded-For": "198.18.0.1"})
            assert r.status_code == 200 and r.body == big and r.header("content-type") == "text/html"
            r = await conn.post("/verify", {"code": "123456"}, {})
            assert r.status_code == 303 and r.text == "code=123456"
        finally:
            await conn.close()
    assert srv.lines() == [b"POST /login HTTP/1.1", b"GET /login HTTP/1.1", b"POST /verify HTTP/1.1"]
    assert srv.seen[0].headers[b"content-type"] == b"application/x-www-form-urlencoded"
    assert srv.seen[0].headers[b"host"] == f"127.0.0.1:{srv.port}".encode()
    assert srv.seen[1].headers[b"x-forwarded-for"] == b"198.18.0.1" and srv.seen[1].body == b""
    assert srv.connections == 1 and conn.opened == 1  # kept alive


async def test_bench_http_client_reads_chunked_bodies_split_anywhere() -> None:
    async def answer(req: _Seen, writer: asyncio.StreamWriter) -> bool:
        await _write_slowly(writer, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r",
                            b"\nhel", b"lo\r\n6;ext=1\r\n wor", b"ld\r\n0\r\nX-Trailer: t\r\n", b"\r\n")
        return True

    async with _Server(answer) as srv:
        conn = Connection("127.0.0.1", srv.port, timeout=2)
        try:
            for path in ("/a", "/b"):
                r = await conn.get(path, {})
                assert r.status_code == 200 and r.text == "hello world"
        finally:
            await conn.close()
    assert srv.lines() == [b"GET /a HTTP/1.1", b"GET /b HTTP/1.1"] and srv.connections == 1


async def test_bench_http_client_reads_bodiless_answers_without_waiting_for_a_close() -> None:
    """204, 304 and the answer to HEAD have no body whatever their headers say; reading one
    until the server closes would wait out the timeout on a kept-alive connection."""

    async def answer(req: _Seen, writer: asyncio.StreamWriter) -> bool:
        if req.line.startswith(b"HEAD"):
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
        elif req.line.startswith(b"GET /gone"):
            writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
        elif req.line.startswith(b"GET /same"):
            writer.write(b"HTTP/1.1 304 Not Modified\r\nETag: \"x\"\r\n\r\n")
        else:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        return True

    async with _Server(answer) as srv:
        conn = Connection("127.0.0.1", srv.port, timeout=2)
        try:
            assert (await conn.request("HEAD", "/", {})).body == b""
            r = await conn.get("/gone", {})
            assert r.status_code == 204 and r.body == b""
            r = await conn.get("/same", {})
            assert r.status_code == 304 and r.body == b"" and r.header("etag") == '"x"'
            assert (await conn.get("/", {})).text == "ok"
        finally:
            await conn.close()
    assert srv.connections == 1 and len(srv.seen) == 4


async def test_bench_http_client_reads_a_close_delimited_body_then_opens_a_new_connection() -> None:
    """Neither Content-Length nor chunked: the body ends where the server closes; and an
    answer with `Connection: close` is not reused even while the server leaves it open."""

    async def answer(req: _Seen, writer: asyncio.StreamWriter) -> bool:
        if req.line.startswith(b"GET /old"):
            await _write_slowly(writer, b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n", b"part one, ",
                                b"part two, ", b"the end")
            return False
        if req.line.startswith(b"GET /bye"):
            writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 3\r\n\r\nbye")
            await asyncio.sleep(3)  # ...and does not close: only the client's reading of the header ends it
            return False
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        return True

    async with _Server(answer) as srv:
        conn = Connection("127.0.0.1", srv.port, timeout=2)
        try:
            r = await conn.get("/old", {})
            assert r.status_code == 200 and r.text == "part one, part two, the end"
            assert (await conn.get("/next", {})).text == "ok"
            assert (await conn.get("/bye", {})).text == "bye"
            assert (await conn.get("/after", {})).text == "ok"
        finally:
            await conn.close()
    assert [(s.connection, s.line) for s in srv.seen] == [
        (1, b"GET /old HTTP/1.1"), (2, b"GET /next HTTP/1.1"), (2, b"GET /bye HTTP/1.1"), (3, b"GET /after HTTP/1.1")]
    assert conn.opened == 3


@pytest.mark.parametrize("how", ["close", "408 and close", "408 and stay open"])
async def test_bench_http_client_reopens_a_connection_the_server_ended_while_idle(how: str) -> None:
    """Found before a byte is written, so any method goes on a new connection, sent once; an
    unasked-for answer on the idle connection is never taken for the next request's."""

    async def answer(req: _Seen, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        if how != "close":
            await asyncio.sleep(0.02)
            writer.write(b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\n\r\n")
            await writer.drain()
        if how == "408 and stay open":
            await asyncio.sleep(1)  # the client must not write here: nobody would answer
        return False

    async with _Server(answer) as srv:
        conn = Connection("127.0.0.1", srv.port, timeout=2)
        try:
            assert (await conn.get("/login", {})).text == "ok"
            await (srv.closed(1) if how != "408 and stay open" else asyncio.sleep(0.1))
            r = await conn.post("/login", {"a": "1"}, {})
            assert r.status_code == 200 and r.text == "ok"
            await (srv.closed(2) if how != "408 and stay open" else asyncio.sleep(0.1))
            assert (await conn.get("/verify", {})).text == "ok"
        finally:
            await conn.close()
    assert [(s.connection, s.line) for s in srv.seen] == [
        (1, b"GET /login HTTP/1.1"), (2, b"POST /login HTTP/1.1"), (3, b"GET /verify HTTP/1.1")]


@pytest.mark.parametrize("drop", ["close", "reset"])
async def test_bench_http_client_never_sends_a_post_twice_when_its_connection_dies_unanswered(drop: str) -> None:
    """The POST was written on a kept-alive connection, the server read it (and may have acted
    on it), then the connection ended before any answer: it is not sent again, the call
    raises; a later connection would have answered, so a blind retry would pass unnoticed."""

    async def answer(req: _Seen, writer: asyncio.StreamWriter) -> bool:
        if req.line.startswith(b"POST") and req.connection == 1:
            if drop == "reset":
                sock = writer.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            return False
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        return True

    async with _Server(answer) as srv:
        conn = Connection("127.0.0.1", srv.port, timeout=2)
        try:
            assert (await conn.get("/login", {})).text == "ok"
            with pytest.raises(NoResponse, match="POST /login"):
                await conn.post("/login", {"login": "x", "password": "y"}, {})
            assert (await conn.get("/login", {})).text == "ok"  # the next request: a new connection
        finally:
            await conn.close()
    assert [(s.connection, s.line) for s in srv.seen] == [
        (1, b"GET /login HTTP/1.1"), (1, b"POST /login HTTP/1.1"), (2, b"GET /login HTTP/1.1")]


async def test_bench_http_client_sends_a_get_again_only_when_no_answer_began_on_a_kept_alive_connection() -> None:
    async def answer(req: _Seen, writer: asyncio.StreamWriter) -> bool:
        if req.line == b"GET /dropped HTTP/1.1" and req.index == 1:
            return False  # read, then closed unanswered: a GET may go again, once, on a new connection
        if req.line == b"GET /first HTTP/1.1":
            return False  # the very first request, on a new connection: not sent again
        if req.line == b"GET /half HTTP/1.1":
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf")
            return False  # an answer began, then broke off: an error, not sent again
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        return True

    async with _Server(answer) as srv:
        conn = Connection("127.0.0.1", srv.port, timeout=2)
        try:
            with pytest.raises(NoResponse, match="GET /first"):
                await conn.get("/first", {})
            assert (await conn.get("/", {})).text == "ok"
            assert (await conn.get("/dropped", {})).text == "ok"
            with pytest.raises(HttpError, match="GET /half") as info:
                await conn.get("/half", {})
            assert not isinstance(info.value, NoResponse)
        finally:
            await conn.close()
    assert [(s.connection, s.line) for s in srv.seen] == [
        (1, b"GET /first HTTP/1.1"), (2, b"GET / HTTP/1.1"), (2, b"GET /dropped HTTP/1.1"),
        (3, b"GET /dropped HTTP/1.1"), (3, b"GET /half HTTP/1.1")]


def _stamp(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%S")


def test_stall_report_counts_only_seconds_inside_windows_and_flags_all_workers_at_once() -> None:
    start = 1_800_000_000.0
    run = {"label": "C8", "wall_start_utc": start, "wall_end_utc": start + 20}
    stalls = [
        (_stamp(start - 1), 90.0), (_stamp(start - 1), 80.0),  # warm-up: not this run's
        (_stamp(start + 5), 30.0), (_stamp(start + 5), 25.0),  # both workers: the machine
        (_stamp(start + 9), 40.0), (_stamp(start + 9), 3.0),  # one worker's own stall
        (_stamp(start + 12), 4.0), (_stamp(start + 12), 5.0),
    ]
    assert report.stall_for(run, stalls) == 40.0
    text = report._stalls_over({"meta": {"workers": 2}, "stalls": stalls}, [run])
    assert text == "; 2 of 3 seconds inside the windows went over, 1 of them in every worker at once"
    steal = [(_stamp(start + 5), 0.0), (_stamp(start + 5), 0.0), (_stamp(start + 9), 30.0), (_stamp(start + 9), 30.0)]
    text = report._stalls_over({"meta": {"workers": 2}, "stalls": stalls, "steal": steal}, [run])
    assert text.endswith(", 1 of them in a second when the hypervisor took CPU from the machine (30 ms of steal)")
    assert report._stalls_over({"meta": {"workers": 2}, "stalls": stalls[6:]}, [run]) == ""


def test_outside_argon2_counts_argon2_as_the_hashing_threads_used_it_and_keeps_the_idle_estimate() -> None:
    results = {
        "hash_bound": {"cpu_bound_per_s": 100.0, "cpu_ms_per_verify": 20.0, "verifies_per_s": 100.0},
        "runs": [{"label": "C32", "flows_per_s": 40.0, "app_cpu_ms_per_flow": 33.0,
                  "hash_threads_cpu_ms_per_flow": 22.5, "wall_start_utc": None}],
    }
    report.enrich(results)
    r = results["runs"][0]
    assert r["outside_argon2_ms_per_flow"] == pytest.approx(10.5)  # what the threads used
    assert r["hash_share"] == pytest.approx(22.5 / 33.0)
    assert r["argon2_source"] == "hashing threads"
    assert r["outside_argon2_idle_estimate_ms_per_flow"] == pytest.approx(13.0)  # the idle machine's 20 ms per hash
    assert r["argon2_load_factor"] == pytest.approx(1.125)
    # Results from before the threads were read: the estimate, said so.
    old = {"hash_bound": results["hash_bound"],
           "runs": [{"label": "C32", "flows_per_s": 40.0, "app_cpu_ms_per_flow": 33.0, "wall_start_utc": None}]}
    report.enrich(old)
    assert old["runs"][0]["outside_argon2_ms_per_flow"] == pytest.approx(13.0)
    assert old["runs"][0]["argon2_source"] == "idle-cost estimate"


def test_bench_usernames_carry_the_runs_tag_and_only_hex_reaches_the_bulk_load_sql(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(common, "TAG", "")
    monkeypatch.delenv("BENCH_TAG", raising=False)
    assert common.username(42) == "b0000042"
    common.set_tag("a1b2c3")
    assert common.username(42) == "ba1b2c30000042" and common.email(42) == "ba1b2c30000042@bench.example"
    import os

    assert os.environ["BENCH_TAG"] == "a1b2c3"  # the load generator, a child process, sees it
    with pytest.raises(ValueError):
        common.set_tag("x'); DROP TABLE customers; --")

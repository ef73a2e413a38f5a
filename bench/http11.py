"""A lean HTTP/1.1 client for the load generator: one keep-alive connection per simulated
browser, framed by h11 (requests built as h11 events; Content-Length, chunked and
close-delimited responses, and the bodiless ones — HEAD, 1xx, 204, 304 — read as h11 says).

httpx spent about 12 ms of the load generator's CPU per sign-in (a client and a transport
per flow, anyio, header models); on a 2-core machine shared with the app that was 0.48 cores
taken from what is measured, and the generator's own busy event loop was added to every
latency it recorded. So this client is an asyncio Protocol that hands the bytes it receives
straight to an h11.Connection, and nothing more. Loopback and plain http only; no redirects
are followed, no cookies kept (the load generator keeps its one session cookie itself).

Connection reuse: after a response, the connection is kept when h11 has both sides DONE
(start_next_cycle) and the stream is still open; when h11 says it must close (`Connection:
close` or HTTP/1.0: their_state MUST_CLOSE or CLOSED) or the body was delimited by the
server closing, it is closed, and the next request opens a new one.

Retries, the rule: a request is sent again, once, on a new connection only when that is safe.
- Never sent: before a single byte of the request is written on a kept-alive connection, the
  client checks it: if the server closed it while it was idle (h11 has seen the end of the
  stream), reset it, or sent anything unasked for, the connection is dropped and the request
  goes out on a new one. The server cannot have seen it, so this holds for every method.
- Sent, no answer: if the connection ends after the request was written and before any byte
  of the response arrived, only a GET or HEAD on a kept-alive connection is sent again (the
  race of a server closing an idle connection as the request leaves; what browsers retry).
  Anything else, a POST in particular, raises NoResponse: the server may have acted on it,
  and sending it twice would do twice what the benchmark counts once. The load generator
  counts that as a failed flow.
- A response that started and broke off, a malformed one, or a timeout is never retried.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from typing import cast
from urllib.parse import urlencode

import h11

_IDEMPOTENT = frozenset({"GET", "HEAD"})  # the only ones sent again after bytes went out
_FORM = "application/x-www-form-urlencoded"


class HttpError(Exception):
    """The response could not be read: malformed, or the connection ended inside it."""


class NoResponse(HttpError):
    """The connection ended after the request was written and before any byte of a response;
    the request was not sent again (see the module docstring)."""


@dataclass(slots=True)
class Response:
    status_code: int
    headers: list[tuple[str, str]]  # names lower-cased, in the order received
    body: bytes

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k == name:
                return v
        return None

    def get_list(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k == name]

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")


class _Unanswered(Exception):
    """Internal: the connection ended after the request was written, before any response byte."""


class _Wire(asyncio.Protocol):
    """One TCP connection: every byte received goes to its h11.Connection as it arrives, so
    h11 knows at any time whether the server has closed or said something."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.h11 = h11.Connection(h11.CLIENT)
        self.transport: asyncio.Transport | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.ended = False  # end of stream or connection lost: h11 has been told
        self.error: Exception | None = None  # the connection was lost with an error (a reset)
        self.received = False  # any byte since the current request was written
        self.lost = loop.create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses

    def data_received(self, data: bytes) -> None:
        self.received = True
        self.h11.receive_data(data)
        self._wake()

    def eof_received(self) -> bool | None:
        self._end(None)
        return None  # let the transport close itself

    def connection_lost(self, exc: Exception | None) -> None:
        self._end(exc)
        if not self.lost.done():
            self.lost.set_result(None)

    def _end(self, exc: Exception | None) -> None:
        if not self.ended:
            self.ended = True
            if exc is None:
                self.h11.receive_data(b"")  # h11 reads it as the end of the stream
            else:
                self.error = exc  # not an end of stream: a reset must not end a close-delimited body
        self._wake()

    def _wake(self) -> None:
        w = self.waiter
        if w is not None and not w.done():
            w.set_result(None)

    def reusable(self) -> bool:
        """True when nothing has come in since the last response and the stream is open: a
        request written now is the next thing the server reads."""
        if self.ended or self.transport is None or self.transport.is_closing():
            return False
        if self.h11.our_state is not h11.IDLE or self.h11.their_state is not h11.IDLE:
            return False
        data, closed = self.h11.trailing_data
        return not data and not closed

    async def more(self) -> None:
        """Wait for bytes or the end of the stream (h11 has asked for more data)."""
        if self.error is not None:
            raise self.error
        if self.ended:  # h11 was told; it asks for data only if it was not
            raise HttpError("h11 asked for data after the end of the stream")
        self.waiter = self.loop.create_future()
        try:
            await self.waiter
        finally:
            self.waiter = None
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class Connection:
    """One keep-alive connection, opened on first use, reopened when h11 or the server ended it."""

    def __init__(self, host: str, port: int, timeout: float) -> None:
        self.host, self.port, self.timeout = host, port, timeout
        self._authority = f"{host}:{port}".encode()
        self._wire: _Wire | None = None
        self.opened = 0  # TCP connections opened so far

    async def get(self, path: str, headers: dict[str, str]) -> Response:
        return await self.request("GET", path, headers)

    async def post(self, path: str, form: dict[str, str], headers: dict[str, str]) -> Response:
        body = urlencode(form).encode()
        return await self.request("POST", path, {**headers, "Content-Type": _FORM}, body)

    async def request(self, method: str, path: str, headers: dict[str, str], body: bytes = b"") -> Response:
        """Send one request and read its response, within `timeout` in all. Raises NoResponse
        when the request went out and no answer began (sent again only as the module says),
        HttpError when an answer broke off or was malformed, TimeoutError, OSError."""
        # Bytes, so h11 has nothing to encode (it still validates every name and value).
        head = [(b"Host", self._authority), *[(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]]
        if body or method == "POST":
            head.append((b"Content-Length", str(len(body)).encode()))
        async with asyncio.timeout(self.timeout):
            wire = self._wire
            if wire is not None and not wire.reusable():
                # Closed (or spoken on) by the server while idle: nothing of this request has
                # been written, so a new connection is safe for any method.
                self._drop()
                wire = None
            reused = wire is not None
            if wire is None:
                wire = await self._connect()
            try:
                return await self._exchange(wire, method, path, head, body)
            except _Unanswered as exc:
                self._drop()
                if not (reused and method in _IDEMPOTENT):
                    raise NoResponse(f"{method} {path}: the connection ended after the request was sent and "
                                     f"before any response ({exc}); not sent again") from exc.__cause__
            # A GET or HEAD the server dropped on a kept-alive connection: once more, on a new one.
            wire = await self._connect()
            try:
                return await self._exchange(wire, method, path, head, body)
            except _Unanswered as exc:
                self._drop()
                raise NoResponse(f"{method} {path}: no response on a new connection either ({exc})") from exc.__cause__

    async def _connect(self) -> _Wire:
        loop = asyncio.get_running_loop()
        _, wire = await loop.create_connection(lambda: _Wire(loop), self.host, self.port)
        self._wire = wire
        self.opened += 1
        return wire

    async def _exchange(self, wire: _Wire, method: str, path: str, head: list[tuple[bytes, bytes]],
                        body: bytes) -> Response:
        conn = wire.h11
        try:
            data = conn.send(h11.Request(method=method.encode(), target=path.encode(), headers=head)) or b""
            if body:
                data += conn.send(h11.Data(data=body)) or b""
            data += conn.send(h11.EndOfMessage()) or b""
        except h11.LocalProtocolError:
            self._drop()
            raise
        assert wire.transport is not None
        wire.received = False
        status = 0
        headers: list[tuple[str, str]] = []
        chunks: list[bytes] = []
        try:
            wire.transport.write(data)
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    await wire.more()
                elif isinstance(event, h11.Data):
                    chunks.append(event.data)
                elif isinstance(event, h11.Response):
                    status = event.status_code
                    headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in event.headers]
                elif isinstance(event, h11.EndOfMessage):
                    break
                elif isinstance(event, h11.ConnectionClosed):
                    raise ConnectionResetError("the server closed the connection")
                # an InformationalResponse (1xx): the final response follows
        except (OSError, h11.RemoteProtocolError) as exc:
            self._drop()
            if not wire.received:
                raise _Unanswered(str(exc) or type(exc).__name__) from exc
            raise HttpError(f"{method} {path}: {type(exc).__name__}: {exc}") from exc
        except BaseException:  # a timeout or a cancel mid-exchange: the connection is in an unknown state
            self._drop()
            raise
        if conn.our_state is h11.DONE and conn.their_state is h11.DONE and not wire.ended:
            conn.start_next_cycle()
        else:  # MUST_CLOSE (Connection: close, HTTP/1.0) or a body the end of the stream delimited
            self._drop()
        return Response(status, headers, b"".join(chunks))

    def _drop(self) -> None:
        wire, self._wire = self._wire, None
        if wire is not None:
            wire.close()

    async def close(self) -> None:
        wire, self._wire = self._wire, None
        if wire is not None:
            wire.close()
            with contextlib.suppress(Exception):
                await wire.lost

"""A lean HTTP/1.1 client for the load generator: one keep-alive connection per simulated
browser, requests written by hand, responses read with Content-Length or chunked framing.

httpx spent about 12 ms of the load generator's CPU per sign-in (a client and a transport
per flow, anyio, header models); on a 2-core machine shared with the app that was 0.48 cores
taken from what is measured, and the generator's own busy event loop was added to every
latency it recorded. Loopback and plain http only; no redirects are followed, no cookies kept.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from urllib.parse import urlencode


class HttpError(Exception):
    pass


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


class Connection:
    """One TCP connection, opened on first use, reopened if the server closed it in between."""

    def __init__(self, host: str, port: int, timeout: float) -> None:
        self.host, self.port, self.timeout = host, port, timeout
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def get(self, path: str, headers: dict[str, str]) -> Response:
        return await self.request("GET", path, headers)

    async def post(self, path: str, form: dict[str, str], headers: dict[str, str]) -> Response:
        body = urlencode(form).encode()
        return await self.request("POST", path, {**headers, "Content-Type": "application/x-www-form-urlencoded"}, body)

    async def request(self, method: str, path: str, headers: dict[str, str], body: bytes = b"") -> Response:
        async with asyncio.timeout(self.timeout):
            fresh = self.writer is None
            if fresh:
                await self._connect()
            head = [f"{method} {path} HTTP/1.1", f"Host: {self.host}:{self.port}"]
            head += [f"{k}: {v}" for k, v in headers.items()]
            if body or method == "POST":
                head.append(f"Content-Length: {len(body)}")
            data = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body
            try:
                return await self._exchange(data)
            except ConnectionError:
                if fresh:
                    raise
                # The server closed an idle keep-alive connection before answering: a browser
                # retries on a new one.
                await self.close()
                await self._connect()
                return await self._exchange(data)

    async def _connect(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)

    async def _exchange(self, data: bytes) -> Response:
        assert self.reader is not None and self.writer is not None
        self.writer.write(data)
        reader = self.reader
        line = await reader.readline()
        if not line:
            raise ConnectionResetError("connection closed before the response")
        parts = line.split(None, 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
            raise HttpError(f"bad status line {line[:80]!r}")
        status = int(parts[1])
        headers: list[tuple[str, str]] = []
        length: int | None = None
        chunked = close = False
        while True:
            raw = await reader.readline()
            if raw in (b"\r\n", b"\n"):
                break
            if not raw:
                raise HttpError("connection closed inside the response headers")
            name, _, value = raw.decode("latin-1").partition(":")
            name, value = name.strip().lower(), value.strip()
            headers.append((name, value))
            if name == "content-length":
                length = int(value)
            elif name == "transfer-encoding":
                chunked = "chunked" in value.lower()
            elif name == "connection":
                close = "close" in value.lower()
        if chunked:
            body = await self._chunks()
        elif length is not None:
            body = await reader.readexactly(length)
        else:
            body, close = await reader.read(), True
        if close:
            await self.close()
        return Response(status, headers, body)

    async def _chunks(self) -> bytes:
        assert self.reader is not None
        out = bytearray()
        while True:
            size = int((await self.reader.readline()).split(b";")[0], 16)
            if size == 0:
                while (await self.reader.readline()) not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                return bytes(out)
            out += await self.reader.readexactly(size)
            await self.reader.readexactly(2)

    async def close(self) -> None:
        writer, self.reader, self.writer = self.writer, None, None
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

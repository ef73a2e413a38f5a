"""The benchmark's own parts that decide what it reports: its HTTP client, the stall report,
the per-run usernames, the Argon2 share measured on the hashing threads."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest

from bench import common, report
from bench.http11 import Connection

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_bench_http_client_reads_lengths_chunks_and_reconnects_after_an_idle_close() -> None:
    seen: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        seen.append(head.split(b"\r\n", 1)[0])
        if head.startswith(b"POST"):
            length = int(next(h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")).split(b":")[1])
            body = await reader.readexactly(length)
            writer.write(b"HTTP/1.1 303 See Other\r\nLocation: /next\r\nSet-Cookie: a=1\r\nSet-Cookie: b=2\r\n"
                         b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        else:
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
        await writer.drain()
        writer.close()  # the server drops the keep-alive connection after each answer

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    conn = Connection("127.0.0.1", port, timeout=5)
    try:
        r = await conn.post("/login", {"a": "1 2", "b": "&"}, {"Origin": "http://x"})
        assert r.status_code == 303 and r.header("location") == "/next"
        assert r.get_list("set-cookie") == ["a=1", "b=2"] and r.text == "a=1+2&b=%26"
        await asyncio.sleep(0.05)
        r = await conn.get("/verify", {})  # on a connection the server closed: reopened, sent once
        assert r.status_code == 200 and r.text == "hello world"
    finally:
        await conn.close()
        server.close()
        await server.wait_closed()
    assert seen == [b"POST /login HTTP/1.1", b"GET /verify HTTP/1.1"]


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

"""The sign-in funnel (issue 18, part 2), on both backends: hand-made steps, code mails and events
with known numbers across days, purposes and domains; the roll-up into auth_daily (exactly
once, run twice, run by two workers at once, before the clean-up deletes the steps); every
aggregate of the funnel exactly; the pages, their tables, their CSVs and their SVGs."""

from __future__ import annotations

import asyncio
import csv
import io
import re
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from html.parser import HTMLParser
from typing import Any

import pytest
import sqlalchemy as sa

from app.clock import FixedClock
from app.otp.cleanup import GRACE, cleanup
from app.staff import Role, analytics, charts, funnel_routes
from app.staff.analytics import Metric, Quantile, quantile
from app.tables import auth_daily, auth_events, customers, mail_outbox, otp_codes, otp_verification
from tests.conftest import Capture, Running, registered
from tests.staff_support import staff_cookies

pytestmark = pytest.mark.anyio

NOW = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)  # FixedClock's start
D1 = datetime(2025, 12, 31, 10, 0, tzinfo=UTC)  # yesterday
D3 = datetime(2025, 12, 29, 10, 0, tzinfo=UTC)
D10 = datetime(2025, 12, 22, 10, 0, tzinfo=UTC)
D40 = datetime(2025, 11, 22, 10, 0, tzinfo=UTC)
TODAY = datetime(2026, 1, 1, 11, 50, tzinfo=UTC)  # not settled at NOW: counted on the fly
KINDS = {"registration": "registration_code", "login": "login_code", "reset": "reset_code", "email": "email_code",
         "delete": "delete_code"}


@dataclass
class Mail:
    status: str = "sent"
    tries: int = 1
    latency: float | None = 1.0  # queued -> accepted, seconds
    error: str | None = None
    after: float = 0.0  # queued this long after the step began


@dataclass
class Step:
    id: int
    customer: int
    purpose: str
    address: str
    created: datetime
    verified_after: float | None = None
    attempts: int = 0
    codes: int = 1
    mails: list[Mail] = field(default_factory=lambda: [Mail()])
    kind: str = "code"
    ttl: int = 600

    @property
    def expires(self) -> datetime:
        return self.created + timedelta(seconds=61 * (self.codes - 1) + self.ttl)  # each resend renews it


STEPS = [
    # Yesterday: every outcome.
    Step(1, 1, "login", "ann@gmail.com", D1, verified_after=25, attempts=1, mails=[Mail(latency=2)]),
    Step(2, 2, "login", "bob@gmail.com", D1, verified_after=50, attempts=2, codes=2,
         mails=[Mail(latency=0.5), Mail(latency=4, after=61)]),
    Step(3, 3, "login", "cy@outlook.com", D1, mails=[Mail("failed", 3, None, "550 5.1.1 <cy@outlook.com>: mailbox unavailable")]),
    Step(4, 4, "registration", "dee@example.org", D1, attempts=5, mails=[Mail(latency=40)]),  # locked out
    Step(5, 5, "registration", "eve@corp.example", D1, attempts=2),  # wrong codes, gave up
    Step(6, 6, "reset", "fay@GMAIL.com", D1 + timedelta(hours=5), mails=[Mail(latency=3)]),  # never entered
    Step(7, 7, "login", "gus@gmail.com", D1, mails=[Mail("expired", 0, None, "code expired before delivery")]),
    # Three days ago.
    Step(8, 8, "login", "hal@yahoo.com", D3, verified_after=200, attempts=1, mails=[Mail(latency=15)]),
    Step(9, 9, "email", "ida@gmail.com", D3, verified_after=3000, attempts=1, ttl=3600, mails=[Mail(latency=700)]),
    # Outside 7 days, inside 30; outside 30, inside 90.
    Step(10, 10, "login", "jo@gmail.com", D10, verified_after=5, attempts=1),
    Step(11, 11, "login", "kim@gmail.com", D40, verified_after=12, attempts=1),
    # Today, still open at NOW.
    Step(12, 12, "login", "lu@gmail.com", TODAY, verified_after=8, attempts=1),
    # Not counted: a decoy (nobody's code) and a placeholder.
    Step(13, 13, "registration", "mo@gmail.com", D1, kind="decoy", mails=[]),
    Step(14, 14, "login", "ned@gmail.com", D1, kind="placeholder", mails=[]),
]


async def load(db: Any, steps: list[Step] = STEPS) -> None:
    await db.execute_many(customers.insert(), [
        {"id": s.customer, "email": s.address.lower() if s.customer != 6 else "fay@gmail.com",
         "username": f"u{s.customer}", "full_name": "", "password_hash": "x", "otp_enabled": True,
         "otp_attempts": 0, "otp_lockouts": 0, "session_version": 0, "source": "shop", "created_at": D40}
        for s in steps])
    await db.execute_many(otp_verification.insert(), [
        {"id": s.id, "customer_id": s.customer, "purpose": s.purpose, "code_hash": "h", "session_binding": "b",
         "kind": s.kind, "sent_to": s.address, "attempts": s.attempts, "created_at": s.created,
         "expires_at": s.expires, "last_code_at": s.created,
         "used_at": s.created + timedelta(seconds=s.verified_after) if s.verified_after is not None else None,
         "invalidated_at": None, "proven": True} for s in steps])
    codes = [{"challenge_id": s.id, "code_hash": "h", "created_at": s.created + timedelta(seconds=61 * i),
              "expires_at": s.created + timedelta(seconds=61 * i + s.ttl)}
             for s in steps if s.kind == "code" for i in range(s.codes)]
    await db.execute_many(otp_codes.insert(), codes)
    mails = []
    for s in steps:
        for mail in s.mails:
            queued = s.created + timedelta(seconds=mail.after)
            mails.append({
                "kind": KINDS[s.purpose], "customer_id": s.customer, "challenge_id": s.id, "recipient": s.address,
                "payload": None, "status": mail.status, "tries": mail.tries, "last_error": mail.error,
                "created_at": queued, "next_attempt_at": queued + timedelta(seconds=30),
                "sent_at": queued + timedelta(seconds=mail.latency) if mail.latency is not None else None,
                "expires_at": queued + timedelta(seconds=s.ttl)})
    await db.execute_many(mail_outbox.insert(), mails)
    event = {"ip": "203.0.113.9", "user_agent": "test", "staff_id": None, "detail": None}
    await db.execute_many(auth_events.insert(), [
        # Step 4's customer was locked out while it was open; step 5's a day before it began.
        {**event, "customer_id": 4, "event": "locked", "created_at": D1 + timedelta(seconds=90)},
        {**event, "customer_id": 5, "event": "locked", "created_at": D1 - timedelta(days=1)},
    ])


def numbers(f: analytics.Funnel) -> dict[str, int]:
    return {m.value: f.totals[m] for m in Metric if f.totals[m]}


# What the 7 days ending today hold (steps 1-9 and 12), worked out by hand from STEPS.
WEEK = {"requested": 10, "mailed": 9, "delivered": 8, "verified": 5, "resent": 1, "resends": 1,
        "wrong_entries": 8, "undelivered": 2, "locked": 1, "failed_wrong": 1, "failed_expired": 1,
        "mails": 11, "mails_sent": 9, "mails_failed": 1}
# Today and yesterday (the "24 hours" range): steps 1-7 and 12.
TWO_DAYS = {"requested": 8, "mailed": 7, "delivered": 6, "verified": 3, "resent": 1, "resends": 1,
            "wrong_entries": 8, "undelivered": 2, "locked": 1, "failed_wrong": 1, "failed_expired": 1,
            "mails": 9, "mails_sent": 7, "mails_failed": 1}


async def test_roll_up_folds_each_settled_step_once_and_the_funnel_adds_up(server: Running) -> None:
    db = server.services.db
    await load(db)
    before = await analytics.funnel(db, now=NOW, days=2)  # nothing rolled up: all counted on the fly
    assert numbers(before) == TWO_DAYS

    # Yesterday afternoon: steps 1-5, 7 and the older ones had settled (an hour past expiry), not 6.
    first = await analytics.roll_up(db, now=D1 + timedelta(hours=3))
    assert first.steps == 10 and first.watermark == D1 + timedelta(hours=2)
    # Now: step 6 adds to yesterday's counts; 12 is still open; decoys and placeholders never count.
    second = await analytics.roll_up(db, now=NOW)
    assert second.steps == 1 and second.watermark == NOW - GRACE
    again = await analytics.roll_up(db, now=NOW)
    assert again.steps == 0 and again.watermark == NOW - GRACE

    week = await analytics.funnel(db, now=NOW, days=7)
    assert numbers(week) == WEEK
    assert week.live_steps == 1  # step 12
    assert sum(week.totals[x] for x in analytics.REASONS) + week.totals[Metric.VERIFIED] == week.totals[Metric.REQUESTED]
    # Time to verify: 8, 25, 50, 200, 3000 s. p50 is the 3rd value (bucket <= 60 s), p90 the 5th (over 30 min).
    assert week.histogram(analytics.TTV_METRICS) == [1, 0, 1, 0, 1, 0, 0, 0, 1, 0, 0, 0, 1]
    assert week.ttv_p50 == Quantile(60, 1800) and str(week.ttv_p50) == "≤ 60 s"
    assert week.ttv_p90 == Quantile(None, 1800) and str(week.ttv_p90) == "over 30 min"
    # Delivery: 0.5, 1, 1, 2, 3, 4, 15, 40, 700 s. p50: the 5th (<= 5 s); p90: the 9th (over 10 min).
    assert week.histogram(analytics.DLV_METRICS) == [3, 1, 2, 0, 1, 0, 1, 0, 0, 0, 1]
    assert str(week.delivery_p50) == "≤ 5 s" and str(week.delivery_p90) == "over 10 min"
    assert week.resend_rate == pytest.approx(0.1) and week.conversion == pytest.approx(0.5)

    days = {d.isoformat(): (c[Metric.REQUESTED], c[Metric.MAILED], c[Metric.DELIVERED], c[Metric.VERIFIED],
                            c[Metric.LOCKED]) for d, c in week.by_day.items()}
    assert list(days) == ["2025-12-26", "2025-12-27", "2025-12-28", "2025-12-29", "2025-12-30", "2025-12-31",
                          "2026-01-01"]
    assert days["2025-12-29"] == (2, 2, 2, 2, 0) and days["2025-12-31"] == (7, 6, 5, 2, 1)
    assert days["2026-01-01"] == (1, 1, 1, 1, 0) and days["2025-12-30"] == (0, 0, 0, 0, 0)

    split = {p: (c[Metric.REQUESTED], c[Metric.DELIVERED], c[Metric.VERIFIED]) for p, c in week.by_purpose.items()
             if c[Metric.REQUESTED]}
    assert split == {"login": (6, 4, 4), "registration": (2, 2, 0), "reset": (1, 1, 0), "email": (1, 1, 1)}
    domains = {dm: (c[Metric.REQUESTED], c[Metric.DELIVERED], c[Metric.VERIFIED]) for dm, c in week.by_domain.items()
               if c[Metric.REQUESTED]}
    # "GMAIL.com" is gmail.com; example.org and corp.example are "other".
    assert domains == {"gmail.com": (6, 5, 4), "outlook.com": (1, 0, 0), "other": (2, 2, 0), "yahoo.com": (1, 1, 1)}
    assert week.domains == ["gmail.com", "other", "outlook.com", "yahoo.com"]

    # Ranges: 24 hours (today and yesterday), 30 and 90 days.
    assert numbers(await analytics.funnel(db, now=NOW, days=2)) == TWO_DAYS  # the same as before the roll-up
    month = await analytics.funnel(db, now=NOW, days=30)
    assert (month.totals[Metric.REQUESTED], month.totals[Metric.VERIFIED]) == (11, 6)
    quarter = await analytics.funnel(db, now=NOW, days=90)
    assert (quarter.totals[Metric.REQUESTED], quarter.totals[Metric.VERIFIED]) == (12, 7)
    assert quarter.histogram(analytics.TTV_METRICS)[:2] == [2, 1]  # 5 s and 8 s; 12 s

    # Filters: one purpose, one domain, both.
    login = await analytics.funnel(db, now=NOW, days=7, purpose="login")
    assert {m: login.totals[m] for m in analytics.STEPS} == {"requested": 6, "mailed": 5, "delivered": 4, "verified": 4}
    assert login.totals[Metric.UNDELIVERED] == 2 and login.totals[Metric.RESENT] == 1
    assert {dm: c[Metric.REQUESTED] for dm, c in login.by_domain.items() if c[Metric.REQUESTED]} == \
        {"gmail.com": 4, "outlook.com": 1, "yahoo.com": 1}
    gmail = await analytics.funnel(db, now=NOW, days=7, domain="gmail.com")
    assert {m: gmail.totals[m] for m in analytics.STEPS} == {"requested": 6, "mailed": 5, "delivered": 5, "verified": 4}
    assert {p: c[Metric.REQUESTED] for p, c in gmail.by_purpose.items() if c[Metric.REQUESTED]} == \
        {"login": 4, "reset": 1, "email": 1}
    both = await analytics.funnel(db, now=NOW, days=7, purpose="registration", domain="other")
    assert numbers(both) == {"requested": 2, "mailed": 2, "delivered": 2, "wrong_entries": 7, "locked": 1,
                             "failed_wrong": 1, "mails": 2, "mails_sent": 2}

    # The clean-up deletes the settled steps; the counts stay. An hour later step 12 is settled too.
    assert await cleanup(db, now=NOW) == 11 + 2  # and the decoy and the placeholder
    assert numbers(await analytics.funnel(db, now=NOW, days=7)) == WEEK
    later = NOW + timedelta(hours=2)
    assert (await analytics.roll_up(db, now=later)).steps == 1
    assert numbers(await analytics.funnel(db, now=later, days=7)) == WEEK


async def test_two_workers_rolling_up_at_once_count_each_step_once(server: Running, settings: Any,
                                                                   clock: FixedClock) -> None:
    from tests.conftest import running

    await load(server.services.db)
    async with running(settings, clock) as other:
        results = await asyncio.gather(analytics.roll_up(server.services.db, now=NOW),
                                       analytics.roll_up(other.services.db, now=NOW),
                                       analytics.roll_up(server.services.db, now=NOW + timedelta(seconds=1)))
    assert sum(r.steps for r in results) == 11
    assert numbers(await analytics.funnel(server.services.db, now=NOW, days=7)) == WEEK


async def test_roll_up_walks_a_long_backlog_in_slices(server: Running) -> None:
    db = server.services.db
    steps = [Step(100 + i, 100 + i, "login", f"p{i}@gmail.com", D40 + timedelta(days=i), verified_after=20,
                  attempts=1) for i in range(30)]
    await load(db, steps)
    done = await analytics.roll_up(db, now=NOW)
    assert done.steps == 30 and 15 <= done.slices <= 31  # a day of expiries per transaction, gaps jumped
    quarter = await analytics.funnel(db, now=NOW, days=90)
    assert (quarter.totals[Metric.REQUESTED], quarter.totals[Metric.VERIFIED]) == (30, 30)
    rows = await db.fetch_val(sa.select(sa.func.count()).select_from(auth_daily).where(auth_daily.c.purpose == "*",
                                                                                        auth_daily.c.domain == "*",
                                                                                        auth_daily.c.metric == "requested"))
    assert rows == 30


async def test_a_real_sign_up_is_counted_from_what_the_app_wrote(server: Running, smtp: Capture,
                                                                 clock: FixedClock) -> None:
    async with server.client() as c:
        await registered(c, smtp, email="zoe@outlook.com", username="zoe")
    db = server.services.db
    live = await analytics.funnel(db, now=clock.now(), days=1)
    clock.advance(2 * 3600)
    assert (await analytics.roll_up(db, now=clock.now())).steps == 1
    rolled = await analytics.funnel(db, now=clock.now(), days=1)
    assert numbers(live) == numbers(rolled)
    assert {m: rolled.totals[m] for m in analytics.STEPS} == {"requested": 1, "mailed": 1, "delivered": 1,
                                                              "verified": 1}
    assert rolled.by_purpose["registration"][Metric.VERIFIED] == 1
    assert rolled.domains == ["outlook.com"]


def test_percentiles_come_from_the_bucket_each_falls_in() -> None:
    bounds = (10, 30, 60)
    assert quantile([0, 0, 0, 0], bounds, 0.5) is None
    assert quantile([1, 0, 0, 0], bounds, 0.9) == Quantile(10, 60)
    assert quantile([5, 5, 0, 0], bounds, 0.5) == Quantile(10, 60)  # the 5th of 10 is in the first bucket
    assert quantile([5, 5, 0, 0], bounds, 0.51) == Quantile(30, 60)
    assert quantile([1, 0, 0, 9], bounds, 0.5) == Quantile(None, 60) and str(Quantile(None, 60)) == "over 60 s"
    assert analytics.domain_of("A@Gmail.COM") == "gmail.com" and analytics.domain_of("a@b.example") == "other"
    assert analytics.domain_of("@hotmail.com") == "hotmail.com"  # a final notice keeps only the domain
    assert analytics.domain_of("") == "unknown"
    # The roll-up settles steps when the clean-up deletes them.
    assert analytics.SETTLED == GRACE


# --- the pages ---------------------------------------------------------------------------------


@pytest.fixture
def console(server: Running) -> Running:
    if not any(getattr(r, "path", None) == "/admin/funnel" for r in server.app.router.routes):
        server.app.router.routes.extend(funnel_routes.routes)  # until app.main mounts them
    return server


class Tables(HTMLParser):
    """Every <table id="table-NAME"> of a page as rows of cell texts (header row first)."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self._name: str | None = None
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "table" and (a.get("id") or "").startswith("table-"):
            self._name = (a["id"] or "")[6:]
            self.tables[self._name] = []
        elif self._name and tag == "tr":
            self.tables[self._name].append([])
        elif self._name and tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag == "table":
            self._name = None
        elif self._name and tag in ("td", "th") and self._cell is not None:
            self.tables[self._name][-1].append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


async def test_funnel_page_has_a_chart_a_table_and_a_csv_per_section(console: Running) -> None:
    db = console.services.db
    await load(db)
    await analytics.roll_up(db, now=NOW)
    cookies, _ = await staff_cookies(console, role=Role.VIEWER, email="viewer@shop.example")
    async with console.client(cookies=cookies) as c:
        page = await c.get("/admin/funnel", params={"range": "7d"})
        assert page.status_code == 200
        html = page.text
        assert "<h1 id=\"funnel-title\">Sign-in funnel</h1>" in html
        assert '<label for="f-range">Range</label>' in html and '<label for="f-purpose">Purpose</label>' in html
        assert '<option value="7d" selected>' in html
        assert '<link rel="stylesheet" href="/admin/funnel/charts.css">' in html
        # CSP: no inline script or style anywhere in the page (the SVGs included).
        assert not re.search(r"<script(?![^>]*\ssrc=)", html) and "<style" not in html
        assert not re.search(r"\sstyle=", html)
        names = [ch.name for ch in charts.funnel_charts(await analytics.funnel(db, now=NOW, days=7))]
        assert names == ["steps", "daily", "purposes", "domains", "failures", "time_to_verify", "delivery"]
        assert html.count('<svg role="img"') == len(names) and html.count(">Download CSV<") == len(names)
        parser = Tables()
        parser.feed(html)
        assert list(parser.tables) == names
        assert parser.tables["steps"] == [["Step", "Steps", "Of the previous step", "Of requested"],
                                          ["Requested", "10", "–", "100.0%"], ["Mailed", "9", "90.0%", "90.0%"],
                                          ["Delivered", "8", "88.9%", "80.0%"], ["Verified", "5", "62.5%", "50.0%"]]
        assert parser.tables["failures"][1:] == [["Not delivered", "2", "20.0%"], ["Locked out", "1", "10.0%"],
                                                 ["Wrong code, then gave up", "1", "10.0%"],
                                                 ["Code never entered", "1", "10.0%"]]
        assert "p50 ≤ 60 s, p90 over 30 min" in html and "Resend rate 10.0%" in html
        for name in names:  # each CSV is its table
            got = await c.get("/admin/funnel.csv", params={"chart": name, "range": "7d", "purpose": "", "domain": ""})
            assert got.status_code == 200 and got.headers["content-type"].startswith("text/csv")
            assert "attachment" in got.headers["content-disposition"]
            assert list(csv.reader(io.StringIO(got.text))) == parser.tables[name], name
        # The SMTP reply behind the mail given up.
        assert "550 5.1.1 &lt;cy@outlook.com&gt;: mailbox unavailable" in html

        filtered = await c.get("/admin/funnel", params={"range": "30d", "purpose": "login", "domain": "gmail.com"})
        p = Tables()
        p.feed(filtered.text)
        assert p.tables["steps"][1] == ["Requested", "5", "–", "100.0%"]  # steps 1, 2, 7, 10, 12
        assert '<option value="login" selected>' in filtered.text and '<option value="gmail.com" selected>' in filtered.text
        odd = await c.get("/admin/funnel", params={"range": "1y", "purpose": "<x>", "domain": "evil.example"})
        assert odd.status_code == 200 and '<option value="7d" selected>' in odd.text and "evil.example" not in odd.text
        nope = await c.get("/admin/funnel.csv", params={"chart": "nope"})
        assert nope.status_code == 303 and nope.headers["location"].startswith("/admin/funnel?")

        css = await c.get("/admin/funnel/charts.css")
        assert css.status_code == 200 and css.headers["content-type"].startswith("text/css")
        assert ".pygal-chart .color-0" in css.text and "#chart-" not in css.text


async def test_every_svg_is_free_of_script_style_and_ids() -> None:
    days = analytics.range_days(NOW, 90)
    week = analytics.Funnel(days, None, None, Counter({"requested": 3, "verified": 1, "ttv_le_10s": 1}),
                            {d: Counter({"requested": 1}) for d in days}, {"login": Counter({"requested": 3})},
                            {"gmail.com": Counter({"requested": 3})}, None, domains=["gmail.com"])
    for chart in charts.funnel_charts(week):
        svg = chart.svg
        assert svg.startswith('<svg role="img" aria-label=') and svg.endswith("</svg>")
        assert "<script" not in svg and "<style" not in svg and "style=" not in svg and " id=" not in svg, chart.name
        assert "<!--" not in svg and "tooltip-overlay" not in svg


async def test_signed_out_is_sent_to_sign_in_and_nothing_is_shown(console: Running) -> None:
    async with console.client() as c:
        for path in ("/admin/funnel", "/admin/funnel.csv?chart=steps", "/admin/abuse", "/admin/funnel/charts.css"):
            r = await c.get(path)
            assert r.status_code == 303 and r.headers["location"] == "/admin/login", path


async def test_abuse_page_ranks_customers_and_addresses_by_failures(console: Running) -> None:
    db = console.services.db
    await load(db)
    e = {"user_agent": "t", "staff_id": None, "detail": None}
    rows = []
    for i in range(6):  # customer 3: 6 wrong codes and a lockout from one address
        rows.append({**e, "customer_id": 3, "event": "code_failed", "ip": "198.51.100.7",
                     "created_at": NOW - timedelta(hours=1, minutes=i)})
    rows.append({**e, "customer_id": 3, "event": "locked", "ip": "198.51.100.7", "created_at": NOW - timedelta(hours=1)})
    for cid in (1, 2, 8):  # one address trying several accounts' passwords
        rows.append({**e, "customer_id": cid, "event": "password_failed", "ip": "192.0.2.50",
                     "created_at": NOW - timedelta(hours=2)})
    rows.append({**e, "customer_id": 1, "event": "code_failed", "ip": "192.0.2.50",
                 "created_at": NOW - timedelta(days=3)})  # outside 24 hours
    rows.append({**e, "customer_id": None, "event": "password_failed", "ip": "192.0.2.50",
                 "created_at": NOW - timedelta(hours=3)})  # an unknown login
    await db.execute_many(auth_events.insert(), rows)
    day = await analytics.abuse(db, now=NOW, days=1)
    assert [(x.key, x.code_failures, x.password_failures, x.lockouts) for x in day.customers] == [
        ("cy@outlook.com", 6, 0, 1), ("ann@gmail.com", 0, 1, 0), ("bob@gmail.com", 0, 1, 0), ("hal@yahoo.com", 0, 1, 0)]
    # An address's accounts: those its wrong passwords were for.
    assert [(x.key, x.failures, x.lockouts, x.accounts) for x in day.addresses] == [
        ("198.51.100.7", 6, 1, 0), ("192.0.2.50", 4, 0, 3)]
    week = await analytics.abuse(db, now=NOW, days=7)
    # The week adds the older failure and the lockouts loaded with the steps (customers 4 and 5).
    assert {x.key: x.failures + x.lockouts for x in week.customers}["ann@gmail.com"] == 2
    assert not week.full
    capped = await analytics.abuse(db, now=NOW, days=7, sample=3)
    assert capped.full and capped.sampled["code_failed"] == 3

    cookies, _ = await staff_cookies(console, role=Role.VIEWER, email="viewer@shop.example")
    async with console.client(cookies=cookies) as c:
        page = await c.get("/admin/abuse", params={"range": "24h"})
        assert page.status_code == 200
        assert "<h1 id=\"abuse-title\">Addresses with the most failures</h1>" in page.text
        assert page.text.index("cy@outlook.com") < page.text.index("ann@gmail.com")
        assert 'href="/admin/audit?ip=198.51.100.7"' in page.text and 'href="/admin/customers/3"' in page.text
        assert not re.search(r"\sstyle=", page.text)


async def test_mail_failures_group_the_server_replies(server: Running) -> None:
    db = server.services.db
    await load(db)
    base = {"kind": "login_code", "customer_id": None, "challenge_id": None, "payload": None, "sent_at": None,
            "expires_at": None, "created_at": NOW - timedelta(hours=1)}
    await db.execute_many(mail_outbox.insert(), [
        *({**base, "recipient": f"x{i}@outlook.com", "status": "failed", "tries": 1, "last_error": "550 5.7.1 blocked",
           "next_attempt_at": NOW - timedelta(minutes=i)} for i in range(3)),
        {**base, "recipient": "y@gmail.com", "status": "queued", "tries": 2, "last_error": "421 4.7.0 try later",
         "next_attempt_at": NOW + timedelta(minutes=5)},
    ])
    found = await analytics.mail_failures(db, now=NOW, days=1)
    assert [(r.text, r.failed, r.retrying, dict(r.domains)) for r in found.replies] == [
        ("550 5.7.1 blocked", 3, 0, {"outlook.com": 3}), ("421 4.7.0 try later", 0, 1, {"gmail.com": 1})]
    assert len(found.recent) == 3
    week = await analytics.mail_failures(db, now=NOW, days=7)  # adds step 3's bounce and step 7's expiry
    assert {r.text: r.failed for r in week.replies}["550 5.1.1 <cy@outlook.com>: mailbox unavailable"] == 1


def test_bench_console_report_reads_its_numbers() -> None:
    from bench import console

    result = {"customers": 1000, "steps": 900, "events": 5000, "requests": 3, "target_ms": 300.0,
              "load": {"steps_loaded": 900, "second_codes": 90, "events_loaded": 5000, "total_s": 2.0},
              "roll_up": {"steps": 899, "seconds": 1.5, "slices": 90, "again_s": 0.004}, "auth_daily_rows": 1234,
              "pages": {"/admin/funnel?range=7d": {"p50": 40.0, "p95": 80.0, "max": 90.0, "bytes": 1000},
                        "/admin/abuse?range=90d": {"p50": 200.0, "p95": 310.0, "max": 320.0, "bytes": 900},
                        "/admin/audit": {"skipped": "404"}},
              "explain": [{"phase": "funnel 90 days", "function": "app/staff/analytics.py:funnel",
                           "verdict": "index: auth_daily.PRIMARY (range)"}]}
    [target] = console.targets(result)
    assert target["holds"] is False and "/admin/abuse?range=90d: p95 310 ms" in target["measured"]
    result["pages"]["/admin/abuse?range=90d"]["p95"] = 250.0
    assert console.targets(result)[0]["holds"] is True
    text = "\n".join(console.markdown(result))
    assert "| `/admin/funnel?range=7d` | 40 | 80 | 90 | 1,000 |" in text and "skipped (404)" in text
    assert "/admin/funnel?range=90d" in console.pages("abc") and "/admin/abuse?range=24h" in console.pages("abc")

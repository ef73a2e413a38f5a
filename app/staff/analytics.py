"""The sign-in funnel (issue 18): codes requested -> mailed -> delivered -> verified, per day,
purpose and mail domain, kept as daily counts in `auth_daily`. No HTTP here.

A step (a row of customer_otp_verification with a mailed code) is counted once, when it is
settled: its newest code expired `settled` ago (the clean-up's grace hour). Until then a resend
could still add to it; after it the clean-up deletes it. `roll_up` runs in the clean-up just
before that deletion, so every step is folded exactly once: it folds the steps whose expiry
lies between a watermark (a row of auth_daily) and now - settled, in slices, each one
transaction holding the watermark row's lock, and moves the watermark. Several workers may run
it at once: the second waits for the lock and finds nothing left to fold.

The pages read auth_daily (point lookups on its primary key, days x purposes x domains) and
add the steps not yet settled, folded on the fly the same way: a page shows the same numbers
before and after a roll-up.

Metrics per step (day of its request, purpose, the recipient's mail domain):
  requested    a step for which a code was mailed (placeholders, decoys and factor steps are not)
  mailed       one of its code mails was handed to the mail server (at least one try)
  delivered    one of its code mails was accepted (status sent)
  verified     its code was entered (used_at)
  resent       it had more than one code; resends: the extra codes
  wrong_entries  wrong codes typed at it
  the outcome of each step that was not verified, exactly one of (in this order):
  undelivered  none of its code mails was accepted
  locked       its customer (or address) was locked out while it was open (a `locked` event)
  failed_wrong wrong codes typed, then abandoned or replaced
  failed_expired  nothing typed: the code expired unused or the step was replaced
  so requested = verified + undelivered + locked + failed_wrong + failed_expired.
  ttv_le_<N>s / ttv_over   time from the request to the right code, a histogram
Per code mail: mails, mails_sent, mails_failed, dlv_le_<N>s / dlv_over (queued -> accepted).

Every step also counts under purpose "*" and domain "*" (the totals the pages read).
"""

from __future__ import annotations

import contextlib
import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from enum import StrEnum
from typing import Any

import sqlalchemy as sa
from databases import Database

from app import sql
from app.audit import Event
from app.database import INTEGRITY_ERRORS
from app.mail.outbox import CODE_KINDS, MailStatus
from app.otp.engine import Kind, Purpose
from app.tables import auth_daily, auth_events, customers, mail_outbox, otp_codes, otp_verification

ALL = "*"  # every purpose, or every domain
OTHER = "other"  # a mail domain not in PROVIDERS
UNKNOWN = "unknown"  # a step without a code mail row
PURPOSES = tuple(p.value for p in Purpose)
# Domains kept by name; every other domain counts as "other", so the table stays days x ~40 rows
# whatever the customers use (a company's own domain shows in the abuse view and mail failures).
PROVIDERS = frozenset({
    "gmail.com", "googlemail.com", "outlook.com", "hotmail.com", "live.com", "msn.com", "hotmail.co.uk",
    "outlook.de", "hotmail.de", "hotmail.fr", "yahoo.com", "ymail.com", "yahoo.co.uk", "yahoo.de", "yahoo.fr",
    "icloud.com", "me.com", "mac.com", "aol.com", "gmx.de", "gmx.net", "gmx.com", "web.de", "t-online.de",
    "freenet.de", "posteo.de", "mailbox.org", "proton.me", "protonmail.com", "yandex.ru", "mail.ru", "orange.fr",
    "free.fr", "laposte.net", "libero.it", "qq.com", "163.com", "zoho.com", "fastmail.com", "btinternet.com",
})
DOMAINS = (*sorted(PROVIDERS), OTHER, UNKNOWN)

SETTLED = timedelta(hours=1)  # the clean-up's grace (it passes its own GRACE)
SLICE = timedelta(days=1)  # expiry span folded per transaction (a backlog: one per day)
LIVE_SPAN = timedelta(days=2)  # the most a page folds on the fly when roll-ups stopped
MAX_DAYS = 90


class Metric(StrEnum):
    REQUESTED = "requested"
    MAILED = "mailed"
    DELIVERED = "delivered"
    VERIFIED = "verified"
    RESENT = "resent"
    RESENDS = "resends"
    WRONG_ENTRIES = "wrong_entries"
    UNDELIVERED = "undelivered"
    LOCKED = "locked"
    FAILED_WRONG = "failed_wrong"
    FAILED_EXPIRED = "failed_expired"
    MAILS = "mails"
    MAILS_SENT = "mails_sent"
    MAILS_FAILED = "mails_failed"


STEPS = (Metric.REQUESTED, Metric.MAILED, Metric.DELIVERED, Metric.VERIFIED)
REASONS = (Metric.UNDELIVERED, Metric.LOCKED, Metric.FAILED_WRONG, Metric.FAILED_EXPIRED)
TTV_BOUNDS = (10, 20, 30, 45, 60, 90, 120, 180, 300, 600, 900, 1800)  # seconds
DLV_BOUNDS = (1, 2, 5, 10, 20, 30, 60, 120, 300, 600)


def _bucket_names(prefix: str, bounds: Sequence[int]) -> tuple[str, ...]:
    return (*(f"{prefix}_le_{b}s" for b in bounds), f"{prefix}_over")


TTV_METRICS = _bucket_names("ttv", TTV_BOUNDS)
DLV_METRICS = _bucket_names("dlv", DLV_BOUNDS)


def _bucket(names: tuple[str, ...], bounds: Sequence[int], seconds: float) -> str:
    for name, bound in zip(names, bounds, strict=False):
        if seconds <= bound:
            return name
    return names[-1]


def domain_of(recipient: str | None) -> str:
    """The dimension a recipient counts under: a provider's domain, "other" or "unknown"."""
    if not recipient or "@" not in recipient:
        return UNKNOWN
    domain = recipient.rsplit("@", 1)[1].strip().lower().rstrip(".")
    return domain if domain in PROVIDERS else OTHER


# --- folding steps ---------------------------------------------------------------------------

o, m, k, e, d = otp_verification, mail_outbox, otp_codes, auth_events, auth_daily
_in_span = sa.and_(o.c.kind == Kind.CODE.value, o.c.expires_at > sa.bindparam("lo"),
                   o.c.expires_at <= sa.bindparam("hi"))
_codes = sa.select(sa.func.count()).where(k.c.challenge_id == o.c.id).scalar_subquery()
# Locked out while the step was open: the (customer_id, event, created_at) index, per step.
_locked = sa.exists().where(
    e.c.customer_id == o.c.customer_id, e.c.event == Event.LOCKED.value, e.c.created_at >= o.c.created_at,
    e.c.created_at <= sa.func.coalesce(o.c.used_at, o.c.invalidated_at, o.c.expires_at),
)
_STEPS = sql.Query(
    sa.select(o.c.id, o.c.purpose, o.c.created_at, o.c.used_at, o.c.attempts, _codes.label("codes"),
              _locked.label("locked"))
    .where(_in_span)
)
_MAILS = sql.Query(
    sa.select(m.c.challenge_id, m.c.id, m.c.recipient, m.c.status, m.c.tries, m.c.created_at, m.c.sent_at)
    .select_from(m.join(o, o.c.id == m.c.challenge_id))
    # Equalities, not IN: prepared statements take no expanding parameters.
    .where(_in_span, sa.or_(*(m.c.kind == kind.value for kind in sorted(CODE_KINDS))))
)
_NEXT_EXPIRY = sql.Query(sa.select(sa.func.min(o.c.expires_at)).where(o.c.expires_at > sa.bindparam("lo")))

Key = tuple[date, str, str, str]  # day, purpose, domain, metric


def fold(steps: Iterable[Any], mails: Iterable[Any]) -> Counter[Key]:
    """The counts of settled (or, for a page, not yet settled) steps and their code mails."""
    by_step: dict[int, list[Any]] = defaultdict(list)
    for mail in mails:
        by_step[mail.challenge_id].append(mail)
    groups: dict[tuple[date, str, str], Counter[str]] = defaultdict(Counter)
    sent, failed = MailStatus.SENT.value, MailStatus.FAILED.value
    for s in steps:
        its = sorted(by_step.get(s.id, ()), key=lambda r: (r.created_at, r.id))
        got = groups[(s.created_at.astimezone(UTC).date(), str(s.purpose),
                      domain_of(its[0].recipient) if its else UNKNOWN)]
        verified = s.used_at is not None
        delivered = any(r.status == sent for r in its)
        wrong = max(0, int(s.attempts) - (1 if verified else 0))  # the right entry counts as an attempt
        got[Metric.REQUESTED] += 1
        got[Metric.MAILED] += any(r.tries > 0 or r.status == sent for r in its)
        got[Metric.DELIVERED] += delivered
        got[Metric.WRONG_ENTRIES] += wrong
        if int(s.codes) > 1:
            got[Metric.RESENT] += 1
            got[Metric.RESENDS] += int(s.codes) - 1
        if verified:
            got[Metric.VERIFIED] += 1
            got[_bucket(TTV_METRICS, TTV_BOUNDS, (s.used_at - s.created_at).total_seconds())] += 1
        elif not delivered:
            got[Metric.UNDELIVERED] += 1
        elif s.locked:
            got[Metric.LOCKED] += 1
        elif wrong:
            got[Metric.FAILED_WRONG] += 1
        else:
            got[Metric.FAILED_EXPIRED] += 1
        for r in its:
            got[Metric.MAILS] += 1
            if r.status == sent and r.sent_at is not None:
                got[Metric.MAILS_SENT] += 1
                got[_bucket(DLV_METRICS, DLV_BOUNDS, max(0.0, (r.sent_at - r.created_at).total_seconds()))] += 1
            elif r.status == failed:
                got[Metric.MAILS_FAILED] += 1
    out: Counter[Key] = Counter()
    for (day, purpose, domain), got in groups.items():
        for p in (purpose, ALL):
            for dm in (domain, ALL):
                for metric, n in got.items():
                    if n:
                        out[(day, p, dm, str(metric))] += n
    return out


# --- the watermark and the upsert ------------------------------------------------------------

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_WM_DAY, _WM = date(1970, 1, 1), "_"
_wm_key = sa.and_(d.c.day == _WM_DAY, d.c.purpose == _WM, d.c.domain == _WM, d.c.metric == "watermark")
_WM_NEW = sql.Query(d.insert(), columns=("day", "purpose", "domain", "metric", "count"))
_WM_LOCK = sql.Query(sa.select(d.c["count"]).where(_wm_key).with_for_update())
_WM_READ = sql.Query(sa.select(d.c["count"]).where(_wm_key))
_WM_SET = sql.Query(d.update().where(_wm_key).values(count=sa.bindparam("wm")))
# SQLite (WAL): take the write lock before reading (as the clean-up does).
_SQLITE_WRITE_LOCK = sql.Query(d.update().where(sa.false()).values(count=d.c["count"]))

CHUNK = 100  # keys per upsert round (5 parameters each)


def _key_match(i: int) -> sa.ColumnElement[bool]:
    return sa.and_(d.c.day == sa.bindparam(f"d{i}", type_=d.c.day.type), d.c.purpose == sa.bindparam(f"p{i}"),
                   d.c.domain == sa.bindparam(f"m{i}"), d.c.metric == sa.bindparam(f"x{i}"))


# Portable upsert (no dialect's own ON CONFLICT / ON DUPLICATE KEY, so every statement compiles
# on both, as sql.prepare_all compiles them): one UPDATE adding to the keys of a chunk that
# exist; when it matched fewer rows than keys, which exist, and one INSERT of the rest. Only the
# holder of the watermark lock writes here, so nothing else inserts meanwhile.
_EXISTING = sql.Query(sa.select(d.c.day, d.c.purpose, d.c.domain, d.c.metric)
                      .where(sa.or_(*(_key_match(i) for i in range(CHUNK)))))
_ADD = sql.Query(
    d.update().where(sa.or_(*(_key_match(i) for i in range(CHUNK))))
    .values(count=d.c["count"] + sa.case(*((_key_match(i), sa.bindparam(f"n{i}", type_=sa.BigInteger))
                                        for i in range(CHUNK)), else_=0))
)
_INSERTS: dict[int, sql.Query] = {}


def _insert(rows: int) -> sql.Query:
    if rows not in _INSERTS:
        _INSERTS[rows] = sql.Query(d.insert().values([
            {"day": sa.bindparam(f"d{i}", type_=d.c.day.type), "purpose": sa.bindparam(f"p{i}"),
             "domain": sa.bindparam(f"m{i}"), "metric": sa.bindparam(f"x{i}"),
             "count": sa.bindparam(f"n{i}", type_=sa.BigInteger)} for i in range(rows)]))
    return _INSERTS[rows]


def _params(keys: Sequence[tuple[Key, int]]) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for i in range(CHUNK):
        (day, purpose, domain, metric), n = keys[min(i, len(keys) - 1)]  # a short chunk repeats its last key
        params.update({f"d{i}": day, f"p{i}": purpose, f"m{i}": domain, f"x{i}": metric, f"n{i}": n})
    return params


async def _add(db: Database, counts: Counter[Key]) -> None:
    items = sorted(counts.items())
    for start in range(0, len(items), CHUNK):
        chunk = items[start : start + CHUNK]
        params = _params(chunk)
        # Each key matches one CASE branch (a repeated one adds once); the row count is the rows
        # matched (FOUND_ROWS on MySQL, as on SQLite): all there, or look which are not.
        if await sql.execute(db, _ADD, **params) == len(chunk):
            continue
        found = {(r.day, r.purpose, r.domain, r.metric) for r in await sql.fetch_all(db, _EXISTING, **params)}
        new = [(key, n) for key, n in chunk if key not in found]
        if new:
            values: dict[str, Any] = {}
            for i, ((day, purpose, domain, metric), n) in enumerate(new):
                values.update({f"d{i}": day, f"p{i}": purpose, f"m{i}": domain, f"x{i}": metric, f"n{i}": n})
            await sql.execute(db, _insert(len(new)), **values)


def _micros(moment: datetime) -> int:
    return (moment - EPOCH) // timedelta(microseconds=1)


def _moment(micros: int) -> datetime:
    return EPOCH + timedelta(microseconds=micros)


async def watermark(db: Database) -> datetime | None:
    """Steps whose newest code expired up to this moment are in auth_daily."""
    found = await sql.fetch_val(db, _WM_READ)
    return None if not found else _moment(int(found))


@dataclass(frozen=True)
class RollUp:
    steps: int  # steps folded
    slices: int
    watermark: datetime


async def roll_up(db: Database, *, now: datetime, settled: timedelta = SETTLED) -> RollUp:
    """Fold every step settled by `now` and not folded yet into auth_daily (see the module's
    docstring). Call it before the clean-up deletes settled steps. Safe to run again, and on
    several workers at once: each step is counted once."""
    upto = now - settled
    if await sql.fetch_val(db, _WM_READ) is None:
        with contextlib.suppress(*INTEGRITY_ERRORS):  # another worker made it
            await sql.execute(db, _WM_NEW, day=_WM_DAY, purpose=_WM, domain=_WM, metric="watermark", count=0)
    folded = slices = 0
    while True:
        async with db.transaction():
            if sql.dialect(db) == "sqlite":
                await sql.execute(db, _SQLITE_WRITE_LOCK)
            lo = _moment(int(await sql.fetch_val(db, _WM_LOCK) or 0))
            if lo >= upto:
                return RollUp(folded, slices, lo)
            first = await sql.fetch_val(db, _NEXT_EXPIRY, lo=lo)
            if first is None or first > upto:
                hi = upto  # nothing in between: jump
            else:
                hi = min(upto, first + SLICE)
                steps = await sql.fetch_all(db, _STEPS, lo=lo, hi=hi)
                if steps:
                    await _add(db, fold(steps, await sql.fetch_all(db, _MAILS, lo=lo, hi=hi)))
                folded += len(steps)
            await sql.execute(db, _WM_SET, wm=_micros(hi))
            slices += 1


# --- reading -----------------------------------------------------------------------------------


def _days_in(name: str) -> sa.ColumnElement[bool]:
    # MAX_DAYS placeholders, a shorter range repeating its last day: one prepared statement.
    return d.c.day.in_([sa.bindparam(f"{name}{i}", type_=d.c.day.type) for i in range(MAX_DAYS)])


_one_selection = sa.and_(_days_in("day"), d.c.purpose == sa.bindparam("purpose"), d.c.domain == sa.bindparam("domain"))
_READ_TOTALS = sql.Query(
    sa.select(d.c.metric, sa.func.sum(d.c["count"]).label("n")).where(_one_selection).group_by(d.c.metric)
)
DAILY_METRICS = (Metric.REQUESTED, Metric.MAILED, Metric.DELIVERED, Metric.VERIFIED, Metric.RESENT, Metric.LOCKED)
_READ_DAILY = sql.Query(
    sa.select(d.c.day, d.c.metric, d.c["count"].label("n"))
    .where(_one_selection, sa.or_(*(d.c.metric == x.value for x in DAILY_METRICS)))
)
_SPLIT_METRICS = (Metric.REQUESTED, Metric.DELIVERED, Metric.VERIFIED)
# Point lookups on the primary key: days x purposes (or domains) x metrics.
_READ_PURPOSES = sql.Query(
    sa.select(d.c.purpose, d.c.metric, sa.func.sum(d.c["count"]).label("n"))
    .where(_days_in("day"), sa.or_(*(d.c.purpose == p for p in PURPOSES)), d.c.domain == sa.bindparam("domain"),
           sa.or_(*(d.c.metric == x.value for x in _SPLIT_METRICS)))
    .group_by(d.c.purpose, d.c.metric)
)
# The domains with requests first (days x ~40 lookups), then the rest of their split for those.
_READ_DOMAINS = sql.Query(
    sa.select(d.c.domain, sa.func.sum(d.c["count"]).label("n"))
    .where(_days_in("day"), d.c.purpose == sa.bindparam("purpose"), sa.or_(*(d.c.domain == x for x in DOMAINS)),
           d.c.metric == Metric.REQUESTED.value)
    .group_by(d.c.domain)
)
_READ_DOMAIN_SPLIT = sql.Query(
    sa.select(d.c.domain, d.c.metric, sa.func.sum(d.c["count"]).label("n"))
    .where(_days_in("day"), d.c.purpose == sa.bindparam("purpose"),
           sa.or_(*(d.c.domain == sa.bindparam(f"dm{i}") for i in range(len(DOMAINS)))),
           sa.or_(*(d.c.metric == x.value for x in _SPLIT_METRICS if x is not Metric.REQUESTED)))
    .group_by(d.c.domain, d.c.metric)
)


def _day_params(days: Sequence[date]) -> dict[str, date]:
    return {f"day{i}": days[min(i, len(days) - 1)] for i in range(MAX_DAYS)}


def range_days(now: datetime, days: int) -> list[date]:
    """The `days` UTC days ending today, oldest first."""
    today = now.astimezone(UTC).date()
    return [today - timedelta(days=n) for n in range(max(1, min(days, MAX_DAYS)) - 1, -1, -1)]


@dataclass(frozen=True)
class Quantile:
    """A percentile read from a histogram: at most `bound` seconds, or over the last bound."""

    bound: int | None  # None: over `last`
    last: int

    def __str__(self) -> str:
        if self.bound is None:
            return f"over {_seconds(self.last)}"
        return f"≤ {_seconds(self.bound)}"


def _seconds(n: int) -> str:
    if n < 120:
        return f"{n} s"
    if n < 7200:
        return f"{n // 60} min"
    return f"{n // 3600} h"


def quantile(counts: Sequence[int], bounds: Sequence[int], q: float) -> Quantile | None:
    """The bucket holding the q-th value (q in 0..1) of a histogram (one count per bound, then
    the count over the last bound): the smallest bound with at least ceil(q x n) values at or
    under it. None when it is empty."""
    total = sum(counts)
    if total == 0:
        return None
    rank = max(1, math.ceil(q * total))
    running = 0
    for n, bound in zip(counts, bounds, strict=False):
        running += n
        if running >= rank:
            return Quantile(bound, bounds[-1])
    return Quantile(None, bounds[-1])


def ratio(part: int, whole: int) -> float | None:
    return None if whole == 0 else part / whole


@dataclass(frozen=True)
class Funnel:
    days: list[date]
    purpose: str | None
    domain: str | None
    totals: Counter[str]
    by_day: dict[date, Counter[str]]
    by_purpose: dict[str, Counter[str]]
    by_domain: dict[str, Counter[str]]
    rolled_up_to: datetime | None
    live_steps: int = 0  # steps not settled yet, folded for this page
    domains: list[str] = field(default_factory=list)  # with requests in the range, most first

    def count(self, metric: str) -> int:
        return self.totals[metric]

    def histogram(self, metrics: Sequence[str]) -> list[int]:
        return [self.totals[x] for x in metrics]

    @property
    def ttv_p50(self) -> Quantile | None:
        return quantile(self.histogram(TTV_METRICS), TTV_BOUNDS, 0.5)

    @property
    def ttv_p90(self) -> Quantile | None:
        return quantile(self.histogram(TTV_METRICS), TTV_BOUNDS, 0.9)

    @property
    def delivery_p50(self) -> Quantile | None:
        return quantile(self.histogram(DLV_METRICS), DLV_BOUNDS, 0.5)

    @property
    def delivery_p90(self) -> Quantile | None:
        return quantile(self.histogram(DLV_METRICS), DLV_BOUNDS, 0.9)

    @property
    def resend_rate(self) -> float | None:
        """Share of steps that asked for another code."""
        return ratio(self.totals[Metric.RESENT], self.totals[Metric.REQUESTED])

    @property
    def conversion(self) -> float | None:
        """Verified over requested."""
        return ratio(self.totals[Metric.VERIFIED], self.totals[Metric.REQUESTED])


async def funnel(db: Database, *, now: datetime, days: int, purpose: str | None = None,
                 domain: str | None = None) -> Funnel:
    """The funnel over the `days` UTC days ending today, for one purpose and one domain (None:
    all): auth_daily, plus the steps not settled yet."""
    span = range_days(now, days)
    p, dm = purpose or ALL, domain or ALL
    totals: Counter[str] = Counter()
    by_day: dict[date, Counter[str]] = {day: Counter() for day in span}
    by_purpose: dict[str, Counter[str]] = defaultdict(Counter)
    by_domain: dict[str, Counter[str]] = defaultdict(Counter)
    dp = _day_params(span)
    for r in await sql.fetch_all(db, _READ_TOTALS, purpose=p, domain=dm, **dp):
        totals[r.metric] += int(r.n)
    for r in await sql.fetch_all(db, _READ_DAILY, purpose=p, domain=dm, **dp):
        by_day[r.day][r.metric] += int(r.n)
    for r in await sql.fetch_all(db, _READ_PURPOSES, domain=dm, **dp):
        by_purpose[r.purpose][r.metric] += int(r.n)
    for r in await sql.fetch_all(db, _READ_DOMAINS, purpose=p, **dp):
        by_domain[r.domain][Metric.REQUESTED] += int(r.n)
    if by_domain:
        named = sorted(by_domain)
        names = {f"dm{i}": named[min(i, len(named) - 1)] for i in range(len(DOMAINS))}
        for r in await sql.fetch_all(db, _READ_DOMAIN_SPLIT, purpose=p, **names, **dp):
            by_domain[r.domain][r.metric] += int(r.n)
    rolled = await watermark(db)
    # Not settled yet: folded on the fly (at most LIVE_SPAN back, should roll-ups have stopped).
    lo = max(rolled or EPOCH, now - LIVE_SPAN)
    steps = await sql.fetch_all(db, _STEPS, lo=lo, hi=now + timedelta(days=30))
    if steps:
        first, last = span[0], span[-1]
        live = fold(steps, await sql.fetch_all(db, _MAILS, lo=lo, hi=now + timedelta(days=30)))
        for (day, kp, kd, metric), n in live.items():
            if not first <= day <= last:
                continue
            if kp == p and kd == dm:
                totals[metric] += n
                if metric in DAILY_METRICS:
                    by_day[day][metric] += n
            if kd == dm and kp != ALL and metric in _SPLIT_METRICS:
                by_purpose[kp][metric] += n
            if kp == p and kd != ALL and metric in _SPLIT_METRICS:
                by_domain[kd][metric] += n
    domains = sorted((x for x, c in by_domain.items() if c[Metric.REQUESTED]),
                     key=lambda x: (-by_domain[x][Metric.REQUESTED], x))
    return Funnel(span, purpose, domain, totals, by_day, dict(by_purpose), dict(by_domain), rolled,
                  live_steps=len(steps), domains=domains)


# --- abuse: who fails most, and what the mail server said --------------------------------------

SAMPLE = 5_000  # newest events of each kind looked at for the abuse view
TOP = 20
PER_KIND = 200  # groups read per kind before the kinds are merged


def _sample(*columns: sa.ColumnElement[Any]) -> sa.Subquery:
    """The newest `limit` events of one kind in the range: the (event, created_at) index, read
    backwards from now, so bounded whatever the range holds."""
    return (sa.select(*columns)
            .where(e.c.event == sa.bindparam("event"), e.c.created_at >= sa.bindparam("since"),
                   e.c.created_at <= sa.bindparam("now"))
            .order_by(e.c.created_at.desc())
            .limit(sa.bindparam("limit", type_=sa.Integer))
            .subquery("s"))


_s = _sample(e.c.created_at)
_SAMPLED = sql.Query(sa.select(sa.func.count()).select_from(_s))  # from the index alone
_s = _sample(e.c.customer_id, e.c.created_at)
_n = sa.func.count().label("n")
_BY_CUSTOMER = sql.Query(
    sa.select(_s.c.customer_id, _n, sa.func.max(_s.c.created_at).label("last_at"))
    .where(_s.c.customer_id.is_not(None)).group_by(_s.c.customer_id)
    .order_by(sa.desc("n"), _s.c.customer_id).limit(PER_KIND)
)
_s = _sample(e.c.ip, e.c.customer_id, e.c.created_at)
_BY_IP = sql.Query(
    sa.select(_s.c.ip, _n, sa.func.count(sa.distinct(_s.c.customer_id)).label("accounts"),
              sa.func.max(_s.c.created_at).label("last_at"))
    .where(_s.c.ip != "").group_by(_s.c.ip)
    .order_by(sa.desc("n"), _s.c.ip).limit(PER_KIND)
)
_EMAILS = sql.Query(sa.select(customers.c.id, customers.c.email)
                    .where(sa.or_(*(customers.c.id == sa.bindparam(f"id{i}", type_=sa.Integer) for i in range(TOP)))))
ABUSE_EVENTS = (Event.CODE_FAILED, Event.PASSWORD_FAILED, Event.LOCKED)


@dataclass
class Offender:
    """A customer or an IP address, with what it failed in the sample."""

    key: str  # the customer's email (or "#id" when deleted), or the IP address
    customer_id: int | None = None
    code_failures: int = 0
    password_failures: int = 0
    lockouts: int = 0
    last_at: datetime | None = None
    accounts: int = 0  # an address: the accounts its wrong passwords were for

    @property
    def failures(self) -> int:
        return self.code_failures + self.password_failures

    def add(self, event: Event, n: int, last_at: datetime) -> None:
        if event is Event.CODE_FAILED:
            self.code_failures += n
        elif event is Event.PASSWORD_FAILED:
            self.password_failures += n
        else:
            self.lockouts += n
        self.last_at = max(self.last_at, last_at) if self.last_at else last_at


@dataclass(frozen=True)
class Abuse:
    days: int
    customers: list[Offender]
    addresses: list[Offender]
    sampled: dict[str, int]  # events looked at per kind
    full: bool  # some kind had more than the sample: its counts are of its newest SAMPLE events


def _rank(found: Iterable[Offender]) -> list[Offender]:
    return sorted(found, key=lambda x: (-(x.failures + x.lockouts), -x.lockouts, x.key))[:TOP]


async def abuse(db: Database, *, now: datetime, days: int, sample: int = SAMPLE) -> Abuse:
    """The customers and IP addresses with the most wrong codes, wrong passwords and lockouts
    over the last `days` days, among the newest `sample` events of each kind (counted by the
    database: a few hundred rows come back, however many the range holds)."""
    window = {"since": now - timedelta(days=days), "now": now, "limit": sample}
    by_customer: dict[int, Offender] = {}
    by_ip: dict[str, Offender] = {}
    sampled: dict[str, int] = {}
    for event in ABUSE_EVENTS:
        sampled[event.value] = int(await sql.fetch_val(db, _SAMPLED, event=event.value, **window) or 0)
        if not sampled[event.value]:
            continue
        for r in await sql.fetch_all(db, _BY_CUSTOMER, event=event.value, **window):
            cid = int(r.customer_id)
            by_customer.setdefault(cid, Offender(f"#{cid}", cid)).add(event, int(r.n), r.last_at)
        for r in await sql.fetch_all(db, _BY_IP, event=event.value, **window):
            who = by_ip.setdefault(r.ip, Offender(r.ip))
            who.add(event, int(r.n), r.last_at)
            if event is Event.PASSWORD_FAILED:
                who.accounts = int(r.accounts)
    top = _rank(by_customer.values())
    if top:
        ids = [x.customer_id for x in top]
        params = {f"id{i}": ids[min(i, len(ids) - 1)] for i in range(TOP)}
        emails = {int(r.id): r.email for r in await sql.fetch_all(db, _EMAILS, **params)}
        for x in top:
            x.key = emails.get(x.customer_id or 0, x.key)
    return Abuse(days, top, _rank(by_ip.values()), sampled, any(n >= sample for n in sampled.values()))


FAILED_SAMPLE = 2_000
_f = (sa.select(m.c.recipient, m.c.last_error, m.c.next_attempt_at)
      # The (status, next_attempt_at) index; a failed row's next_attempt_at is its last try's time.
      .where(m.c.status == sa.bindparam("status"), m.c.next_attempt_at >= sa.bindparam("since"),
             m.c.next_attempt_at <= sa.bindparam("now"), m.c.last_error.is_not(None))
      .order_by(m.c.next_attempt_at.desc())
      .limit(sa.bindparam("limit", type_=sa.Integer))
      .subquery("f"))
# What follows the last "@" (the same on both backends: a wiped notice keeps "@domain" only).
_domain = sa.func.lower(sa.func.substr(_f.c.recipient, sa.func.instr(_f.c.recipient, "@") + 1))
_REPLIES = sql.Query(
    sa.select(_f.c.last_error, _domain.label("domain"), sa.func.count().label("n"),
              sa.func.max(_f.c.next_attempt_at).label("last_at"))
    .group_by(_f.c.last_error, _domain)
)
_RECENT_FAILED = sql.Query(
    sa.select(m.c.id, m.c.kind, m.c.recipient, m.c.tries, m.c.last_error, m.c.created_at)
    .where(m.c.status == MailStatus.FAILED.value, m.c.next_attempt_at >= sa.bindparam("since"),
           m.c.next_attempt_at <= sa.bindparam("now"))
    .order_by(m.c.next_attempt_at.desc())
    .limit(10)
)


@dataclass
class Reply:
    """One SMTP reply (or other reason) behind failed or retried mail."""

    text: str
    failed: int = 0  # mails given up with it
    retrying: int = 0  # mails waiting to be tried again after it
    domains: Counter[str] = field(default_factory=Counter)
    last_at: datetime | None = None


@dataclass(frozen=True)
class MailFailures:
    replies: list[Reply]
    recent: list[Any]  # the newest failed rows
    full: bool


def _reply_text(error: str) -> str:
    return " ".join(error.split())[:160]


async def mail_failures(db: Database, *, now: datetime, days: int, sample: int = FAILED_SAMPLE) -> MailFailures:
    """The SMTP replies behind mail given up (failed) and mail waiting for a retry, most first,
    among the newest `sample` of each over the last `days` days (grouped by the database)."""
    since = now - timedelta(days=days)
    replies: dict[str, Reply] = {}
    full = False
    for status in (MailStatus.FAILED, MailStatus.QUEUED):
        rows = await sql.fetch_all(db, _REPLIES, status=status.value, since=since, now=now + timedelta(days=1),
                                   limit=sample)
        full = full or sum(int(r.n) for r in rows) >= sample
        for r in rows:
            text = _reply_text(r.last_error)
            reply = replies.setdefault(text, Reply(text))
            if status is MailStatus.FAILED:
                reply.failed += int(r.n)
            else:
                reply.retrying += int(r.n)
            reply.domains[domain_of("@" + (r.domain or ""))] += int(r.n)
            reply.last_at = max(reply.last_at, r.last_at) if reply.last_at else r.last_at
    ranked = sorted(replies.values(), key=lambda x: (-(x.failed + x.retrying), x.text))[:TOP]
    recent = await sql.fetch_all(db, _RECENT_FAILED, since=since, now=now)
    return MailFailures(ranked, recent, full)

"""The console's funnel and abuse pages (issue 18), for every staff role. Thin: the numbers come
from app.staff.analytics, the charts and their tables from app.staff.charts."""

from __future__ import annotations

from dataclasses import dataclass

import anyio.to_thread
from markupsafe import Markup
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from app.staff import Role, Staff, analytics, charts
from app.staff.web import redirect as web_redirect
from app.staff.web import render_admin, staff_page
from app.web.request import services


@dataclass(frozen=True)
class Range:
    key: str
    label: str
    days: int  # UTC days of the funnel (daily counts), today included
    raw_days: int  # days back for what is read raw (abuse, mail failures)

    @property
    def raw_label(self) -> str:
        return "24 hours" if self.raw_days == 1 else f"{self.raw_days} days"


RANGES = {r.key: r for r in (
    Range("24h", "24 hours (the funnel: today and yesterday, UTC)", 2, 1),
    Range("7d", "7 days", 7, 7),
    Range("30d", "30 days", 30, 30),
    Range("90d", "90 days", 90, 90),
)}
DEFAULT_RANGE = "7d"


@dataclass(frozen=True)
class Choice:
    range: Range
    purpose: str | None
    domain: str | None

    @property
    def query(self) -> str:
        """The choice as a query string (the values are from closed sets: nothing to escape)."""
        return f"range={self.range.key}&purpose={self.purpose or ''}&domain={self.domain or ''}"


def _choice(request: Request) -> Choice:
    """The page's filters; anything not offered is read as "all" (or the default range)."""
    p = request.query_params
    purpose, domain = p.get("purpose", ""), p.get("domain", "")
    return Choice(RANGES.get(p.get("range", ""), RANGES[DEFAULT_RANGE]),
                  purpose if purpose in analytics.PURPOSES else None,
                  domain if domain in analytics.DOMAINS else None)


async def _charts(request: Request, choice: Choice) -> tuple[analytics.Funnel, list[charts.Chart]]:
    svc = services(request)
    found = await analytics.funnel(svc.db, now=svc.clock.now(), days=choice.range.days, purpose=choice.purpose,
                                   domain=choice.domain)
    return found, charts.funnel_charts(found)


@staff_page(Role.VIEWER)
async def funnel_page(request: Request, staff: Staff) -> Response:
    choice = _choice(request)
    found, drawn = await _charts(request, choice)
    # pygal is CPU work (tens of ms for a page): off the event loop that serves sign-ins.
    svgs = await anyio.to_thread.run_sync(lambda: [Markup(c.svg) for c in drawn])  # our own cleaned SVG
    svc = services(request)
    failures = await analytics.mail_failures(svc.db, now=svc.clock.now(), days=choice.range.raw_days)
    return render_admin(request, "admin/funnel.html", {
        "f": found, "charts": list(zip(drawn, svgs, strict=True)), "choice": choice, "ranges": list(RANGES.values()),
        "purposes": [(p, charts.PURPOSE_LABELS[p]) for p in analytics.PURPOSES],
        "domains": sorted(set(found.domains) | ({choice.domain} if choice.domain else set())),
        "failures": failures, "percent": charts.percent, "Metric": analytics.Metric,
    })


@staff_page(Role.VIEWER)
async def funnel_csv(request: Request, staff: Staff) -> Response:
    choice = _choice(request)
    name = request.query_params.get("chart", "")
    _, drawn = await _charts(request, choice)
    chart = next((c for c in drawn if c.name == name), None)
    if chart is None:  # no such chart: the funnel page, which has a link for each one
        return web_redirect(request, f"/admin/funnel?{choice.query}")
    filename = f"funnel-{chart.name}-{choice.range.key}-{choice.purpose or 'all'}-{choice.domain or 'all'}.csv"
    return Response(chart.csv, media_type="text/csv; charset=utf-8",
                    headers={"Content-Disposition": f'attachment; filename="{filename}"', "Cache-Control": "no-store"})


@staff_page(Role.VIEWER)
async def chart_css(request: Request, staff: Staff) -> Response:
    return Response(charts.stylesheet(), media_type="text/css; charset=utf-8",
                    headers={"Cache-Control": "private, max-age=3600"})


@staff_page(Role.VIEWER)
async def abuse_page(request: Request, staff: Staff) -> Response:
    choice = _choice(request)
    svc = services(request)
    found = await analytics.abuse(svc.db, now=svc.clock.now(), days=choice.range.raw_days)
    return render_admin(request, "admin/abuse.html", {"a": found, "choice": choice, "ranges": list(RANGES.values()),
                                                      "sample": analytics.SAMPLE})


routes = [
    Route("/admin/funnel", funnel_page, methods=["GET"], name="admin:funnel"),
    Route("/admin/funnel.csv", funnel_csv, methods=["GET"], name="admin:funnel_csv"),
    Route("/admin/funnel/charts.css", chart_css, methods=["GET"], name="admin:funnel_css"),
    Route("/admin/abuse", abuse_page, methods=["GET"], name="admin:abuse"),
]

"""The funnel's charts: each a table of numbers (shown beside its chart, and its CSV) and an
inline SVG drawn from the same rows by pygal on the server, so nothing needs JavaScript.

Our CSP (app/security/headers.py) is script-src 'self' and style-src 'self': no inline script,
no <style> element, no style attribute. pygal writes all three into every SVG (its config as a
<script> whatever `js` says, its CSS as a <style>, `style="opacity: 0"` on the tooltip), and an
SVG inlined in the page is held to the page's CSP. So each SVG is cleaned before it is used:
<script>, <style>, comments, the tooltip layer (JavaScript only) and every style and id
attribute (ids would repeat across the charts of one page) are removed, and the CSS pygal would
have inlined is served once from this site (`stylesheet()`, /admin/funnel/charts.css), made by
pygal itself with the same Style, so it follows the installed pygal. Values are printed on
the bars, and every chart is followed by its table, the accessible form of its numbers.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import pygal
from pygal.style import Style

from app.staff.analytics import (
    DLV_BOUNDS,
    DLV_METRICS,
    PURPOSES,
    REASONS,
    STEPS,
    TTV_BOUNDS,
    TTV_METRICS,
    Funnel,
    Metric,
    Quantile,
    ratio,
)

Cell = str | int

STYLE = Style(
    background="transparent",
    plot_background="#ffffff",
    foreground="#1f2328",
    foreground_strong="#1f2328",
    foreground_subtle="#57606a",
    font_family="system-ui, -apple-system, 'Segoe UI', Roboto, sans-serif",
    label_font_size=12,
    major_label_font_size=12,
    value_font_size=12,
    legend_font_size=13,
    title_font_size=15,
    opacity="0.9",
    opacity_hover="1",
    transition="0ms",
    # Distinguishable for the common colour-vision deficiencies (Okabe-Ito), darkest first.
    colors=("#0072B2", "#009E73", "#D55E00", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#F0E442"),
)
PURPOSE_LABELS = {"registration": "New account", "login": "Sign-in", "reset": "Password reset",
                  "email": "Address change", "delete": "Account deletion"}
STEP_LABELS = {Metric.REQUESTED: "Requested", Metric.MAILED: "Mailed", Metric.DELIVERED: "Delivered",
               Metric.VERIFIED: "Verified"}
REASON_LABELS = {Metric.UNDELIVERED: "Not delivered", Metric.LOCKED: "Locked out",
                 Metric.FAILED_WRONG: "Wrong code, then gave up", Metric.FAILED_EXPIRED: "Code never entered"}


@dataclass(frozen=True)
class Chart:
    """One chart: its rows are the table, the CSV and what is plotted (the `series` columns)."""

    name: str
    title: str
    columns: tuple[str, ...]
    rows: tuple[tuple[Cell, ...], ...]
    series: tuple[str, ...]
    kind: str = "bar"  # bar | hbar | line
    note: str = ""

    @property
    def svg(self) -> str:
        return render_svg(self)

    @property
    def csv(self) -> str:
        return to_csv(self)


def _n(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


def percent(value: float | None) -> str:
    return "–" if value is None else f"{value * 100:.1f}%"


def _within(bounds: Sequence[int]) -> list[str]:
    return [str(Quantile(b, bounds[-1])) for b in bounds] + [str(Quantile(None, bounds[-1]))]


def _histogram(name: str, title: str, unit: str, f: Funnel, metrics: Sequence[str], bounds: Sequence[int],
               p50: Quantile | None, p90: Quantile | None) -> Chart:
    counts = f.histogram(metrics)
    total, running = sum(counts), 0
    rows = []
    for label, n in zip(_within(bounds), counts, strict=True):
        running += n
        rows.append((label, n, percent(ratio(running, total))))
    note = f"p50 {p50 or '–'}, p90 {p90 or '–'} (read from these buckets: the bucket each falls in)"
    return Chart(name, title, ("Within", unit, "Cumulative share"), tuple(rows), (unit,), "bar", note)


def funnel_charts(f: Funnel) -> list[Chart]:
    """The charts of the funnel page, in page order."""
    t = f.totals
    requested = t[Metric.REQUESTED]
    steps, previous = [], None
    for metric in STEPS:
        n = t[metric]
        steps.append((STEP_LABELS[metric], n, percent(ratio(n, previous)) if previous is not None else "–",
                      percent(ratio(n, requested))))
        previous = n
    day_rows = tuple(
        (day.isoformat(), c[Metric.REQUESTED], c[Metric.MAILED], c[Metric.DELIVERED], c[Metric.VERIFIED],
         c[Metric.RESENT], c[Metric.LOCKED], percent(ratio(c[Metric.VERIFIED], c[Metric.REQUESTED])))
        for day, c in sorted(f.by_day.items()))
    purposes = tuple(
        (PURPOSE_LABELS.get(p, p), c[Metric.REQUESTED], c[Metric.DELIVERED], c[Metric.VERIFIED],
         percent(ratio(c[Metric.VERIFIED], c[Metric.REQUESTED])))
        for p in PURPOSES if (c := f.by_purpose.get(p)) is not None and c[Metric.REQUESTED])
    domains = tuple(
        (dm, c[Metric.REQUESTED], c[Metric.DELIVERED], c[Metric.VERIFIED],
         percent(ratio(c[Metric.DELIVERED], c[Metric.REQUESTED])), percent(ratio(c[Metric.VERIFIED], c[Metric.REQUESTED])))
        for dm in f.domains if (c := f.by_domain[dm]))
    reasons = tuple((REASON_LABELS[x], t[x], percent(ratio(t[x], requested))) for x in REASONS)
    return [
        Chart("steps", "Requested, mailed, delivered, verified",
              ("Step", "Steps", "Of the previous step", "Of requested"), tuple(steps), ("Steps",), "bar",
              f"Resend rate {percent(f.resend_rate)} ({_n(t[Metric.RESENT], 'step')} asked for another code, "
              f"{_n(t[Metric.RESENDS], 'extra code')} in all)."),
        Chart("daily", "By day", ("Day", "Requested", "Mailed", "Delivered", "Verified", "Resent", "Locked out",
                                  "Verified of requested"),
              day_rows, ("Requested", "Delivered", "Verified"), "line" if len(day_rows) > 14 else "bar"),
        Chart("purposes", "By purpose", ("Purpose", "Requested", "Delivered", "Verified", "Verified of requested"),
              purposes, ("Requested", "Verified"), "bar"),
        Chart("domains", "By mail domain",
              ("Domain", "Requested", "Delivered", "Verified", "Delivered of requested", "Verified of requested"),
              domains, ("Requested", "Delivered", "Verified"), "hbar",
              "Domains of the big mail providers by name; every other domain counts as “other”."),
        Chart("failures", "Why steps were not verified", ("Reason", "Steps", "Of requested"), reasons, ("Steps",),
              "hbar", f"{_n(t[Metric.WRONG_ENTRIES], 'wrong code')} typed in all."),
        _histogram("time_to_verify", "Time from request to verification", "Steps", f, TTV_METRICS, TTV_BOUNDS,
                   f.ttv_p50, f.ttv_p90),
        _histogram("delivery", "Mail delivery latency (queued to accepted by the mail server)", "Mails", f,
                   DLV_METRICS, DLV_BOUNDS, f.delivery_p50, f.delivery_p90),
    ]


# --- CSV -----------------------------------------------------------------------------------------


def _safe(cell: Cell) -> Cell:
    """A text cell a spreadsheet would read as a formula is quoted with an apostrophe."""
    if isinstance(cell, str) and cell[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + cell
    return cell


def to_csv(chart: Chart) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(chart.columns)
    writer.writerows([_safe(c) for c in row] for row in chart.rows)
    return out.getvalue()


# --- SVG -----------------------------------------------------------------------------------------

_OPTIONS: dict[str, Any] = {
    "style": STYLE, "disable_xml_declaration": True, "js": [], "no_prefix": True, "width": 760, "height": 320,
    "legend_at_bottom": True, "legend_box_size": 12, "margin": 12, "truncate_legend": -1, "truncate_label": -1,
    "include_x_axis": True, "min_scale": 2, "max_scale": 6,
}


def _clean(root: Any) -> Any:
    """pygal's SVG tree without what our CSP refuses or only JavaScript uses."""
    for parent in list(root.iter()):
        for child in list(parent):
            tag = child.tag if isinstance(child.tag, str) else ""
            if not tag or tag.rsplit("}", 1)[-1] in ("script", "style") or \
                    "tooltip-overlay" in (child.get("class") or ""):
                parent.remove(child)
    for el in root.iter():
        for attr in ("style", "id"):
            el.attrib.pop(attr, None)
    for defs in [x for x in root if isinstance(x.tag, str) and x.tag.endswith("defs") and len(x) == 0]:
        root.remove(defs)
    for attr in ("width", "height"):  # sized by the stylesheet, to its column (the viewBox stays)
        root.attrib.pop(attr, None)
    return root


@lru_cache(maxsize=256)
def render_svg(chart: Chart) -> str:
    """The chart as an inline <svg>, named for assistive technology (its table has the numbers)."""
    numeric = [chart.columns.index(s) for s in chart.series]
    labels = [str(row[0]) for row in chart.rows]
    options = dict(_OPTIONS, show_legend=len(numeric) > 1)
    if chart.kind == "line":
        graph: Any = pygal.Line(**options, show_dots=len(labels) <= 31, x_label_rotation=30,
                                show_minor_x_labels=False, fill=False)
        graph.x_labels = labels
        graph.x_labels_major = labels[:: max(1, len(labels) // 12)]
    else:
        cls = pygal.HorizontalBar if chart.kind == "hbar" else pygal.Bar
        graph = cls(**options, print_values=True, print_zeroes=False,
                    x_label_rotation=30 if len(labels) > 6 and chart.kind == "bar" else 0)
        graph.x_labels = labels[::-1] if chart.kind == "hbar" else labels
    rows = chart.rows[::-1] if chart.kind == "hbar" else chart.rows  # pygal draws the first row at the bottom
    for index in numeric:
        graph.add(chart.columns[index], [int(row[index]) for row in rows])
    graph.add_xml_filter(_clean)
    svg: str = graph.render(is_unicode=True)
    label = f"{chart.title}: chart (the numbers are in the table below it)"
    return svg.replace("<svg ", f'<svg role="img" aria-label="{_attr(label)}" focusable="false" ', 1)


def _attr(text: str) -> str:
    return text.replace("&", "&amp;").replace('"', "&quot;").replace("<", "&lt;").replace(">", "&gt;")


_PREFIX = re.compile(r"#chart-[0-9a-f-]+ ?")


@lru_cache(maxsize=1)
def stylesheet() -> str:
    """The CSS pygal inlines in its SVGs (with our Style, for eight series), scoped to
    .pygal-chart, plus the sizing the cleaned SVGs need."""
    probe = pygal.Bar(style=STYLE, disable_xml_declaration=True, js=[])
    for i in range(len(STYLE.colors)):
        probe.add(f"s{i}", [1])
    svg = probe.render(is_unicode=True)
    css = re.search(r"<style[^>]*>(.*?)</style>", svg, re.S)
    text = (css.group(1) if css else "").replace("&gt;", ">").replace("&lt;", "<").replace("&amp;", "&")
    text = _PREFIX.sub(".pygal-chart ", text)
    return text + PAGE_CSS


# The funnel page's own layout (admin.css is shared; this sheet is loaded by the funnel page only).
PAGE_CSS = """
.pygal-chart{display:block;width:100%;max-width:760px;height:auto}
.funnel .chart{margin:2rem 0}
.funnel .chart-body{display:grid;gap:1rem;grid-template-columns:minmax(0,1fr);align-items:start}
.funnel .chart-body.side{grid-template-columns:minmax(0,1fr) auto}
.funnel figure{margin:0}
.funnel .chart-table{overflow-x:auto}
.funnel .scroll{max-height:24rem;overflow:auto;border:1px solid #e5e7eb}
.funnel .scroll table.grid{margin:0}
.funnel table.numbers th,.funnel table.numbers td{overflow-wrap:normal;white-space:nowrap}
.funnel table.numbers td{text-align:right;font-variant-numeric:tabular-nums}
.funnel table.numbers thead th{position:sticky;top:0}
.funnel dl.summary{display:grid;grid-template-columns:repeat(auto-fit,minmax(12rem,1fr));gap:.75rem;margin:1rem 0}
.funnel dl.summary div{border:1px solid #d1d5db;border-radius:6px;padding:.5rem .75rem}
.funnel dl.summary dt{font-size:.875rem;color:#4b5563}
.funnel dl.summary dd{margin:0;font-size:1.25rem;font-weight:600}
@media (max-width:60rem){.funnel .chart-body.side{grid-template-columns:minmax(0,1fr)}}
"""

"""Words for a moment and a browser, as a mail (or a page) tells a customer who did what."""

from __future__ import annotations

from datetime import UTC, datetime


def when(moment: datetime) -> str:
    """"on Saturday 28 November 2026 at 10:42 UTC (UTC+00:00)": readable in any time zone, with
    the offset spelled out so a mail client's reader can place it."""
    m = moment.astimezone(UTC)
    return f"on {m:%A} {m.day} {m:%B %Y} at {m:%H:%M} UTC (UTC+00:00)"


def browser(user_agent: str) -> str:
    """A short, human name for a user agent: "Chrome on Android"."""
    ua = user_agent or ""
    for needle, name in (("Edg/", "Edge"), ("OPR/", "Opera"), ("Firefox/", "Firefox"), ("Chrome/", "Chrome"),
                         ("Safari/", "Safari"), ("python-httpx", "script"), ("testclient", "test client")):
        if needle in ua:
            device = "Android" if "Android" in ua else "iPhone" if "iPhone" in ua else "Mac" if "Mac OS" in ua \
                else "Windows" if "Windows" in ua else "Linux" if "Linux" in ua else ""
            return f"{name} on {device}" if device else name
    return "an unknown browser"

"""Words for a moment and a browser, as a mail (or a page) tells a customer who did what."""

from __future__ import annotations

from datetime import UTC, datetime
from functools import lru_cache

from ua_parser import parse


def when(moment: datetime) -> str:
    """"on Saturday 28 November 2026 at 10:42 UTC (UTC+00:00)": readable in any time zone, with
    the offset spelled out so a mail client's reader can place it."""
    m = moment.astimezone(UTC)
    return f"on {m:%A} {m.day} {m:%B %Y} at {m:%H:%M} UTC (UTC+00:00)"


@lru_cache(maxsize=2048)
def browser(user_agent: str) -> str:
    """A short, human name for a user agent, from ua-parser: "Chrome 130 on Android 14"."""
    if not user_agent:
        return "an unknown browser"
    parsed = parse(user_agent[:512])
    agent, system = parsed.user_agent, parsed.os
    if agent is None or agent.family == "Other":
        return "an unknown browser"
    name = agent.family + (f" {agent.major}" if agent.major else "")
    if system is not None and system.family != "Other":
        name += f" on {system.family}" + (f" {system.major}" if system.major else "")
    return name

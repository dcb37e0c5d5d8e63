"""Times as the surfaces show them: epoch seconds are for machines, people read ISO 8601."""
from __future__ import annotations

import datetime


def local(ts: float | None) -> str:
    """ISO 8601 in this host's local time with its offset, to the second; "-" for none."""
    if not ts:
        return "-"
    return datetime.datetime.fromtimestamp(ts).astimezone().isoformat(timespec="seconds")


def iso(ts: float | None) -> str | None:
    """An epoch time as ISO 8601 in UTC (``2026-11-25T02:30:00.123Z``); None stays None."""
    if ts is None:
        return None
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")

"""Steps of a loop, each on its own interval of one clock.

The manager's loop (``oos_service_manager.py``) and its housekeeping are each one list of
jobs: what runs, and how often, read in one place. A job that raises is handed to the loop's
``failed`` and runs again at its next turn; it never stops the loop.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass


@dataclass
class Job:
    name: str
    every: float  # seconds between runs on the loop's clock; 0: every turn
    run: Callable[[], None]
    next_at: float = 0.0  # when it is due next, on the loop's clock (0: at the first turn)


def run_due(jobs: Iterable[Job], now: float, failed: Callable[[Job, Exception], None]) -> None:
    """Run, in order, each job due at ``now``; its next turn is ``every`` seconds from now."""
    for job in jobs:
        if now < job.next_at:
            continue
        job.next_at = now + job.every
        try:
            job.run()
        except Exception as e:
            failed(job, e)

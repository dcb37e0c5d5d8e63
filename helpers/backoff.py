"""How long a failed task waits before its next attempt."""
from __future__ import annotations

import random

# Seconds before attempt 2, 3, 4, ...; the last value is the cap for every later retry.
SCHEDULE = (1, 2, 4, 8, 16, 32, 60, 120, 300)


def delays(rng: random.Random, jitter: float = 0.2) -> list[float]:
    """The schedule with jitter: each step shortened by up to ``jitter`` (a fraction), so
    tasks that failed together do not all come back in the same instant, and no delay ever
    exceeds its step or the 300 s cap."""
    if not 0 <= jitter < 1:
        raise ValueError(f"jitter: expected a fraction in [0, 1), got {jitter!r}")
    return [step * (1 - jitter * rng.random()) for step in SCHEDULE]


"""Input rules, each defined once, and the error that names the field a caller got wrong.

The queue, the assistant, the HTTP schemas and the CLI all check input against the constants
here, so a limit changes in one place.
"""
from __future__ import annotations

import json
import math
import re

MAX_ID = 2**63 - 1  # SQLite's largest rowid: any id above it cannot exist
NAME_MAX = 200      # task names, idempotency keys, user ids
QUEUE_NAME_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,100}$")
QUEUE_NAME_RULE = "1-100 characters of letters, digits, '_', '.', ':' or '-'"
MEMORY_TYPES = ("fact", "preference", "episode", "instruction")
STATED_MEMORY_TYPES = ("fact", "preference", "instruction")  # what a user says of themselves; episodes are the assistant's
MEMORY_CONTENT_MAX = 8000
MIN_TIMEOUT = 0.001  # seconds: below this a task's timeout is a typo, not a limit
# The rest of a task's numbers, both ends allowed (the queue checks them; the HTTP schemas say them).
PRIORITY_RANGE = (-1_000_000, 1_000_000)
MAX_ATTEMPTS_RANGE = (1, 1000)
DELAY_MAX = 10 * 365 * 86_400      # seconds
TIMEOUT_MAX = 7 * 86_400           # seconds
UNIQUE_FOR_MAX = 365 * 86_400      # seconds
CONCURRENCY_RANGE = (1, 100_000)   # a queue's running tasks at once
ASSISTANT_QUEUE = "assistant"  # the queue of every task the assistant makes
MAX_BATCH = 1000   # tasks in one enqueue, steps in one workflow
MAX_PAGE = 1000    # items in one page of a listing (API and CLI)
PROVIDERS = ("openai", "openrouter", "azure", "compatible", "anthropic", "local")


class InvalidField(ValueError):
    """Bad input. ``field`` names what was wrong (``"payload"``, ``"tasks[2].timeout"``); the
    message reads ``"<field>: <problem>"``. The API answers 400 with the field, the CLI one line."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field}: {problem}")
        self.field, self.problem = field, problem


def shown(value, limit: int = 60) -> str:
    """``value`` as an error message quotes it: its repr, cut to ``limit`` characters (a
    megabyte of bad input is not echoed back)."""
    try:
        text = repr(value)
    except ValueError:  # an int of over 4300 digits (or a list holding one) has no repr
        return f"an integer of {value.bit_length()} bits" if isinstance(value, int) else "a value too long to show"
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


UNSTORABLE = "contains a NUL character or a lone surrogate, which cannot be stored"


def storable_text(value: str) -> bool:
    """Whether both engines can store ``value``: no NUL (PostgreSQL's text refuses it) and no
    lone surrogate (JSON's ``"\\ud800"`` can carry one; it has no UTF-8)."""
    if "\x00" in value:
        return False
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return True


def stored_text(field: str, value: str) -> str:
    """``value`` if both engines can store it, else InvalidField(field, UNSTORABLE)."""
    if not storable_text(value):
        raise InvalidField(field, UNSTORABLE)
    return value


def storable(text: str) -> str:
    """``text`` with a NUL or a lone surrogate written out (``\\x00``, ``\\ud800``): for what OOS
    records of its own accord, such as a handler's error, whose write must not fail."""
    if storable_text(text):
        return text
    return text.replace("\x00", "\\x00").encode("utf-8", "backslashreplace").decode()


_JSON = json.JSONEncoder(allow_nan=False, separators=(",", ":")).encode


def json_text(field: str, value) -> str:
    """``value`` as compact JSON text, all ASCII (so its length is its size in bytes);
    InvalidField naming ``field`` when it has no JSON form (NaN, Infinity, a set, an object)."""
    try:
        return _JSON(value)
    except (TypeError, ValueError) as e:
        raise InvalidField(field, f"not JSON-serialisable ({e})") from None


def queue_name(name) -> str:
    """``name`` if it is a valid queue name, else InvalidField("queue", ...)."""
    if not isinstance(name, str) or not QUEUE_NAME_RE.match(name):
        raise InvalidField("queue", f"expected {QUEUE_NAME_RULE}, got {shown(name)}")
    return name


def task_name(name, field: str = "task") -> str:
    if name.__class__ is not str or not name or len(name) > NAME_MAX or name.isspace():
        raise InvalidField(field, f"expected a non-empty name of at most {NAME_MAX} characters, got {shown(name)}")
    return stored_text(field, name)


def number(field: str, value, *, minimum: float | None = None, maximum: float | None = None,
           integer: bool = False, exclusive: bool = False):
    """``value`` if it is a finite number at or above ``minimum`` (above, when ``exclusive``)
    and at or below ``maximum``. ``integer``: an int that fits SQLite's 64-bit INTEGER;
    otherwise an int comes back as a float (SQLite's REAL takes any size of it)."""
    kind = "an integer" if integer else "a finite number"
    if value.__class__ is bool or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        raise InvalidField(field, f"expected {kind}, got {shown(value)}")
    if isinstance(value, int) and not integer:
        value = float(value) if abs(value) < 2**1023 else math.inf  # past 2**1024: no float holds it
    if isinstance(value, float) and not math.isfinite(value):
        raise InvalidField(field, f"expected {kind}, got {shown(value)}")
    if minimum is not None and (value <= minimum if exclusive else value < minimum):
        raise InvalidField(field, f"must be {'>' if exclusive else '>='} {minimum}, got {shown(value)}")
    if maximum is not None and value > maximum:
        raise InvalidField(field, f"must be <= {maximum}, got {shown(value)}")
    if integer and not -MAX_ID - 1 <= value <= MAX_ID:
        raise InvalidField(field, f"must fit a 64-bit integer, got {shown(value)}")
    return value


def max_attempts(value, field: str = "max_attempts") -> int:
    """``value`` if it is a task's number of attempts (MAX_ATTEMPTS_RANGE)."""
    return number(field, value, minimum=MAX_ATTEMPTS_RANGE[0], maximum=MAX_ATTEMPTS_RANGE[1], integer=True)


def timeout(value, field: str = "timeout") -> float:
    """``value`` if it is a task's timeout in seconds (MIN_TIMEOUT to TIMEOUT_MAX)."""
    return number(field, value, minimum=MIN_TIMEOUT, maximum=TIMEOUT_MAX)


def existing_id(value: int) -> bool:
    """True if ``value`` could be the id of a stored row (1 .. MAX_ID)."""
    return 0 < value <= MAX_ID


# N/unit with N > 0 (a number over 0 with at most 100 characters is finite); the API's document
# gives the same pattern.
RATE_PATTERN = r"^\s*(0*[1-9]\d*(?:\.\d+)?|0+\.\d*[1-9]\d*)\s*/\s*(s|sec|second|m|min|minute|h|hour)\s*$"
RATE_RE = re.compile(RATE_PATTERN)
RATE_UNITS = {"s": 1, "sec": 1, "second": 1, "m": 60, "min": 60, "minute": 60, "h": 3600, "hour": 3600}


def rate(value, field: str = "rate") -> float:
    """Runs per second of a rate written ``"10/s"``, ``"100/min"`` or ``"5/h"`` (more than 0, finite)."""
    match = RATE_RE.match(value) if isinstance(value, str) else None
    if not match or not 0 < float(match[1]) < math.inf:
        raise InvalidField(field, f"expected N/s, N/min or N/h with N > 0, got {shown(value)}")
    return float(match[1]) / RATE_UNITS[match[2]]

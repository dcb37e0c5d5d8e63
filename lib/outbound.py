"""Outbound HTTP that survives bad networks: timeouts, retries (tenacity) honouring
Retry-After, a circuit breaker per remote (``helpers.breaker.shared_breaker``), a token-bucket
rate limit and a response cache, both in SQLite so they hold across processes and restarts.
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable

import requests
from tenacity import RetryCallState, Retrying, retry_if_exception, stop_after_attempt

from helpers.engine import Database

RETRY_STATUS = {429, 500, 502, 503, 504}


class Retryable(Exception):
    """A failure worth another try: 429, 5xx, a dropped connection, a cut-off stream."""

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


def retry_after_seconds(response: requests.Response) -> float | None:
    value = response.headers.get("Retry-After")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


def check(response: requests.Response, what: str) -> requests.Response:
    """Raise Retryable for 429/5xx, RuntimeError for any other non-2xx; return 2xx as is."""
    if response.status_code in RETRY_STATUS:
        raise Retryable(f"{what}: HTTP {response.status_code}", retry_after_seconds(response))
    if response.status_code >= 400:
        raise RuntimeError(f"{what}: HTTP {response.status_code}: {response.text[:200]}")
    return response


def _is_retryable(exc: BaseException) -> bool:
    return isinstance(exc, (Retryable, requests.ConnectionError, requests.Timeout))


def _wait(max_wait: float) -> Callable[[RetryCallState], float]:
    def wait(state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, Retryable) and exc.retry_after is not None:
            return min(exc.retry_after, max_wait)
        return min(max_wait, 0.5 * 2 ** (state.attempt_number - 1))
    return wait


def with_retries(fn: Callable, attempts: int = 3, max_wait: float = 30.0, sleep: Callable = time.sleep):
    """Call ``fn()``; on a retryable failure wait (Retry-After, else 0.5 s, 1 s, 2 s...) and try
    again, ``attempts`` times in all; the last failure is raised."""
    retrying = Retrying(retry=retry_if_exception(_is_retryable), stop=stop_after_attempt(attempts),
                        wait=_wait(max_wait), sleep=sleep, reraise=True)
    return retrying(fn)


class RateLimit:
    """A token bucket in SQLite: ``capacity`` tokens (the burst), refilled at ``per_second``.
    One bucket per name for every process on the machine, kept across restarts."""

    def __init__(self, db: Database, name: str, capacity: float, per_second: float,
                 clock: Callable[[], float] = time.time):
        self.db, self.name, self.capacity, self.per_second, self.clock = db, name, capacity, per_second, clock

    def try_acquire(self) -> bool:
        now = self.clock()
        with self.db.transaction() as conn:
            row = conn.execute("SELECT tokens, updated_at FROM rate_limits WHERE name = ?", (self.name,)).fetchone()
            tokens = self.capacity if row is None else min(
                self.capacity, row["tokens"] + max(0.0, now - row["updated_at"]) * self.per_second)
            allowed = tokens >= 1.0
            conn.execute("INSERT INTO rate_limits (name, tokens, updated_at) VALUES (?, ?, ?) "
                         "ON CONFLICT (name) DO UPDATE SET tokens = excluded.tokens, updated_at = excluded.updated_at",
                         (self.name, tokens - 1.0 if allowed else tokens, now))
        return allowed


class Cache:
    """A TTL cache of JSON values in SQLite, shared by every process."""

    def __init__(self, db: Database, ttl: float, clock: Callable[[], float] = time.time):
        self.db, self.ttl, self.clock = db, ttl, clock

    def get(self, key: str):
        rows = self.db.execute("SELECT body FROM http_cache WHERE key = ? AND expires_at > ?", (key, self.clock()))
        return json.loads(rows[0]["body"]) if rows else None

    def put(self, key: str, value) -> None:
        now = self.clock()
        with self.db.transaction() as conn:
            conn.execute("DELETE FROM http_cache WHERE expires_at <= ?", (now,))
            conn.execute("INSERT INTO http_cache (key, body, expires_at) VALUES (?, ?, ?) ON CONFLICT (key) "
                         "DO UPDATE SET body = excluded.body, expires_at = excluded.expires_at",
                         (key, json.dumps(value), now + self.ttl))


def record(db: Database, name: str, ok: bool, latency_ms: float | None = None, error: str | None = None) -> None:
    """Per-remote health for /providers: calls, errors, last error, moving-average latency."""
    db.execute("""INSERT INTO provider_stats (name, calls, errors, last_error, latency_ms, updated_at)
                  VALUES (:name, 1, :err, :error, :latency, :now)
                  ON CONFLICT (name) DO UPDATE SET calls = provider_stats.calls + 1,
                      errors = provider_stats.errors + :err,
                      last_error = coalesce(:error, provider_stats.last_error),
                      latency_ms = CASE WHEN :latency IS NULL THEN provider_stats.latency_ms
                                        WHEN provider_stats.latency_ms IS NULL THEN :latency
                                        ELSE 0.8 * provider_stats.latency_ms + 0.2 * :latency END,
                      updated_at = :now""",
               dict(name=name, err=0 if ok else 1, error=error, latency=latency_ms, now=time.time()))


def stats(db: Database, name: str) -> dict:
    """What ``record`` kept for ``name``: calls, errors, last_error, latency_ms."""
    rows = db.execute("SELECT calls, errors, last_error, latency_ms FROM provider_stats WHERE name = ?", (name,))
    return dict(rows[0]) if rows else {"calls": 0, "errors": 0, "last_error": None, "latency_ms": None}

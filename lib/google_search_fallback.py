"""Web search through the Google Custom Search JSON API.

```python
from lib.google_search_fallback import GoogleSearchFallback
with GoogleSearchFallback() as search_client:
    response = search_client.search("python programming", num_results=5)
    if response.success:
        for result in response.results:
            print(f"{result['title']}: {result['link']}")
```
Needs ``GOOGLE_SEARCH_API_KEY`` and ``GOOGLE_SEARCH_ENGINE_ID``. The daily quota (8,000 queries,
bursts allowed) is a token bucket in the OOS database, so it holds across processes and
restarts; answers are cached (1 h); 429/5xx are retried with backoff; a breaker stops calls to a
failing API. It never raises: any failure is ``success=False`` with a reason.
"""
from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass, field

import pybreaker
import requests

from helpers.breaker import shared_breaker
from helpers.config import Config, load_config
from helpers.engine import get_database
from lib import outbound


@dataclass
class SearchResponse:
    success: bool
    query: str
    results: list[dict] = field(default_factory=list)
    error: str | None = None
    cached: bool = False


class GoogleSearchFallback:
    def __init__(self, config: Config | None = None, api_key: str | None = None, engine_id: str | None = None,
                 db=None, sleep=time.sleep, clock=time.time):
        self.config = config or load_config()
        self.api_key = api_key if api_key is not None else os.environ.get("GOOGLE_SEARCH_API_KEY", "")
        self.engine_id = engine_id if engine_id is not None else os.environ.get("GOOGLE_SEARCH_ENGINE_ID", "")
        self.db = db or get_database(self.config)
        self.session = requests.Session()
        self.sleep = sleep
        c = self.config
        self.limit = outbound.RateLimit(self.db, "search:google", c.search_burst, c.search_daily_quota / 86_400, clock)
        self.cache = outbound.Cache(self.db, c.search_cache_ttl, clock)
        self.breaker = shared_breaker(self.db, "search:google", fail_max=5, reset_timeout=60)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        self.session.close()

    def search(self, query: str, num_results: int = 5) -> SearchResponse:
        if not isinstance(query, str) or not query.strip():
            return SearchResponse(False, str(query), error="query: empty")
        num_results = max(1, min(10, int(num_results)))
        if not (self.api_key and self.engine_id):
            return SearchResponse(False, query, error="not configured: set GOOGLE_SEARCH_API_KEY and "
                                                      "GOOGLE_SEARCH_ENGINE_ID")
        key = "google:" + hashlib.sha256(f"{self.engine_id}\0{num_results}\0{query}".encode()).hexdigest()
        try:
            cached = self.cache.get(key)
            if cached is not None:
                return SearchResponse(True, query, cached, cached=True)
            if not self.limit.try_acquire():
                return SearchResponse(False, query, error="rate limited: the daily query quota is spent for now")
            results = self.breaker.call(outbound.with_retries, lambda: self._fetch(query, num_results),
                                        attempts=4, max_wait=30, sleep=self.sleep)
            self.cache.put(key, results)
            outbound.record(self.db, "search:google", True)
            return SearchResponse(True, query, results)
        except pybreaker.CircuitBreakerError:
            return SearchResponse(False, query, error="breaker open: the search API failed repeatedly")
        except Exception as e:  # noqa: BLE001 - the caller gets a reason, never an exception
            reason = self._redact(f"{type(e).__name__}: {e}")[:300]
            outbound.record(self.db, "search:google", False, error=reason)
            return SearchResponse(False, query, error=reason)

    def _redact(self, text: str) -> str:
        # A connection error quotes the URL, and the URL carries the key.
        return text.replace(self.api_key, "***") if self.api_key else text

    def _fetch(self, query: str, num: int) -> list[dict]:
        response = self.session.get(self.config.search_base_url, timeout=self.config.search_timeout,
                                    params={"key": self.api_key, "cx": self.engine_id, "q": query, "num": num})
        outbound.check(response, "google search")
        items = response.json().get("items") or []
        return [{"title": i.get("title", ""), "link": i.get("link", ""), "snippet": i.get("snippet", "")}
                for i in items[:num]]

"""Per-user request limits on the /api and /v1 routes (`server.api_rate_limit`): 429 with Retry-After beyond them.

Each caller is counted in moving windows kept in this process's memory (the `limits` package), keyed by the
authenticated user, so one user's burst never refuses another. Pages, static files and the unauthenticated
/api/version are not counted: only requests that passed authentication reach `enforce`.
"""

from __future__ import annotations

import logging
import math
import threading
import time

import limits
from fastapi import Request
from limits.storage import MemoryStorage
from limits.strategies import MovingWindowRateLimiter

from appliance.access.users import Principal
from appliance.errors import ApplianceError, TooManyRequests

log = logging.getLogger(__name__)

SETTING = "APPLIANCE_API_RATE_LIMIT (server.api_rate_limit)"
LIMITED_PREFIXES = ("/api/", "/v1/")


def parse(notation: str) -> list[limits.RateLimitItem]:
    """The limits in `notation` ('600/minute', several joined by ';'); none when it is empty."""
    if not notation.strip():
        return []
    try:
        items = limits.parse_many(notation)
    except ValueError:
        items = []
    if not items or any(item.amount < 1 for item in items):
        raise ApplianceError(
            f"{SETTING} is not a valid rate limit: {notation!r}; write for example '600/minute' or "
            "'10/second;600/minute' (each allowing at least 1 request), or leave it empty to disable limiting"
        )
    return items


class RateLimits:
    """The configured limits and every caller's recent requests."""

    def __init__(self, notation: str):
        self.items = parse(notation)
        self._limiter = MovingWindowRateLimiter(MemoryStorage())
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return bool(self.items)

    def acquire(self, key: str) -> int | None:
        """Count one request of `key`: None when every limit allows it, else seconds until one frees (>= 1).

        A refused request is not counted, so a client that honours Retry-After gets through then.
        """
        with self._lock:  # test-then-hit over several limits must not interleave with another request's
            full = [item for item in self.items if not self._limiter.test(item, key)]
            if not full:
                for item in self.items:
                    self._limiter.hit(item, key)
                return None
        now = time.time()
        return max(max(1, math.ceil(self._limiter.get_window_stats(item, key).reset_time - now)) for item in full)

    def describe(self) -> str:
        return ", ".join(str(item) for item in self.items)


def enforce(request: Request, principal: Principal) -> None:
    """Count an authenticated API request against its user's limits; raises TooManyRequests beyond them."""
    rate_limits: RateLimits = request.app.state.rate_limits
    if not rate_limits.enabled or not request.url.path.startswith(LIMITED_PREFIXES):
        return
    wait = rate_limits.acquire(f"user:{principal.user_id}")
    if wait is None:
        return
    log.warning(
        "rate limit: refused %s %s for user %s (id %d); retry in %d s",
        request.method,
        request.url.path[:200],
        principal.name,
        principal.user_id,
        wait,
    )
    raise TooManyRequests(
        f"too many requests: each user may make {rate_limits.describe()}; retry in {wait} s", retry_after=wait
    )

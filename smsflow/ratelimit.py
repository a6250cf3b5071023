"""Rate limiting for anything that calls a provider (gateways, CRM APIs): a token bucket, and the
provider's ``Retry-After`` read. A standard-library leaf, like kombu's ``utils/limits``."""
from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime


class TokenBucket:
    """Token bucket: ``rate`` tokens per second, at most ``capacity`` banked."""

    def __init__(self, rate: float, capacity: float | None = None, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep):
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = float(rate)
        self.capacity = float(capacity if capacity is not None else max(1.0, rate / 10))
        self._clock = clock
        self._sleep = sleep
        self._tokens = self.capacity
        self._last = clock()
        self._lock = threading.Lock()

    def acquire(self, n: int = 1) -> float:
        """Block until ``n`` tokens are available; returns seconds waited."""
        waited = 0.0
        need = float(n)
        with self._lock:
            while True:
                now = self._clock()
                self._tokens = min(self.capacity, self._tokens + (now - self._last) * self.rate)
                self._last = now
                take = min(need, self._tokens)
                self._tokens -= take
                need -= take
                if need <= 1e-9:
                    return waited
                delay = min(need, self.capacity) / self.rate
                self._sleep(delay)
                waited += delay


def retry_after_seconds(value: str | None) -> float | None:
    """Seconds a ``Retry-After`` header asks for (delta-seconds or an HTTP date); None if absent or unreadable."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        try:
            return max(0.0, (parsedate_to_datetime(value) - datetime.now(timezone.utc)).total_seconds())
        except (TypeError, ValueError):
            return None

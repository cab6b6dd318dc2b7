"""Requests-per-minute and tokens-per-minute limits as token buckets.

Each bucket refills at limit/60 per second and holds at most one second of refill, so a run
starts at its steady rate instead of bursting a whole minute's allowance (which providers
answer with 429s). A request that needs more than the bucket holds waits for a full bucket and
leaves it in debt, so oversized requests still pass. Token costs are estimated before the call
and corrected with the reply's usage after it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


class TokenBucket:
    def __init__(self, per_minute: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        if per_minute <= 0:
            raise ValueError("a rate limit must be positive")
        self.rate = per_minute / 60.0
        self.capacity = max(1.0, self.rate)
        self.level = self.capacity
        self._clock = clock
        self._stamp = clock()
        self._lock = asyncio.Lock()  # first come, first served

    def _refill(self) -> None:
        now = self._clock()
        self.level = min(self.capacity, self.level + (now - self._stamp) * self.rate)
        self._stamp = now

    async def take(self, amount: float) -> None:
        async with self._lock:
            need = min(amount, self.capacity)
            self._refill()
            while self.level < need:
                await asyncio.sleep((need - self.level) / self.rate)
                self._refill()
            self.level -= amount

    def adjust(self, delta: float) -> None:
        """Charge `delta` more (or refund it when negative) after the fact."""
        self._refill()
        self.level = min(self.capacity, self.level - delta)


class RateLimiter:
    """Both limits of an endpoint; either may be None (unlimited)."""

    def __init__(self, requests_per_minute: float | None, tokens_per_minute: float | None) -> None:
        self.requests = TokenBucket(requests_per_minute) if requests_per_minute else None
        self.tokens = TokenBucket(tokens_per_minute) if tokens_per_minute else None

    async def acquire(self, estimated_tokens: int) -> None:
        if self.requests is not None:
            await self.requests.take(1)
        if self.tokens is not None:
            await self.tokens.take(estimated_tokens)

    def settle(self, estimated_tokens: int, actual_tokens: int) -> None:
        if self.tokens is not None:
            self.tokens.adjust(actual_tokens - estimated_tokens)


def estimate_tokens(text: str, max_tokens: int) -> int:
    """Before the call: about 4 characters per token, plus the reply's budget (what providers
    count against TPM)."""
    return len(text) // 4 + 8 + max_tokens

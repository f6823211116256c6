"""Retries: exponential backoff with full jitter, within the caller's deadline.

Only UNAVAILABLE, RESOURCE_EXHAUSTED and a CANCELLED that the server sent are retried: all
three mean "this replica could not take the call", never "the call is wrong". A server
cancels a call when its gRPC core sheds a flood before the server sees it
(``--max-pending-calls``); a call this client cancels ends in ``asyncio.CancelledError``
instead, and is never retried. Every embedserve call is idempotent, so a retry is safe
even when the first attempt ran. A retry hint from the server (RetryInfo) is honoured
when it is longer than the computed backoff.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import grpc

RETRYABLE = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.CANCELLED}
)


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 4
    initial_backoff: float = 0.1
    max_backoff: float = 5.0
    multiplier: float = 2.0
    retryable_codes: frozenset[grpc.StatusCode] = field(default=RETRYABLE)

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        unsafe = self.retryable_codes - RETRYABLE
        if unsafe:
            raise ValueError(
                f"only UNAVAILABLE, RESOURCE_EXHAUSTED and CANCELLED may be retried, not {unsafe}"
            )

    def delay(self, attempt: int, hint: float | None, rng: random.Random) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
        ceiling = min(self.max_backoff, self.initial_backoff * self.multiplier ** (attempt - 1))
        backoff = rng.uniform(0, ceiling)
        if hint is not None:
            backoff = max(backoff, min(hint, self.max_backoff))
        return backoff


NO_RETRY = RetryPolicy(max_attempts=1)

"""How fast the engine drains its queue: the basis for admission by expected wait."""

from __future__ import annotations


class DrainRate:
    """Real (unpadded) tokens a second over recent full batches, smoothed.

    Only batches near the budget count. Small batches run at a fraction of the device's
    rate, and they are what an idle server runs: counting them would make the estimate
    pessimistic exactly when a burst arrives, and the burst would be refused.
    """

    def __init__(self, max_batch_tokens: int, max_batch_size: int, weight: float = 0.2) -> None:
        self._full_tokens = max_batch_tokens
        self._full_size = max_batch_size
        self._weight = weight
        self.tokens_per_s: float | None = None

    def observe(self, tokens: int, padded_tokens: int, size: int, seconds: float) -> None:
        if seconds <= 0 or tokens <= 0:
            return
        if 2 * padded_tokens < self._full_tokens and 2 * size < self._full_size:
            return
        rate = tokens / seconds
        if self.tokens_per_s is None:
            self.tokens_per_s = rate
        else:
            self.tokens_per_s += self._weight * (rate - self.tokens_per_s)

    def seconds_for(self, tokens: int) -> float | None:
        """Expected time to compute ``tokens`` queued tokens; None before any full batch."""
        if self.tokens_per_s is None:
            return None
        return tokens / self.tokens_per_s

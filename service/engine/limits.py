"""The knobs of one engine, validated once at start-up."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BatchLimits:
    # Token budget of one forward pass, padding included (count x longest).
    max_batch_tokens: int = 8192
    # Most sequences in one forward pass.
    max_batch_size: int = 64
    # Most inputs in one request or stream item.
    max_inputs_per_request: int = 512
    # Tokens each lane may hold. Interactive calls past it get RESOURCE_EXHAUSTED;
    # bulk streams wait (backpressure) instead.
    max_queue_tokens: int = 65536
    # Longest expected wait an interactive call is admitted into, at the throughput the
    # engine measured on full batches; past it, RESOURCE_EXHAUSTED at once. Time, unlike
    # tokens, means the same on a CPU and on a GPU. 0 turns it off.
    max_queue_delay_s: float = 0.5
    # Items a stream may have in flight before the server stops reading it.
    stream_window: int = 16
    # A bulk sequence competes as if it had arrived this much later than it did, so
    # interactive work goes first but bulk work is never starved.
    bulk_aging_s: float = 1.0
    # How many queued sequences, oldest first, length grouping chooses from.
    grouping_window: int = 512

    def validate(self, max_input_tokens: int) -> None:
        checks = [
            (self.max_batch_size >= 1, "max batch size must be at least 1"),
            (self.max_inputs_per_request >= 1, "max inputs per request must be at least 1"),
            (self.stream_window >= 1, "stream window must be at least 1"),
            (self.bulk_aging_s >= 0, "bulk aging must not be negative"),
            (self.max_queue_delay_s >= 0, "max queue delay must not be negative"),
            (
                self.max_batch_tokens >= max_input_tokens,
                f"max batch tokens ({self.max_batch_tokens}) must hold one longest input "
                f"({max_input_tokens} tokens)",
            ),
            (
                self.max_queue_tokens >= max_input_tokens,
                f"max queue tokens ({self.max_queue_tokens}) must hold one longest input "
                f"({max_input_tokens} tokens)",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

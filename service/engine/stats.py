"""Counters the engine keeps; read by the info RPC, the metrics and the tests."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class EngineStats:
    batches: int = 0
    sequences_computed: int = 0
    tokens_computed: int = 0
    padded_tokens_computed: int = 0
    forward_seconds: float = 0.0
    # Sequences dropped from the queue before any forward pass computed them.
    sequences_expired: int = 0
    sequences_cancelled: int = 0
    requests_rejected: int = 0
    forward_failures: int = 0
    # Batches queued on a busy worker behind its running batch, and those of them taken
    # back into the queue before the worker started them (an interactive call came).
    next_batches_queued: int = 0
    next_batches_recalled: int = 0

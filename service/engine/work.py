"""The units of work: a request is split into sequences, and sequences are batched."""

from __future__ import annotations

import asyncio
import enum
from dataclasses import dataclass, field
from typing import Any

import numpy as np


class Lane(enum.Enum):
    INTERACTIVE = "interactive"
    BULK = "bulk"


class Outcome(enum.Enum):
    PENDING = "pending"
    DONE = "done"
    EXPIRED = "expired"
    CANCELLED = "cancelled"
    FAILED = "failed"


@dataclass(eq=False)
class WorkRequest:
    """One caller's sequences, collected back into one result as batches complete."""

    sequences: list[list[int]]
    lane: Lane
    # Absolute deadline on the event loop's clock, or None.
    deadline: float | None
    enqueued_at: float
    future: asyncio.Future[np.ndarray]
    outcome: Outcome = Outcome.PENDING
    # Sequences (and their tokens) still waiting in the queue, not yet in a batch.
    queued_count: int = 0
    queued_tokens: int = 0
    remaining: int = 0
    first_batch_at: float | None = None
    inference_s: float = 0.0
    last_batch: int = -1
    outputs: np.ndarray | None = field(default=None, repr=False)
    # Tracing only: the caller's context, and its queue span while it waits.
    trace_context: Any = field(default=None, repr=False)
    queue_span: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.queued_count = self.remaining = len(self.sequences)
        self.queued_tokens = sum(len(s) for s in self.sequences)

    @property
    def live(self) -> bool:
        return self.outcome is Outcome.PENDING

    def deliver(
        self, batch_id: int, started: float, elapsed: float, index: int, row: np.ndarray
    ) -> None:
        """Store one computed row; the request completes with its last row."""
        if not self.live:
            return
        if self.first_batch_at is None:
            self.first_batch_at = started
        if self.last_batch != batch_id:
            self.last_batch = batch_id
            self.inference_s += elapsed
        if self.outputs is None:
            self.outputs = np.empty((len(self.sequences), *row.shape), dtype=np.float32)
        self.outputs[index] = row
        self.remaining -= 1
        if self.remaining == 0:
            self.outcome = Outcome.DONE
            if not self.future.done():
                self.future.set_result(self.outputs)


@dataclass(eq=False, slots=True)
class QueuedSequence:
    request: WorkRequest
    index: int
    length: int

    @property
    def ids(self) -> list[int]:
        return self.request.sequences[self.index]

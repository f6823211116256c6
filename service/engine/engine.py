"""One engine a served model: admission, the batching loop, deadlines and cancellation.

The public surface is ``tokenize`` (run adapter code on the tokenizer thread) and
``compute`` (queue token sequences, await one output row each). Everything that
touches the queue runs on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import NoReturn, TypeVar

import numpy as np
from opentelemetry.trace import Span

from embedserve.service.engine.errors import DeadlineExpired, ForwardFailed, NotReady, Overloaded
from embedserve.service.engine.limits import BatchLimits
from embedserve.service.engine.runner import BatchRunner
from embedserve.service.engine.scheduler import Scheduler
from embedserve.service.engine.stats import EngineStats
from embedserve.service.engine.throughput import DrainRate
from embedserve.service.engine.tokenizer_pool import TokenizerPool
from embedserve.service.engine.work import Lane, Outcome, QueuedSequence, WorkRequest
from embedserve.service.models.base import ModelAdapter
from embedserve.service.telemetry.engine_hooks import EngineTelemetry

log = logging.getLogger(__name__)
T = TypeVar("T")


class EngineState(enum.Enum):
    STARTING = "starting"
    READY = "ready"
    STOPPED = "stopped"


@dataclass(frozen=True)
class ComputeResult:
    outputs: np.ndarray
    queue_s: float
    inference_s: float


class Engine:
    def __init__(
        self,
        adapter: ModelAdapter,
        limits: BatchLimits,
        telemetry: EngineTelemetry | None = None,
        *,
        forward_nice: int = 0,
    ) -> None:
        limits.validate(adapter.max_input_tokens)
        self.adapter = adapter
        self.telemetry = telemetry or EngineTelemetry(adapter.name, "", None, None)
        self.limits = limits
        self.stats = EngineStats()
        self.state = EngineState.STARTING
        self._runner = BatchRunner(adapter)
        self._forward_thread = ThreadPoolExecutor(
            1,
            thread_name_prefix=f"forward-{adapter.name}",
            initializer=_lower_priority,
            initargs=(forward_nice,),
        )
        self._tokenizer = TokenizerPool(adapter.name)
        self._scheduler = Scheduler(limits, self._expire)
        self._wakeup = asyncio.Event()
        self._bulk_space = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._outstanding = 0
        self._held = asyncio.Event()
        self._held.set()
        self._loop_task: asyncio.Task[None] | None = None
        self._batch_counter = 0
        self.drain_rate = DrainRate(limits.max_batch_tokens, limits.max_batch_size)

    # -- lifecycle ---------------------------------------------------------------

    async def start(self, *, warmup: bool = True) -> None:
        """Warm up with a full-size batch, then start batching."""
        if warmup:
            batch = self._warmup_batch()
            _, seconds = await asyncio.get_running_loop().run_in_executor(
                self._forward_thread, self._timed_forward, batch
            )
            # A full batch of the longest inputs: a conservative first drain rate, so that
            # admission by expected wait works from the first request.
            tokens = sum(len(s) for s in batch)
            self.drain_rate.observe(tokens, tokens, len(batch), seconds)
            log.info(
                "warm-up done",
                extra={
                    "model": self.adapter.name,
                    "batch_size": len(batch),
                    "batch_tokens": tokens,
                    "seconds": round(seconds, 3),
                },
            )
        self._loop_task = asyncio.create_task(
            self._batch_loop(), name=f"engine-{self.adapter.name}"
        )
        self.state = EngineState.READY

    async def wait_idle(self) -> None:
        """Return when no accepted work is left in the queue or on the device."""
        await self._idle.wait()

    async def stop(self) -> None:
        self.state = EngineState.STOPPED
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
        self._tokenizer.close()
        self._forward_thread.shutdown(wait=True)

    def hold(self) -> None:
        """Stop starting new batches (queued work waits). For tests and operators' debugging."""
        self._held.clear()

    def release(self) -> None:
        self._held.set()

    # -- the API the transport uses ------------------------------------------------

    @property
    def outstanding(self) -> int:
        """Requests accepted and not yet answered."""
        return self._outstanding

    def queued_tokens(self, lane: Lane) -> int:
        return self._scheduler.queued_tokens(lane)

    def queued_sequences(self, lane: Lane) -> int:
        return self._scheduler.queued_sequences(lane)

    def check_admission(self, lane: Lane, tokens: int = 0, sequences: int = 0) -> None:
        """Raise Overloaded if an interactive request of ``tokens`` in ``sequences`` would
        overflow the queue's token bound, or would wait longer than ``max_queue_delay_s``.

        Called once before tokenizing (with 0, to shed load cheaply) and again after.
        """
        if self.state is not EngineState.READY:
            raise NotReady(f"model {self.adapter.name} is {self.state.value}")
        if lane is not Lane.INTERACTIVE:
            return
        queued = self._scheduler.queued_tokens(lane)
        limit = self.limits.max_queue_tokens
        if queued + tokens > limit or (tokens == 0 and queued >= limit):
            self._refuse(f"the {lane.value} queue holds {queued} tokens (limit {limit})")
        max_delay = self.limits.max_queue_delay_s
        # An empty queue always admits: one request alone is never refused for its size.
        if not max_delay or not queued or self._fits_next_batch(queued + tokens, sequences):
            return
        wait = self.drain_rate.seconds_for(queued + tokens)
        if wait is not None and wait > max_delay:
            self._refuse(
                f"the {lane.value} queue is {wait * 1000:.0f} ms of work "
                f"(limit {max_delay * 1000:.0f} ms)"
            )

    async def tokenize(self, job: Callable[[], T]) -> tuple[T, float]:
        return await self._tokenizer.run(job)

    async def compute(
        self,
        sequences: list[list[int]],
        lane: Lane,
        deadline: float | None,
        *,
        detailed_trace: bool = True,
    ) -> ComputeResult:
        """Queue the sequences and wait for one output row each.

        ``deadline`` is on the event loop's clock. Cancelling the awaiting task drops the
        sequences that have not started computing. ``detailed_trace`` adds a queue span
        (off for stream items, which are aggregated on their stream's span).
        """
        loop = asyncio.get_running_loop()
        tokens = sum(len(s) for s in sequences)
        self.check_admission(lane, tokens, len(sequences))
        if lane is Lane.BULK:
            await self._wait_for_bulk_space(tokens)
            self.check_admission(lane, tokens, len(sequences))
        request = WorkRequest(sequences, lane, deadline, loop.time(), loop.create_future())
        self.telemetry.request_queued(request, detailed_trace)
        self._scheduler.enqueue(request)
        self._outstanding += 1
        self._idle.clear()
        self._wakeup.set()
        timer = loop.call_at(deadline, self._expire, request) if deadline is not None else None
        try:
            outputs = await request.future
        except asyncio.CancelledError:
            self._drop(request, Outcome.CANCELLED)
            raise
        finally:
            if timer is not None:
                timer.cancel()
            self._outstanding -= 1
            if self._outstanding == 0:
                self._idle.set()
        first = request.first_batch_at if request.first_batch_at is not None else loop.time()
        return ComputeResult(outputs, first - request.enqueued_at, request.inference_s)

    # -- internals -----------------------------------------------------------------

    def _fits_next_batch(self, tokens: int, sequences: int) -> bool:
        """Whether the whole interactive queue, this call included, fits in one batch.

        Such a call waits for the batch already running and nothing else, so refusing it
        would gain nothing. It also keeps admission stable: under CPU contention (callers
        retrying refusals at once, say) the measured drain rate falls, and without this a
        falling rate would refuse even a queue of a few sentences, whose refusals cost more
        CPU, and so on down.
        """
        queued_sequences = self._scheduler.queued_sequences(Lane.INTERACTIVE)
        return (
            queued_sequences + sequences <= self.limits.max_batch_size
            and tokens <= self.limits.max_batch_tokens
        )

    def _refuse(self, why: str) -> NoReturn:
        self.stats.requests_rejected += 1
        raise Overloaded(why, self._retry_hint())

    def _retry_hint(self) -> float:
        """How long the interactive queue takes to drain at the measured throughput."""
        wait = self.drain_rate.seconds_for(self._scheduler.queued_tokens(Lane.INTERACTIVE))
        return 0.1 if wait is None else min(5.0, max(0.05, wait))

    async def _wait_for_bulk_space(self, tokens: int) -> None:
        # Streams wait rather than fail when the bulk lane is full (backpressure); one
        # item larger than the whole bound still goes in once the lane is empty.
        limit = self.limits.max_queue_tokens
        while True:
            queued = self._scheduler.queued_tokens(Lane.BULK)
            if queued == 0 or queued + tokens <= limit:
                return
            self._bulk_space.clear()
            await self._bulk_space.wait()

    def _expire(self, request: WorkRequest) -> None:
        self._drop(request, Outcome.EXPIRED)

    def _drop(self, request: WorkRequest, outcome: Outcome, error: Exception | None = None) -> None:
        """End a live request without its result: expired, cancelled, or failed with ``error``."""
        if not request.live:
            return
        request.outcome = outcome
        self.telemetry.request_dropped(request, outcome.value)
        never_computed = self._scheduler.forget(request)
        if outcome is Outcome.EXPIRED:
            self.stats.sequences_expired += never_computed
            error = DeadlineExpired("deadline expired while queued")
        elif outcome is Outcome.CANCELLED:
            self.stats.sequences_cancelled += never_computed
        if error is not None and not request.future.done():
            request.future.set_exception(error)
        self._bulk_space.set()

    def _warmup_batch(self) -> list[list[int]]:
        longest = self.adapter.warmup_input()
        count = max(
            1, min(self.limits.max_batch_size, self.limits.max_batch_tokens // len(longest))
        )
        return [longest] * count

    async def _batch_loop(self) -> None:
        loop = asyncio.get_running_loop()
        running: _RunningBatch | None = None
        while True:
            if running is None:
                await self._held.wait()
                running = self._start_batch(loop)
                if running is None:
                    self._wakeup.clear()
                    await self._wakeup.wait()
                    continue
            finished = running
            try:
                outputs: tuple[np.ndarray, float] | Exception = await finished.outputs
            except Exception as exc:  # delivered to its callers below, never raised here
                outputs = exc
            # The next forward pass starts before this one's rows are delivered: the
            # forward thread never waits while the event loop answers callers.
            running = self._start_batch(loop) if self._held.is_set() else None
            self._finish_batch(loop, finished, outputs)

    def _start_batch(self, loop: asyncio.AbstractEventLoop) -> _RunningBatch | None:
        batch = self._scheduler.next_batch(loop.time())
        if not batch:
            return None
        self._bulk_space.set()
        self._batch_counter += 1
        padded = len(batch) * self._runner.padded_width([s.length for s in batch])
        span = self.telemetry.batch_started(batch, padded)
        ids = [seq.ids for seq in batch]
        started = loop.time()
        outputs = loop.run_in_executor(self._forward_thread, self._timed_forward, ids)
        return _RunningBatch(self._batch_counter, batch, padded, started, outputs, span)

    def _timed_forward(self, ids: list[list[int]]) -> tuple[np.ndarray, float]:
        # Timed on the forward thread: seen from the event loop, the time would include
        # however long the loop took to notice, and under load the drain rate computed
        # from it would fall, refuse more calls, load the loop more, and so on.
        started = time.perf_counter()
        outputs = self._runner.run(ids)
        return outputs, time.perf_counter() - started

    def _finish_batch(
        self,
        loop: asyncio.AbstractEventLoop,
        running: _RunningBatch,
        outputs: tuple[np.ndarray, float] | Exception,
    ) -> None:
        batch = running.batch
        if isinstance(outputs, Exception):
            elapsed = loop.time() - running.started
            self.telemetry.batch_finished(running.span, batch, running.padded, elapsed, outputs)
            # A failed forward pass fails its callers, never the server.
            self.stats.forward_failures += 1
            log.error(
                "forward pass failed",
                exc_info=outputs,
                extra={"model": self.adapter.name, "batch_size": len(batch)},
            )
            error = ForwardFailed(f"the forward pass failed: {type(outputs).__name__}")
            for seq in batch:
                self._drop(seq.request, Outcome.FAILED, error)
            return
        rows, elapsed = outputs
        self.telemetry.batch_finished(running.span, batch, running.padded, elapsed)
        tokens = sum(seq.length for seq in batch)
        stats = self.stats
        stats.batches += 1
        stats.sequences_computed += len(batch)
        stats.tokens_computed += tokens
        stats.padded_tokens_computed += running.padded
        stats.forward_seconds += elapsed
        self.drain_rate.observe(tokens, running.padded, len(batch), elapsed)
        batch_id, started = running.batch_id, running.started
        for seq, row in zip(batch, rows, strict=True):
            seq.request.deliver(batch_id, started, elapsed, seq.index, row)


def _lower_priority(nice: int) -> None:
    """Run the calling thread, and the torch worker threads it starts, ``nice`` lower.

    Linux schedules threads, and a thread inherits its creator's nice value: the OpenMP
    team of the forward thread is created by its first forward pass, after this. With the
    event loop ahead of torch, a saturated CPU still answers calls, refuses the excess fast
    and hands out results; torch takes what is left.
    """
    if nice <= 0:
        return
    thread = threading.get_native_id()
    try:
        current = os.getpriority(os.PRIO_PROCESS, thread)
        os.setpriority(os.PRIO_PROCESS, thread, min(19, current + nice))
    except OSError as exc:  # no per-thread priorities here: run at the process's
        log.warning("cannot lower the forward thread's priority: %s", exc)


@dataclass(frozen=True)
class _RunningBatch:
    """A batch handed to the forward thread, and what finishing it needs."""

    batch_id: int
    batch: list[QueuedSequence]
    padded: int
    started: float
    # The rows, and the forward pass's seconds measured on the forward thread.
    outputs: asyncio.Future[tuple[np.ndarray, float]]
    span: Span | None

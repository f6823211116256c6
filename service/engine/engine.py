"""One engine a served model: admission, the batching loop, deadlines and cancellation.

The public surface is ``tokenize`` (run adapter code on the tokenizer thread) and
``compute`` (queue token sequences, await one output row each). Everything that
touches the queue runs on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import NoReturn, TypeVar

import numpy as np
from opentelemetry.trace import Span

from embedserve.service.engine.errors import DeadlineExpired, ForwardFailed, NotReady, Overloaded
from embedserve.service.engine.host_memory import (
    HostMemoryTrimmer,
    peak_resident_bytes,
    resident_bytes,
)
from embedserve.service.engine.limits import BatchLimits
from embedserve.service.engine.runner import BatchRunner
from embedserve.service.engine.scheduler import Scheduler
from embedserve.service.engine.stats import EngineStats
from embedserve.service.engine.throughput import DrainRate
from embedserve.service.engine.tokenizer_pool import TokenizerPool
from embedserve.service.engine.work import Lane, Outcome, QueuedSequence, WorkRequest
from embedserve.service.engine.workers import ForwardWorkers, Placement, SharedThreads
from embedserve.service.models.base import ModelAdapter
from embedserve.service.telemetry.engine_hooks import EngineTelemetry

log = logging.getLogger(__name__)
T = TypeVar("T")

# A request may wait behind queued work for up to this many times its own work, when that is
# longer than --max-queue-delay-ms: a 0.7 s rerank may wait 2.1 s (3 more like it), while a
# 5 ms sentence keeps the 500 ms bound. Callers of large requests see latency grow with their
# own concurrency instead of refusals; a flood of small calls is refused as before.
QUEUE_WAIT_PER_OWN_WORK = 3.0


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
        threads: SharedThreads,
        forward_workers: int = 1,
        host_memory: HostMemoryTrimmer | None = None,
        cuda_graph_tokens: int = 0,
    ) -> None:
        """``forward_workers`` batches may run at once, on the CPU threads and the parallel
        worker that ``threads`` holds for every engine of the process (``workers.py``).
        ``host_memory``: the process's trimmer of freed host memory (``host_memory.py``), if
        any. ``cuda_graph_tokens``: batches of up to this many padded tokens replay CUDA
        graphs captured at start (``cuda_graphs.py``; 0: none)."""
        limits.validate(adapter.max_input_tokens)
        self.adapter = adapter
        self.telemetry = telemetry or EngineTelemetry(adapter.name, "", None, None)
        self.limits = limits
        self.stats = EngineStats()
        self.state = EngineState.STARTING
        self._runner = BatchRunner(adapter)
        self._cuda_graph_tokens = cuda_graph_tokens
        self.workers = ForwardWorkers(
            adapter.name,
            forward_workers,
            threads,
            host_memory,
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
        # This engine's batches on the workers now, and the batch queued behind each, by
        # worker (``_queue_next_batches``).
        self._running: dict[int, _RunningBatch] = {}
        self._next: dict[int, _NextBatch] = {}
        # Batches whose forward pass ended, waiting for the loop to deliver their rows.
        self._finished: deque[tuple[_RunningBatch, tuple[np.ndarray, float] | Exception]] = deque()
        self.drain_rate = DrainRate(limits.max_batch_tokens, limits.max_batch_size)

    # -- lifecycle ---------------------------------------------------------------

    async def start(self, *, warmup: bool = True) -> None:
        """Capture CUDA graphs if asked to, warm up with a full-size batch, then start
        batching."""
        if self._cuda_graph_tokens:
            await self._capture_graphs()
        if warmup:
            batch = self._warmup_batch()
            memory = self.workers.host_memory
            rss_before = resident_bytes() if memory is not None else None
            # The first worker alone, with every thread: the conservative drain rate below.
            # Released last, it is the worker that a lone batch goes to next.
            (first,) = self.workers.place(1)
            try:
                _, seconds = await self.workers.run(
                    first, self._timed_forward, batch, self.workers.thread_count(first)
                )
                await self._warm_other_workers(batch[0])
            finally:
                self.workers.release(first)
            # A full batch of the longest inputs, so its tokens are its padded tokens.
            tokens = sum(len(s) for s in batch)
            if memory is not None:
                # What a full batch adds to the resident set: how far it may grow between
                # trims, scaled to the batches that run later (host_memory.py).
                memory.learn_headroom(rss_before, peak_resident_bytes(), tokens)
            headroom = memory.headroom if memory is not None else None
            # A conservative first drain rate, so that admission by expected wait works from
            # the first request.
            self.drain_rate.observe(tokens, tokens, len(batch), seconds)
            log.info(
                "warm-up done",
                extra={
                    "model": self.adapter.name,
                    "batch_size": len(batch),
                    "batch_tokens": tokens,
                    "seconds": round(seconds, 3),
                    "trim_headroom_mib": None if headroom is None else round(headroom / 2**20),
                },
            )
        self._loop_task = asyncio.create_task(
            self._batch_loop(), name=f"engine-{self.adapter.name}"
        )
        self.state = EngineState.READY

    @property
    def inline_tokenizations(self) -> int:
        """Tokenization jobs small enough to run on the event loop so far."""
        return self._tokenizer.inline_jobs

    @property
    def cuda_graph_replays(self) -> int:
        """Batches run from a CUDA graph so far (0 without ``cuda_graph_tokens``)."""
        graphs = self._runner.graphs
        return graphs.replays if graphs is not None else 0

    async def _capture_graphs(self) -> None:
        (worker,) = self.workers.place(1)
        try:
            seconds = await self.workers.run(
                worker,
                self._runner.capture_graphs,
                self.limits.max_batch_size,
                min(self._cuda_graph_tokens, self.limits.max_batch_tokens),
            )
        except Exception as exc:  # torch raises many types; the start fails either way
            raise RuntimeError(
                f"{self.adapter.name}: capturing CUDA graphs failed ({exc}); "
                "start without --cuda-graph-tokens"
            ) from exc
        finally:
            self.workers.release(worker)
        graphs = self._runner.graphs
        log.info(
            "cuda graphs captured",
            extra={
                "model": self.adapter.name,
                "shapes": len(graphs.shapes) if graphs is not None else 0,
                "seconds": round(seconds, 2),
            },
        )

    async def wait_idle(self) -> None:
        """Return when no accepted work is left in the queue or on the device."""
        await self._idle.wait()

    async def stop(self) -> None:
        self.state = EngineState.STOPPED
        self._recall_next_batches()
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
        self._tokenizer.close()
        self.workers.shutdown()

    def hold(self) -> None:
        """Stop starting new batches (queued work waits). For tests and operators' debugging."""
        self._held.clear()
        self._recall_next_batches()

    def release(self) -> None:
        self._held.set()
        self._wakeup.set()

    # -- the API the transport uses ------------------------------------------------

    @property
    def outstanding(self) -> int:
        """Requests accepted and not yet answered."""
        return self._outstanding

    def queued_tokens(self, lane: Lane) -> int:
        return self._scheduler.queued_tokens(lane)

    def queued_sequences(self, lane: Lane) -> int:
        return self._scheduler.queued_sequences(lane)

    def shed_early(self, lane: Lane, inputs: int) -> None:
        """Admission before tokenizing, to shed load before spending CPU on it. It refuses
        only what ``compute`` would refuse however the ``inputs`` tokenize: their own work
        is taken at its largest, every input at the longest the model takes."""
        self._admit(lane, 0, 0, inputs * self.adapter.max_input_tokens, own_at_most=True)

    def _admit(
        self,
        lane: Lane,
        tokens: int,
        sequences: int,
        own_tokens: int | None,
        own_at_most: bool = False,
    ) -> None:
        """Raise Overloaded if an interactive request of ``tokens`` in ``sequences`` would
        overflow the queue's token bound, or would wait too long for ``own_tokens`` of work
        (``_delay_refusal``; None: no delay bound; ``own_at_most``: an upper bound)."""
        if self.state is not EngineState.READY:
            raise NotReady(f"model {self.adapter.name} is {self.state.value}")
        if lane is not Lane.INTERACTIVE:
            return
        queued = self._scheduler.queued_tokens(lane)
        limit = self.limits.max_queue_tokens
        if queued + tokens > limit or (tokens == 0 and queued >= limit):
            self._refuse(f"the {lane.value} queue holds {queued} tokens (limit {limit})")
        if own_tokens is None or self._fits_next_batch(queued + tokens, sequences):
            return
        why = self._delay_refusal(queued, own_tokens, own_at_most)
        if why is not None:
            self._refuse(why)

    def _delay_refusal(self, queued: int, tokens: int, at_most: bool = False) -> str | None:
        """Why a request of ``tokens`` (``at_most``: or fewer) would wait too long behind
        ``queued`` tokens, or None.

        The wait is the work ahead of it, at the throughput measured on full batches. It may
        be ``max_queue_delay_s``, or ``QUEUE_WAIT_PER_OWN_WORK`` times the request's own work
        when that is longer. Counting the request's own tokens against the bound refused
        every large call (a rerank of 100 documents, 0.7 s of work here) whenever anything
        was queued: 4 callers of such reranks were refused all but once.
        """
        max_delay = self.limits.max_queue_delay_s
        if not max_delay or not queued:  # an empty queue always admits
            return None
        ahead = self.drain_rate.seconds_for(queued)
        if ahead is None:
            return None
        own = self.drain_rate.seconds_for(tokens) or 0.0
        allowed = max(max_delay, QUEUE_WAIT_PER_OWN_WORK * own)
        if ahead <= allowed:
            return None
        limit = f"limit {allowed * 1000:.0f} ms"
        if round(allowed * 1000) > round(max_delay * 1000):
            # The bound a reader configured is not the one applied: say where this one is from.
            takes = "may take" if at_most else "takes"
            own_ms = f"{own * 1000:.0f}" if own >= 0.01 else f"{own * 1000:.1f}"
            limit += f": {QUEUE_WAIT_PER_OWN_WORK:g}x the {own_ms} ms this call {takes}"
        return f"the {Lane.INTERACTIVE.value} queue is {ahead * 1000:.0f} ms of work ({limit})"

    async def tokenize(self, job: Callable[[], T], chars: int | None = None) -> tuple[T, float]:
        """``job`` on the tokenizer thread, or on the loop when ``chars`` says it is small
        (``tokenizer_pool.py``)."""
        return await self._tokenizer.run(job, chars)

    async def compute(
        self,
        sequences: list[list[int]],
        lane: Lane,
        deadline: float | None,
        *,
        detailed_trace: bool = True,
        delay_bound: bool = True,
    ) -> ComputeResult:
        """Queue the sequences and wait for one output row each.

        ``deadline`` is on the event loop's clock. Cancelling the awaiting task drops the
        sequences that have not started computing. ``detailed_trace`` adds a queue span
        (off for stream items, which are aggregated on their stream's span).
        ``delay_bound`` False: only the token bound admits it (part of a call admitted on
        its other work).
        """
        loop = asyncio.get_running_loop()
        tokens = sum(len(s) for s in sequences)
        own_tokens = tokens if delay_bound else None
        self._admit(lane, tokens, len(sequences), own_tokens)
        if lane is Lane.BULK:
            await self._wait_for_bulk_space(tokens)
            self._admit(lane, tokens, len(sequences), own_tokens)
        request = WorkRequest(sequences, lane, deadline, loop.time(), loop.create_future())
        self.telemetry.request_queued(request, detailed_trace)
        self._scheduler.enqueue(request)
        if lane is Lane.INTERACTIVE and self._next:
            # An interactive call goes before bulk work that no worker has started.
            self._recall_next_batches(Lane.BULK)
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

    async def _warm_other_workers(self, longest: list[int]) -> None:
        """One short forward pass on each free worker, together, so that what a thread sets
        up on its first forward (allocator and kernel caches) is done before the first burst
        rather than during it. They run on one thread each: only the parallel worker makes an
        OpenMP team (``workers.py``)."""
        others = self.workers.place(self.workers.free) if self.workers.free else []
        try:
            await asyncio.gather(
                *(
                    self.workers.run(
                        placement,
                        self._timed_forward,
                        [longest],
                        self.workers.thread_count(placement),
                    )
                    for placement in others
                )
            )
        finally:
            for placement in others:
                self.workers.release(placement)

    async def _batch_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._wakeup.clear()
            # Free workers get their next batch before finished rows are delivered: a
            # worker never waits while the event loop answers callers.
            if self._held.is_set():
                self._start_batches(loop)
            while self._finished:
                finished, outputs = self._finished.popleft()
                self._finish_batch(loop, finished, outputs)
            await self._wakeup.wait()

    def _start_batches(self, loop: asyncio.AbstractEventLoop) -> None:
        """Fill the free workers that the queue is worth (``_batches_worth_starting``);
        a queue smaller than that many full batches is split among them. Then queue the next
        batch behind each running one while a full batch is left (``_queue_next_batches``)."""
        count = self._batches_worth_starting()
        now = loop.time()
        batches: list[list[QueuedSequence]] = []
        while len(batches) < count:
            batch = self._scheduler.next_batch(now, share=count - len(batches))
            if not batch:
                break
            batches.append(batch)
        if batches:
            self._bulk_space.set()
            placements = self.workers.place(len(batches))
            for batch, placement in zip(batches, placements, strict=True):
                self._batch_began(loop, batch, placement, self._submit_forward(batch, placement))
        self._queue_next_batches(now)

    def _batch_began(
        self,
        loop: asyncio.AbstractEventLoop,
        batch: list[QueuedSequence],
        placement: Placement,
        job: Future[tuple[np.ndarray, float]],
    ) -> None:
        """Account for a batch that its worker runs from now on, and finish it when its
        ``job`` is done."""
        self._batch_counter += 1
        padded = len(batch) * self._runner.padded_width([s.length for s in batch])
        span = self.telemetry.batch_started(batch, padded, placement.threads)
        running = _RunningBatch(
            self._batch_counter, batch, padded, loop.time(), placement, self.workers.busy, span
        )
        self._running[placement.worker] = running
        if self.workers.host_memory is not None:
            # The padded tokens of this engine's batches on the workers: the allowance.
            self.workers.host_memory.batch_started(sum(r.padded for r in self._running.values()))
        outputs = asyncio.wrap_future(job, loop=loop)
        outputs.add_done_callback(functools.partial(self._forward_done, running))

    def _queue_next_batches(self, now: float) -> None:
        """Queue the next batch on each busy worker, behind the batch it runs, while the
        queue holds a full batch more: the worker then starts it the moment the running one
        ends, instead of waiting for the event loop to notice and hand it one. A bulk stream
        saturates the server this way, and its workers lost about 2.5% of their time between
        batches (docs/benchmarks.md, nineteenth session).

        Only a full batch is queued ahead, from the lane whose turn it is: a batch bound to
        one worker waits for that worker, where a batch handed out later goes to whichever
        worker ends first. So a few interactive calls beside a bulk backlog are not queued
        ahead, and a bulk batch queued ahead goes back to the queue when one arrives.
        """
        for worker, running in self._running.items():
            if worker in self._next:
                continue
            lane = self._scheduler.next_lane(now)
            if lane is None or self._quarter_batches_queued(lane) < 4:  # a full batch
                return
            batch = self._scheduler.next_batch(now)
            if not batch:
                return
            self._bulk_space.set()
            self._next[worker] = _NextBatch(batch, self._submit_forward(batch, running.placement))
            self.stats.next_batches_queued += 1

    def _submit_forward(
        self, batch: list[QueuedSequence], placement: Placement
    ) -> Future[tuple[np.ndarray, float]]:
        """The batch's forward pass, queued on its placement's worker."""
        ids = [seq.ids for seq in batch]
        threads = self.workers.thread_count(placement)
        return self.workers.run_next(placement, self._timed_forward, ids, threads)

    def _quarter_batches_queued(self, lane: Lane) -> int:
        """How many quarters of a full batch ``lane`` holds, in sequences or in tokens,
        whichever fills a batch first."""
        limits = self.limits
        return max(
            4 * self._scheduler.queued_sequences(lane) // limits.max_batch_size,
            4 * self._scheduler.queued_tokens(lane) // limits.max_batch_tokens,
        )

    def _recall_next_batches(self, lane: Lane | None = None) -> None:
        """Take the next batches that no worker has started yet (of ``lane``, or all) back
        into the queue, at its head. A batch its worker has started runs as queued."""
        recalled = False
        for worker, waiting in list(self._next.items()):
            if lane is not None and waiting.lane is not lane:
                continue
            if waiting.job.cancel():
                del self._next[worker]
                self._scheduler.requeue(waiting.batch)
                self.stats.next_batches_recalled += 1
                recalled = True
        if recalled:
            self._wakeup.set()

    def _batches_worth_starting(self) -> int:
        """How many batches to start now: one a free worker, but a batch of less than a
        quarter of a full one (in sequences or tokens) never runs beside another.

        Such a batch costs nearly as much as a full one and would take threads from the
        others; alone, one batch of it gets every thread, and beside a running batch it
        waits for that batch's worker. At 64 callers, starting every batch at once made a
        third of them 8 sequences or fewer; waiting for half a batch left a worker idle
        (docs/benchmarks.md, seventh session).
        """
        free = self.workers.free
        if not free:
            return 0
        quarters = max(self._quarter_batches_queued(lane) for lane in Lane)
        if not self.workers.busy:
            quarters = max(1, quarters)
        return min(free, quarters)

    def _forward_done(
        self, running: _RunningBatch, done: asyncio.Future[tuple[np.ndarray, float]]
    ) -> None:
        worker = running.placement.worker
        del self._running[worker]
        waiting = self._next.pop(worker, None)
        if waiting is None:
            self.workers.release(running.placement)
        else:  # next in the worker's own queue: the placement passes to it
            self._batch_began(done.get_loop(), waiting.batch, running.placement, waiting.job)
        if done.cancelled():  # the engine is stopping
            return
        error = done.exception()
        outputs: tuple[np.ndarray, float] | Exception
        if error is None:
            outputs = done.result()
        elif isinstance(error, Exception):  # delivered to the batch's callers, never raised
            outputs = error
        else:
            outputs = RuntimeError(f"the forward worker raised {error!r}")
        self._finished.append((running, outputs))
        self._wakeup.set()

    def _timed_forward(
        self, ids: list[list[int]], threads: Callable[[], int]
    ) -> tuple[np.ndarray, float]:
        # Timed on the worker: seen from the event loop, the time would include however
        # long the loop took to notice, and under load the drain rate computed from it
        # would fall, refuse more calls, load the loop more, and so on.
        started = time.perf_counter()
        outputs = self._runner.run(ids, threads)
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
        # Batches that ran side by side each took longer than one alone would, and the
        # queue drained at their sum: a share of the time is this batch's.
        self.drain_rate.observe(tokens, running.padded, len(batch), elapsed / running.parallel)
        batch_id, started = running.batch_id, running.started
        for seq, row in zip(batch, rows, strict=True):
            seq.request.deliver(batch_id, started, elapsed, seq.index, row)


@dataclass(frozen=True)
class _NextBatch:
    """A batch queued on a busy worker, behind the batch it runs (``_queue_next_batches``)."""

    batch: list[QueuedSequence]
    # The worker's job, which ``cancel()`` takes back until the worker starts it.
    job: Future[tuple[np.ndarray, float]]

    @property
    def lane(self) -> Lane:
        return self.batch[0].request.lane


@dataclass(frozen=True)
class _RunningBatch:
    """A batch handed to a forward worker, and what finishing it needs."""

    batch_id: int
    batch: list[QueuedSequence]
    padded: int
    started: float
    placement: Placement
    # Batches running when this one started, itself included.
    parallel: int
    span: Span | None

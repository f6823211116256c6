"""Where batches run: forward workers, one thread each, and the CPU threads they share.

On a CPU, torch splits each operator across its threads and waits at the end of every one
for the slowest. The event loop, gRPC and the tokenizer need the same cores, so one batch
on all the threads keeps stopping for whichever thread the kernel paused. Two batches on
two workers with a thread each do not wait for one another. Measured here (2 cores, the
model alone; docs/benchmarks.md, seventh session): +10-27% with the cores to themselves,
+31-42% beside a thread that holds a core 30% of the time.

**One OpenMP team in the process.** torch runs an operator on several threads through an
OpenMP team that belongs to the thread that issued it, and the team's threads live on after
it. Once the process's teams hold more threads than it has CPUs, libgomp stops letting idle
team threads spin and puts them to sleep, and every parallel region then pays a futex wake:
a one-sentence forward on 2 threads took 13 ms instead of 5.5 (tenth session,
docs/benchmarks.md). So exactly one thread ever runs a batch on more than one thread: the
parallel worker, which ``SharedThreads`` holds for every engine of the process (an embedder
and a reranker alike). A batch on it runs on the threads that the other running batches do
not hold, re-read before each layer; every other worker belongs to one engine and runs on
one thread, which needs no team; and the server's main thread never runs
a parallel region (``server.py``). A batch that starts with the parallel worker free goes to
it, so one caller of either model gets every thread and waits no longer than with a single
worker. Each engine has as many workers of its own as batches it may run at once, so that a
batch of one model never waits for the other's. Bookkeeping happens on the event loop only;
the workers just run what they get.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

from embedserve.service.engine.host_memory import HostMemoryTrimmer

log = logging.getLogger(__name__)
T = TypeVar("T")

# The worker index of the one worker that runs batches on more than one thread (module
# docstring); an engine's own workers are 1 and up.
PARALLEL_WORKER = 0


@dataclass(frozen=True)
class Placement:
    """A worker reserved for one batch, and the torch threads the batch may use there
    (0: leave torch's setting alone, as on a GPU)."""

    worker: int
    threads: int


class SharedThreads:
    """The CPU threads that every engine of a process shares, and the parallel worker, the
    one thread that may run a batch on several of them (module docstring).

    The parallel worker's batch runs on the threads that the one-thread batches of every
    engine leave, and at least one, re-read before each layer (``parallel_threads``): a
    batch that starts beside it takes a thread from it at the next layer rather than
    oversubscribing the CPU until it ends, and gives it back when it ends.

    Engines attach when they build their workers and detach when they shut them down; the
    last to detach shuts the parallel worker down, after the batch it runs, if any.
    """

    def __init__(self, cpu_threads: int, nice: int = 0, name: str = "parallel") -> None:
        """``cpu_threads``: torch threads to share (0: not on a CPU). ``nice``: how much
        lower than the event loop every forward thread runs (``_lower_priority``)."""
        self.cpu_threads = cpu_threads
        self.nice = nice
        self.parallel = _executor(f"forward-{name}", nice)
        self._parallel_free = True
        self._one_thread_batches = 0
        self._engines = 0

    @property
    def parallel_threads(self) -> int:
        """The threads for the parallel worker's batch now (0: leave torch's setting alone).
        Written on the event loop, read on the parallel worker: one int, under the GIL."""
        if not self.cpu_threads:
            return 0
        return max(1, self.cpu_threads - self._one_thread_batches)

    def claim_parallel(self) -> bool:
        """Take the parallel worker if no engine holds it; whether this call took it."""
        claimed, self._parallel_free = self._parallel_free, False
        return claimed

    def release_parallel(self) -> None:
        self._parallel_free = True

    def one_thread_batches_started(self, batches: int) -> None:
        self._one_thread_batches += batches

    def one_thread_batch_ended(self) -> None:
        self._one_thread_batches -= 1

    def attach(self) -> None:
        self._engines += 1

    def detach(self) -> None:
        self._engines -= 1
        if self._engines <= 0:
            self.parallel.shutdown(wait=True)


class ForwardWorkers:
    """One engine's forward workers: up to ``count`` of its batches at once, on the shared
    parallel worker when it is free and otherwise on workers of its own."""

    def __init__(
        self,
        name: str,
        count: int,
        threads: SharedThreads,
        host_memory: HostMemoryTrimmer | None = None,
    ) -> None:
        """``host_memory``: trimmed on a worker after a batch, when due (``host_memory.py``)."""
        if count < 1:
            raise ValueError("forward workers must be at least 1")
        self.count = count
        self.threads = threads
        self.host_memory = host_memory
        # Workers 1..count: as many as batches may run, for when another engine holds the
        # parallel worker. Their threads start on first use.
        self._own = [
            _executor(f"forward-{name}-{worker}", threads.nice) for worker in range(1, count + 1)
        ]
        self._free_own = list(range(count, 0, -1))  # descending: popped lowest first
        self._running = 0
        threads.attach()

    @property
    def cpu_threads(self) -> int:
        return self.threads.cpu_threads

    @property
    def free(self) -> int:
        """Batches this engine may start now."""
        return self.count - self._running

    @property
    def busy(self) -> int:
        """This engine's batches running now."""
        return self._running

    def place(self, batches: int) -> list[Placement]:
        """Reserve a worker for each of ``batches`` batches starting now (at most ``free``):
        the parallel worker first when no engine holds it, then this engine's lowest free
        ones. The parallel worker starts with the threads that the batches on one thread
        leave (``SharedThreads``); the others get one each."""
        if not 0 < batches <= self.free:
            raise ValueError(f"cannot place {batches} batches on {self.free} free workers")
        shared = self.threads
        parallel = shared.claim_parallel()
        own = [self._free_own.pop() for _ in range(batches - parallel)]
        shared.one_thread_batches_started(len(own))
        self._running += batches
        one_thread = 1 if shared.cpu_threads else 0
        placements = [Placement(PARALLEL_WORKER, shared.parallel_threads)] if parallel else []
        return placements + [Placement(worker, one_thread) for worker in own]

    def release(self, placement: Placement) -> None:
        self._running -= 1
        if placement.worker == PARALLEL_WORKER:
            self.threads.release_parallel()
        else:
            self.threads.one_thread_batch_ended()
            self._free_own.append(placement.worker)
            self._free_own.sort(reverse=True)

    def thread_count(self, placement: Placement) -> Callable[[], int]:
        """What a batch on ``placement`` reads for its torch threads before each layer."""
        if placement.worker == PARALLEL_WORKER:
            shared = self.threads
            return lambda: shared.parallel_threads
        return lambda: placement.threads

    def run(self, placement: Placement, job: Callable[..., T], *args: object) -> asyncio.Future[T]:
        """Run ``job(*args)`` on the placement's worker; the caller releases the placement.
        Call it on the event loop."""
        return asyncio.wrap_future(self.run_next(placement, job, *args))

    def run_next(self, placement: Placement, job: Callable[..., T], *args: object) -> Future[T]:
        """Queue ``job(*args)`` on the placement's worker, behind the batch it runs now if
        any, so that the worker goes on to it without waiting for the event loop. Until the
        worker starts it, ``cancel()`` on the returned future takes it back."""
        executor = self._executor(placement.worker)
        future = executor.submit(job, *args)
        if self.host_memory is not None and self.host_memory.interval_elapsed():
            # Queued behind the job on the same thread: the job's result does not wait for
            # it, and a batch queued on this worker next starts after it. The resident set
            # is read there too, off the event loop.
            executor.submit(self.host_memory.trim_if_due)
        return future

    def native_ids(self) -> list[int]:
        """The thread ids of the parallel worker and of this engine's own workers (for
        tests and operators: priorities, profiles). Starts any own worker not started yet."""
        executors = [self.threads.parallel, *self._own]
        return [ex.submit(threading.get_native_id).result() for ex in executors]

    def shutdown(self) -> None:
        for executor in self._own:
            executor.shutdown(wait=True)
        self.threads.detach()

    def _executor(self, worker: int) -> ThreadPoolExecutor:
        return self.threads.parallel if worker == PARALLEL_WORKER else self._own[worker - 1]


def _executor(name: str, nice: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(
        1, thread_name_prefix=name, initializer=_lower_priority, initargs=(nice,)
    )


def _lower_priority(nice: int) -> None:
    """Run the calling thread, and the torch worker threads it starts, ``nice`` lower.

    Linux schedules threads, and a thread inherits its creator's nice value: the OpenMP
    team of a forward worker is created by its first forward pass, after this. With the
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

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
docs/benchmarks.md). So exactly one thread ever runs a batch on more than one thread:
worker 0. It takes the threads that running batches do not hold, less one for each other
batch starting with it; every other worker runs on one thread, which needs no team; and the
server's main thread never runs a parallel region (``server.py``). A batch that starts with
worker 0 free goes to it, so one caller gets every thread and waits no longer than with a
single worker. Bookkeeping happens on the event loop only; the workers just run what they
get.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

from embedserve.service.engine.host_memory import HostMemoryTrimmer

log = logging.getLogger(__name__)
T = TypeVar("T")

# The one worker that runs batches on more than one thread (module docstring).
PARALLEL_WORKER = 0


@dataclass(frozen=True)
class Placement:
    """A worker reserved for one batch, and the torch threads the batch may use there
    (0: leave torch's setting alone, as on a GPU)."""

    worker: int
    threads: int


class ForwardWorkers:
    def __init__(
        self,
        name: str,
        count: int,
        cpu_threads: int,
        nice: int = 0,
        host_memory: HostMemoryTrimmer | None = None,
        parallel: bool = True,
    ) -> None:
        """``count`` workers sharing ``cpu_threads`` torch threads (0: not on a CPU).

        ``host_memory``: trimmed on a worker after a batch, when due (``host_memory.py``).
        ``parallel``: whether worker 0 runs batches on several threads. A process's second
        set of workers (a second model's) has none, so that one team stays the only one.
        """
        if count < 1:
            raise ValueError("forward workers must be at least 1")
        self.count = count
        self.cpu_threads = cpu_threads
        self.host_memory = host_memory
        self.parallel = parallel
        self._executors = [
            ThreadPoolExecutor(
                1,
                thread_name_prefix=f"forward-{name}-{index}",
                initializer=_lower_priority,
                initargs=(nice,),
            )
            for index in range(count)
        ]
        self._free = list(range(count - 1, -1, -1))  # descending: popped lowest first
        self._threads_in_use = 0

    @property
    def free(self) -> int:
        return len(self._free)

    @property
    def busy(self) -> int:
        return self.count - len(self._free)

    def place(self, batches: int) -> list[Placement]:
        """Reserve a worker for each of ``batches`` batches starting now (at most ``free``):
        the lowest free ones. Worker 0 gets the threads no running batch holds, less one for
        each other batch starting with it, and at least one; the others get one each."""
        if not 0 < batches <= len(self._free):
            raise ValueError(f"cannot place {batches} batches on {len(self._free)} free workers")
        chosen = [self._free.pop() for _ in range(batches)]
        spare = self.cpu_threads - self._threads_in_use
        placements = []
        for worker in chosen:
            if not self.cpu_threads:
                threads = 0
            elif worker == PARALLEL_WORKER and self.parallel:
                threads = max(1, spare - (batches - 1))
            else:
                threads = 1
            self._threads_in_use += threads
            placements.append(Placement(worker, threads))
        return placements

    def release(self, placement: Placement) -> None:
        self._threads_in_use -= placement.threads
        self._free.append(placement.worker)
        self._free.sort(reverse=True)

    def run(self, placement: Placement, job: Callable[..., T], *args: object) -> asyncio.Future[T]:
        """Run ``job(*args)`` on the placement's worker; the caller releases the placement."""
        loop = asyncio.get_running_loop()
        executor = self._executors[placement.worker]
        future = loop.run_in_executor(executor, job, *args)
        if self.host_memory is not None and self.host_memory.interval_elapsed():
            # Queued behind the job on the same thread: the job's result does not wait for
            # it, and a batch placed on this worker next starts after it. The resident set
            # is read there too, off the event loop.
            executor.submit(self.host_memory.trim_if_due)
        return future

    def native_ids(self) -> list[int]:
        """The workers' thread ids (for tests and operators: priorities, profiles)."""
        return [ex.submit(threading.get_native_id).result() for ex in self._executors]

    def shutdown(self) -> None:
        for executor in self._executors:
            executor.shutdown(wait=True)


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

"""Where batches run: forward workers, one thread each, and the CPU threads they share.

On a CPU, torch splits each operator across its threads and waits at the end of every one
for the slowest. The event loop, gRPC and the tokenizer need the same cores, so one batch
on all the threads keeps stopping for whichever thread the kernel paused. Two batches on
two workers with a thread each do not wait for one another. Measured here (2 cores, the
model alone; docs/benchmarks.md, seventh session): +10-27% with the cores to themselves,
+31-42% beside a thread that holds a core 30% of the time.

A batch that runs alone still gets every thread, so one caller waits no longer than with a
single worker: threads are handed out when a batch starts, from those that running batches
do not hold. Bookkeeping happens on the event loop only; the workers just run what they get.
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

# A forward of fewer padded tokens runs on one torch thread. Issued from a worker thread
# (any but the main one), a forward on two threads pays about 70 us at each of its parallel
# regions, which small batches do not earn back: one 16-token sentence took 12.4 ms on two
# threads and 10.1 ms on one, four took about the same, eight were faster on two
# (docs/benchmarks.md, ninth session).
SMALL_BATCH_TOKENS = 64


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
    ) -> None:
        """``count`` workers sharing ``cpu_threads`` torch threads (0: not on a CPU).

        ``host_memory``: trimmed on a worker after a batch, when due (``host_memory.py``).
        """
        if count < 1:
            raise ValueError("forward workers must be at least 1")
        self.count = count
        self.cpu_threads = cpu_threads
        self.host_memory = host_memory
        self._executors = [
            ThreadPoolExecutor(
                1,
                thread_name_prefix=f"forward-{name}-{index}",
                initializer=_lower_priority,
                initargs=(nice,),
            )
            for index in range(count)
        ]
        self._free = list(range(count - 1, -1, -1))  # popped from the end: worker 0 first
        self._threads_in_use = 0

    @property
    def free(self) -> int:
        return len(self._free)

    @property
    def busy(self) -> int:
        return self.count - len(self._free)

    def place(self, batches: int) -> list[Placement]:
        """Reserve a worker for each of ``batches`` batches starting now (at most ``free``).

        The threads no running batch holds are split evenly among them, at least one each.
        """
        if not 0 < batches <= len(self._free):
            raise ValueError(f"cannot place {batches} batches on {len(self._free)} free workers")
        placements = []
        spare = self.cpu_threads - self._threads_in_use
        for left in range(batches, 0, -1):
            threads = max(1, spare // left) if self.cpu_threads else 0
            spare -= threads
            self._threads_in_use += threads
            placements.append(Placement(self._free.pop(), threads))
        return placements

    @staticmethod
    def threads_for(placement: Placement, padded_tokens: int) -> int:
        """The torch threads a batch of ``padded_tokens`` uses of those it holds."""
        if placement.threads > 1 and padded_tokens < SMALL_BATCH_TOKENS:
            return 1
        return placement.threads

    def release(self, placement: Placement) -> None:
        self._threads_in_use -= placement.threads
        self._free.append(placement.worker)

    def run(self, placement: Placement, job: Callable[..., T], *args: object) -> asyncio.Future[T]:
        """Run ``job(*args)`` on the placement's worker; the caller releases the placement."""
        loop = asyncio.get_running_loop()
        executor = self._executors[placement.worker]
        future = loop.run_in_executor(executor, job, *args)
        if self.host_memory is not None and self.host_memory.due():
            # Queued behind the job on the same thread: the job's result does not wait for
            # it, and a batch placed on this worker next starts after it.
            executor.submit(self.host_memory.trim)
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

"""Tokenization off the event loop, on one thread, overlapping the forward pass.

Jobs that arrive while the thread is busy are handed over together in one hop, so a
burst of small requests costs one thread switch rather than one each.

A small job (a search query, one short sentence) that finds the thread idle runs on the
event loop instead: measured at concurrency 1 (bench/c1_probe.py), one short sentence took
30-40 us to tokenize on the loop, against about 0.2 ms on a thread woken for it plus 0.1 ms
for the two hops. Only while the thread is idle, so the tokenizer is never used by two
threads at once and a burst still goes over in one hop.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")

# Text, in characters, that a job may hold and still run on the event loop: about 128
# tokens, which one encode call handles in well under the cost of a hop to the thread.
INLINE_MAX_CHARS = 512

_Job = tuple[Callable[[], Any], "asyncio.Future[tuple[Any, float]]"]
_Outcome = tuple[Any, BaseException | None, float]


class TokenizerPool:
    def __init__(self, name: str) -> None:
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"tokenize-{name}")
        self._pending: list[_Job] = []
        self._busy = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self.inline_jobs = 0

    async def run(self, job: Callable[[], T], chars: int | None = None) -> tuple[T, float]:
        """Run ``job`` on the tokenizer thread, or at once on the event loop when it is small
        (``chars``, the text it tokenizes, at most ``INLINE_MAX_CHARS``) and the thread is
        idle; returns its result and its duration in seconds."""
        if chars is not None and chars <= INLINE_MAX_CHARS and not self._busy:
            self.inline_jobs += 1
            start = time.perf_counter()
            result = job()
            return result, time.perf_counter() - start
        loop = asyncio.get_running_loop()
        self._loop = loop
        future: asyncio.Future[tuple[Any, float]] = loop.create_future()
        self._pending.append((job, future))
        if not self._busy:
            self._dispatch()
        result, seconds = await future
        return result, seconds

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _dispatch(self) -> None:
        jobs, self._pending = self._pending, []
        self._busy = True
        loop = self._loop
        assert loop is not None

        def finished(outcomes: list[_Outcome]) -> None:
            loop.call_soon_threadsafe(self._complete, jobs, outcomes)

        self._executor.submit(_run_all, jobs).add_done_callback(lambda f: finished(f.result()))

    def _complete(self, jobs: list[_Job], outcomes: list[_Outcome]) -> None:
        self._busy = False
        for (_, future), (result, error, seconds) in zip(jobs, outcomes, strict=True):
            if future.done():  # the caller went away
                continue
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result((result, seconds))
        if self._pending:
            self._dispatch()


def _run_all(jobs: list[_Job]) -> list[_Outcome]:
    outcomes: list[_Outcome] = []
    for job, _ in jobs:
        start = time.perf_counter()
        try:
            outcomes.append((job(), None, time.perf_counter() - start))
        except Exception as exc:  # delivered to its own caller, not to the batch
            outcomes.append((None, exc, time.perf_counter() - start))
    return outcomes

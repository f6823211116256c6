"""Giving freed host memory back to the system while the CPU forward runs.

glibc keeps what a thread frees in that thread's arena, and after the first large free it
raises its mmap threshold, so from then on a forward pass's activations (megabytes each)
come from the arenas. Two forward workers mean several arenas whose free pages lie
scattered between live blocks, where glibc's own trim (the top of a heap only) cannot reach
them. Under a steady stream the resident set then climbs for over a minute before it levels
off: +30% between a 20k-text and a 200k-text bulk run here (docs/benchmarks.md, ninth
session).

``malloc_trim(0)`` returns every whole free page of every arena, but the batches after it
fault those pages back in, and that is what a trim costs: every 200 ms it took 6% of the
bulk throughput here. So a trim waits until it is needed: until the resident set exceeds
what it was after the last trim by the working set of the batches running lately. The
warm-up measures a full batch's; the batches since scale it by their padded tokens (those
running side by side counted together), and never below ``MIN_ALLOWANCE_SHARE`` of it. A
stream of short texts then trims after growing by about 40% of a full batch instead of all
of it, and its peak stays at the warm-up's (a full allowance let a 200k-text run peak 17%
above a 20k-text one: docs/benchmarks.md, seventeenth session), while long batches keep
the allowance they need and do not trim after every batch. A trim runs on a forward worker
after a batch, as a job of its own: the batch's rows do not wait for it. The interval is the
least time between two trims.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)


def _load_malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None where the C library has none (musl, macOS)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None)
    except OSError:
        return None
    trim = getattr(libc, "malloc_trim", None)
    if trim is None:
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim  # type: ignore[no-any-return]


MALLOC_TRIM = _load_malloc_trim()

# The least growth a trim waits for, as a share of a full batch's working set: lower, and a
# bulk stream of short texts trimmed every few seconds and faulted its pages back in (-4% of
# its throughput at 20% here); at 40% it kept its peak at the warm-up's for -1.5%, within
# noise. Engines that share the trimmer each report their own batches; the largest counts.
MIN_ALLOWANCE_SHARE = 0.4
# Batches this recent set the allowance: the largest of the current window and the last one.
RECENT_BATCHES_S = 30.0


def _open_statm() -> int | None:
    try:
        return os.open("/proc/self/statm", os.O_RDONLY)
    except OSError:  # no procfs: trims go by the interval alone
        return None


_STATM = _open_statm()
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def resident_bytes() -> int | None:
    """This process's resident set, from one read of a file kept open (a few microseconds)."""
    if _STATM is None:
        return None
    fields = os.pread(_STATM, 128, 0).split()
    return int(fields[1]) * _PAGE


def peak_resident_bytes() -> int | None:
    """VmHWM: the largest resident set so far."""
    try:
        with open("/proc/self/status", "rb") as status:
            for line in status:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class HostMemoryTrimmer:
    """Trims the C heap when the resident set has grown by ``headroom`` since the last trim,
    at most once every ``interval`` seconds (0: never). Until ``headroom`` is known, every
    interval.

    One a process: ``malloc_trim`` covers every thread's arena, so the engines share it.
    ``interval_elapsed`` reads only the clock and is meant for the event loop;
    ``trim_if_due`` reads the resident set and trims, on a forward worker. The read is a
    system call that lets go of the GIL, and under load the event loop waited up to
    milliseconds to take it back from the forward workers (a py-spy profile at 64 callers
    put 3% of the loop's samples in it). When two workers trim at once, one trims and the
    other returns.
    """

    def __init__(
        self,
        interval: float,
        trim: Callable[[int], int] | None = MALLOC_TRIM,
        rss: Callable[[], int | None] = resident_bytes,
    ) -> None:
        if interval < 0:
            raise ValueError("the trim interval must be 0 or more seconds")
        self.interval = interval
        self._trim = trim if interval > 0 else None
        self._rss = rss
        self._lock = threading.Lock()
        self._next = 0.0
        self.headroom: int | None = None
        # The padded tokens of the batch that measured ``headroom``.
        self.headroom_tokens = 0
        self.floor = 0  # the resident set after the last trim
        # The most padded tokens running at once, in this window of RECENT_BATCHES_S and the
        # one before; written on the event loop, read on the workers (ints, under the GIL).
        self._window_started = 0.0
        self._window_tokens = 0
        self._last_window_tokens = 0
        self.trims = 0
        self.seconds = 0.0
        if interval > 0 and trim is None:
            log.info("this C library has no malloc_trim: freed host memory stays with it")

    @property
    def enabled(self) -> bool:
        return self._trim is not None

    def learn_headroom(self, before: int | None, peak: int | None, tokens: int = 0) -> None:
        """A full batch of ``tokens`` padded tokens took the resident set from ``before`` to
        ``peak``: what a batch of that size needs (the largest of the engines' batches).
        ``tokens`` 0: the allowance stays the whole headroom."""
        if before is None or peak is None or peak <= before:
            return
        if peak - before > (self.headroom or 0):
            self.headroom = peak - before
            self.headroom_tokens = tokens

    def batch_started(self, running_tokens: int) -> None:
        """A batch started with ``running_tokens`` padded tokens running, its own and those
        of the engine's batches beside it. Called on the event loop; reads only the clock."""
        now = time.monotonic()
        if now - self._window_started >= RECENT_BATCHES_S:
            # Two windows back is forgotten: the allowance falls once long batches stop.
            stale = now - self._window_started >= 2 * RECENT_BATCHES_S
            self._last_window_tokens = 0 if stale else self._window_tokens
            self._window_tokens = 0
            self._window_started = now
        self._window_tokens = max(self._window_tokens, running_tokens)

    @property
    def allowance(self) -> int | None:
        """How far past the last trim the resident set may grow before the next: the
        headroom scaled to the batches running lately, at least MIN_ALLOWANCE_SHARE of it.
        None until a warm-up measured the headroom."""
        if self.headroom is None:
            return None
        recent = max(self._window_tokens, self._last_window_tokens)
        if not self.headroom_tokens or not recent:
            return self.headroom
        share = max(MIN_ALLOWANCE_SHARE, recent / self.headroom_tokens)
        return int(self.headroom * share)

    def interval_elapsed(self) -> bool:
        """Whether a trim may be due: the clock alone, no system call."""
        return self._trim is not None and time.monotonic() >= self._next

    def due(self) -> bool:
        if not self.interval_elapsed():
            return False
        allowance = self.allowance
        if allowance is None:
            return True
        rss = self._rss()
        return rss is None or rss > self.floor + allowance

    def trim_if_due(self) -> bool:
        """Trim if the interval has passed and the resident set has grown past the
        allowance; True if this call trimmed."""
        return self.due() and self.trim()

    def trim(self) -> bool:
        """Trim now unless another thread is trimming or just did; True if this call did."""
        if self._trim is None or not self._lock.acquire(blocking=False):
            return False
        try:
            began = time.monotonic()
            if began < self._next:
                return False
            self._trim(0)
            self.floor = self._rss() or 0
            ended = time.monotonic()
            self._next = ended + self.interval
            self.trims += 1
            self.seconds += ended - began
            return True
        finally:
            self._lock.release()

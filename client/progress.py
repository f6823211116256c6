"""A progress bar for long runs: items/s and ETA on a terminal, silence elsewhere."""

from __future__ import annotations

import time
from typing import TextIO

_WIDTH = 24


class Progress:
    def __init__(
        self, total: int, *, done: int = 0, stream: TextIO | None, min_interval: float = 0.2
    ) -> None:
        self.total = total
        self.done = done
        self._stream = stream
        self._start_done = done
        self._started = time.monotonic()
        self._last_render = 0.0
        self._min_interval = min_interval

    def advance(self, count: int) -> None:
        self.done += count
        now = time.monotonic()
        if self._stream is not None and now - self._last_render >= self._min_interval:
            self._last_render = now
            self._render(now)

    def finish(self) -> None:
        if self._stream is not None:
            self._render(time.monotonic())
            self._stream.write("\n")
            self._stream.flush()

    def line(self, now: float) -> str:
        elapsed = max(now - self._started, 1e-9)
        rate = (self.done - self._start_done) / elapsed
        fraction = self.done / self.total if self.total else 1.0
        filled = int(fraction * _WIDTH)
        bar = "#" * filled + "-" * (_WIDTH - filled)
        remaining = self.total - self.done
        eta = _duration(remaining / rate) if rate > 0 else "?"
        return (
            f"[{bar}] {self.done:,}/{self.total:,} {fraction * 100:5.1f}% "
            f"{rate:,.0f} items/s ETA {eta}"
        )

    def _render(self, now: float) -> None:
        assert self._stream is not None
        self._stream.write("\r" + self.line(now) + "\x1b[K")
        self._stream.flush()


def _duration(seconds: float) -> str:
    seconds = int(seconds + 0.5)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"

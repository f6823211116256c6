"""Readiness and draining: which calls are accepted, and how many are still running."""

from __future__ import annotations

import asyncio
import enum


class Phase(enum.Enum):
    STARTING = "starting"  # warming up: health NOT_SERVING, calls refused
    SERVING = "serving"
    DRAINING = "draining"  # health NOT_SERVING; new calls refused, accepted ones finish


class Lifecycle:
    def __init__(self) -> None:
        self.phase = Phase.STARTING
        self._in_flight = 0
        self._quiet = asyncio.Event()
        self._quiet.set()
        self._draining = asyncio.Event()

    @property
    def accepting(self) -> bool:
        return self.phase is Phase.SERVING

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def enter(self) -> None:
        self._in_flight += 1
        self._quiet.clear()

    def leave(self) -> None:
        self._in_flight -= 1
        if self._in_flight == 0:
            self._quiet.set()

    def begin_drain(self) -> None:
        self.phase = Phase.DRAINING
        self._draining.set()

    async def wait_draining(self) -> None:
        await self._draining.wait()

    async def wait_quiet(self) -> None:
        await self._quiet.wait()

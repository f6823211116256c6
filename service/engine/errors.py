"""Why the engine refused or dropped work. The transport maps each to a gRPC code."""

from __future__ import annotations


class EngineError(Exception):
    pass


class Overloaded(EngineError):
    """The lane's queue is full: reject at once so that a proxy can retry elsewhere."""

    def __init__(self, why: str, retry_after_s: float) -> None:
        self.retry_after_s = retry_after_s
        super().__init__(f"{why}; retry later or on another replica")


class NotReady(EngineError):
    """The engine is warming up or has stopped."""


class DeadlineExpired(EngineError):
    pass


class ForwardFailed(EngineError):
    """The device failed a batch (for example out of memory); the server keeps serving."""

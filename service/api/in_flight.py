"""The server's bound on unary calls in progress: past it, a call is refused at once.

Measured on 2 CPU cores (docs/benchmarks.md, "Overload, fifth session"): every call that
reaches Python costs the event loop about 0.4 ms even when it is refused, and that CPU is
taken from torch. A flood that is admitted by the engine's queue bound and refused there
slows every batch; bounded here, by count, the excess is refused before the request is
handled, the calls in progress keep the cores, and their latency stays near its value at
capacity.

Only the unary work calls count (Embed, Rerank). A bulk stream has its own backpressure
and stays one call however long it runs; health checks and server info must answer on a
saturated server, or a busy replica would look dead to its balancer and its kubelet.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Collection
from typing import Any

import grpc

from embedserve.service.api.errors import ApiError, overloaded
from embedserve.service.api.handlers import WrappedHandlers

# CPU replicas: measured at full speed with 32 calls a torch thread in flight; more calls
# only wait longer (docs/benchmarks.md). Envoy's default share a replica matches it.
CALLS_PER_CPU_THREAD = 32
# The RetryInfo delays a refusal may carry. The first is the one Envoy gives for its own
# in-flight limit, so clients back off alike while few are refused.
RETRY_DELAYS_S = (0.1, 0.2, 0.4, 0.8, 1.6, 3.2)
# Refusals a second that the delays aim at: about 4% of a core at 0.4 ms each.
TARGET_REFUSALS_PER_S = 100.0
PACING_WINDOW_S = 1.0


class RetryPacing:
    """The RetryInfo delay of the next refusal, from the refusals of the last window.

    Callers that wait the delay before retrying keep about ``rate x delay`` of them waiting
    (Little's law). A fixed 100 ms let 192 callers past a 64-call limit retry about 1,500
    times a second, and those refusals took half a core from the forward pass: 176-190
    req/s at 256 callers retrying as the Python client does, 318-332 with this (c=256 in
    docs/benchmarks.md, twelfth session). The delay is the shortest of ``RETRY_DELAYS_S``
    that spreads the waiting callers' retries to ``TARGET_REFUSALS_PER_S``; a window
    without refusals brings it back to the first.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self.level = 0
        self._window_start = clock()
        self._count = 0

    @property
    def delay(self) -> float:
        return RETRY_DELAYS_S[self.level]

    def refused(self) -> int:
        """Count one refusal; the index in ``RETRY_DELAYS_S`` of the delay to give it."""
        now = self._clock()
        elapsed = now - self._window_start
        if elapsed >= PACING_WINDOW_S:
            waiting = self._count / elapsed * self.delay
            wanted = waiting / TARGET_REFUSALS_PER_S
            self.level = next(
                (i for i, d in enumerate(RETRY_DELAYS_S) if d >= wanted), len(RETRY_DELAYS_S) - 1
            )
            self._window_start, self._count = now, 0
        self._count += 1
        return self.level


def default_limit(*, on_cuda: bool, cpu_threads: int) -> int:
    """The limit ``--max-calls-in-flight auto`` means. 0: none (on CUDA, not measured yet)."""
    if on_cuda:
        return 0
    return CALLS_PER_CPU_THREAD * max(1, cpu_threads)


def _refusal(limit: int, delay: float) -> ApiError:
    return overloaded(
        f"the server has {limit} calls in progress, its limit; retry after the RetryInfo "
        "delay or on another replica",
        delay,
        {"limit": "max_calls_in_flight", "max_calls_in_flight": str(limit)},
    )


class InFlightLimit(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Counts the calls of ``methods`` ("/package.Service/Method") from the moment their
    handler starts until it returns, and refuses one more past ``limit``.

    A refusal is answered before the request is parsed, with a status built once. The
    layers before it (telemetry, authentication) still see the call: measured against
    running first, which skips them, the difference was within the noise, and a refused
    call then shows in the request metrics and traces like any other.
    """

    def __init__(self, limit: int, methods: Collection[str]) -> None:
        if limit < 1:
            raise ValueError(f"the in-flight limit must be at least 1, got {limit}")
        self.limit = limit
        self.in_flight = 0
        self.refused = 0
        self._methods = frozenset(methods)
        self.pacing = RetryPacing()
        # Built once for each delay: a refusal must cost as little as possible.
        errors = [_refusal(limit, delay) for delay in RETRY_DELAYS_S]
        self._code, self._message = errors[0].code, errors[0].message
        self._metadata = [error.trailing_metadata() for error in errors]
        # No deserializer: a refused request is never parsed.
        self._refusal_handler = grpc.unary_unary_rpc_method_handler(self._refuse)
        self._handlers = WrappedHandlers(self._wrap)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        counted = handler_call_details.method in self._methods
        if counted and self.in_flight >= self.limit:
            return self._refusal_handler
        handler = await continuation(handler_call_details)
        if handler is None or not counted:
            return handler
        return self._handlers.get(handler)

    async def _refuse(self, request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        self.refused += 1
        metadata = self._metadata[self.pacing.refused()]
        await context.abort(self._code, self._message, trailing_metadata=metadata)

    def _wrap(self, handler: Any) -> Any:
        if handler.unary_unary is None:
            return handler
        return grpc.unary_unary_rpc_method_handler(
            self._bounded(handler.unary_unary),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    def _bounded(
        self, inner: Callable[[Any, Any], Awaitable[Any]]
    ) -> Callable[[Any, Any], Awaitable[Any]]:
        async def behavior(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            # Checked again, and counted with no await in between, and counted down in the
            # same coroutine: calls let through together cannot overshoot the limit, and a
            # cancelled or failed call can never keep its slot.
            if self.in_flight >= self.limit:
                await self._refuse(request, context)
            self.in_flight += 1
            try:
                return await inner(request, context)
            finally:
                self.in_flight -= 1

        return behavior

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

from collections.abc import Awaitable, Callable, Collection
from typing import Any

import grpc

from embedserve.service.api.errors import ApiError, overloaded
from embedserve.service.api.handlers import WrappedHandlers

# CPU replicas: measured at full speed with 32 calls a torch thread in flight; more calls
# only wait longer (docs/benchmarks.md). Envoy's default share a replica matches it.
CALLS_PER_CPU_THREAD = 32
# The same answer Envoy gives for its own in-flight limit, so clients back off alike.
RETRY_AFTER_S = 0.1


def default_limit(*, on_cuda: bool, cpu_threads: int) -> int:
    """The limit ``--max-calls-in-flight auto`` means. 0: none (on CUDA, not measured yet)."""
    if on_cuda:
        return 0
    return CALLS_PER_CPU_THREAD * max(1, cpu_threads)


def _refusal(limit: int) -> ApiError:
    return overloaded(
        f"the server has {limit} calls in progress, its limit; retry after the RetryInfo "
        "delay or on another replica",
        RETRY_AFTER_S,
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
        error = _refusal(limit)
        # Built once: a refusal must cost as little as possible, and it never changes.
        self._code, self._message = error.code, error.message
        self._metadata = error.trailing_metadata()
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
        await context.abort(self._code, self._message, trailing_metadata=self._metadata)

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

"""One server interceptor for every embedserve RPC: a SERVER span (joined to the caller's
W3C trace context) and the request metrics, by method and status code."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import grpc
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from embedserve.service.api.handlers import WrappedHandlers
from embedserve.service.telemetry.metrics import ServerMetrics

_TRACED_PREFIX = "/embedserve."
_CODES_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}


class TelemetryInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """``default_models`` maps a service name to the model an empty ``model`` field means."""

    def __init__(
        self,
        tracer: trace.Tracer | None,
        metrics: ServerMetrics | None,
        default_models: Mapping[str, str],
    ) -> None:
        self._tracer = tracer
        self._metrics = metrics
        self._default_models = default_models
        self._handlers: dict[str, WrappedHandlers] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method
        if handler is None or not method.startswith(_TRACED_PREFIX):
            return handler  # health checks and reflection are not traced
        if self._tracer is None and self._metrics is None:
            return handler
        handlers = self._handlers.get(method)
        if handlers is None:
            handlers = self._handlers[method] = WrappedHandlers(_Method(self, method).wrap)
        return handlers.get(handler)


class _Method:
    """What the interceptor adds to one RPC method: its span and its metrics."""

    def __init__(self, owner: TelemetryInterceptor, method: str) -> None:
        self.owner = owner
        self.name = method[1:]
        self.service, _, self.rpc = self.name.partition("/")

    def wrap(self, handler: Any) -> Any:
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self.wrap_unary(handler.unary_unary),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.stream_stream is not None:
            return grpc.stream_stream_rpc_method_handler(
                self.wrap_stream(handler.stream_stream),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler

    def _start(self, context: Any) -> tuple[trace.Span | None, object | None]:
        tracer = self.owner._tracer
        if tracer is None:
            return None, None
        metadata = context.invocation_metadata() or ()
        carrier = {key: value for key, value in metadata if isinstance(value, str)}
        parent = propagate.extract(carrier)
        span = tracer.start_span(
            self.name,
            context=parent,
            kind=SpanKind.SERVER,
            attributes={"rpc.system": "grpc", "rpc.service": self.service, "rpc.method": self.rpc},
        )
        token = otel_context.attach(trace.set_span_in_context(span, parent))
        return span, token

    def _finish(
        self,
        span: trace.Span | None,
        token: object | None,
        code: grpc.StatusCode,
        model: str,
        started: float,
    ) -> None:
        if token is not None:
            otel_context.detach(token)  # type: ignore[arg-type]
        if span is not None:
            span.set_attribute("rpc.grpc.status_code", code.value[0])
            if model:
                span.set_attribute("embedserve.model", model)
            if code is not grpc.StatusCode.OK:
                span.set_status(Status(StatusCode.ERROR, code.name))
            span.end()
        metrics = self.owner._metrics
        if metrics is not None:
            metrics.observe_call(
                model or self.owner._default_models.get(self.service, ""),
                self.rpc,
                code.name,
                time.perf_counter() - started,
            )

    def wrap_unary(
        self, inner: Callable[[Any, Any], Awaitable[Any]]
    ) -> Callable[[Any, Any], Awaitable[Any]]:
        async def behavior(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            started = time.perf_counter()
            span, token = self._start(context)
            code = grpc.StatusCode.UNKNOWN
            model = getattr(request, "model", "")
            try:
                response = await inner(request, context)
                code = grpc.StatusCode.OK
                model = getattr(response, "model", model)
                return response
            except BaseException:
                code = _code_of(context)
                raise
            finally:
                self._finish(span, token, code, model, started)

        return behavior

    def wrap_stream(
        self, inner: Callable[[Any, Any], AsyncIterator[Any]]
    ) -> Callable[[Any, Any], AsyncIterator[Any]]:
        async def behavior(
            requests: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, Any]
        ) -> AsyncIterator[Any]:
            started = time.perf_counter()
            span, token = self._start(context)
            code = grpc.StatusCode.UNKNOWN
            try:
                async for response in inner(requests, context):
                    yield response
                code = grpc.StatusCode.OK
            except BaseException:
                code = _code_of(context)
                raise
            finally:
                self._finish(span, token, code, "", started)

        return behavior


def _code_of(context: Any) -> grpc.StatusCode:
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code
    if isinstance(code, int):
        return _CODES_BY_NUMBER.get(code, grpc.StatusCode.UNKNOWN)
    return grpc.StatusCode.CANCELLED

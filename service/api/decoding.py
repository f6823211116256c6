"""Undecodable request bytes are the client's error: INVALID_ARGUMENT, never UNKNOWN.

grpcio answers a message that fails to parse (garbage bytes, invalid UTF-8 in a string
field) with UNKNOWN. This interceptor, outermost and always on, decodes requests itself
and turns a parse failure into INVALID_ARGUMENT with a BadRequest naming the message.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from embedserve.service.api.errors import FieldViolation, invalid_argument
from embedserve.service.api.handlers import WrappedHandlers


class _Malformed:
    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


class _MalformedStream(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _error(reason: str) -> Any:
    return invalid_argument([FieldViolation("request", f"not a valid message: {reason}")])


async def _abort(context: grpc.aio.ServicerContext[Any, Any], reason: str) -> None:
    error = _error(reason)
    await context.abort(error.code, error.message, trailing_metadata=error.trailing_metadata())


class SafeDecodingInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    def __init__(self) -> None:
        self._handlers = WrappedHandlers(_safe_handler)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        return self._handlers.get(handler)


def _safe_handler(handler: Any) -> Any:
    decode = handler.request_deserializer

    def safe_decode(data: bytes) -> Any:
        try:
            return decode(data)
        except (DecodeError, UnicodeDecodeError, ValueError) as exc:
            return _Malformed(str(exc) or type(exc).__name__)

    kwargs = {
        "request_deserializer": safe_decode,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(_unary(handler.unary_unary), **kwargs)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(_unary_stream(handler.unary_stream), **kwargs)
    if handler.stream_stream is not None:
        return grpc.stream_stream_rpc_method_handler(_streaming(handler.stream_stream), **kwargs)
    return handler


def _unary(inner: Callable[[Any, Any], Awaitable[Any]]) -> Callable[[Any, Any], Awaitable[Any]]:
    async def behavior(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        if isinstance(request, _Malformed):
            await _abort(context, request.reason)
        return await inner(request, context)

    return behavior


def _unary_stream(
    inner: Callable[[Any, Any], AsyncIterator[Any]],
) -> Callable[[Any, Any], AsyncIterator[Any]]:
    async def behavior(
        request: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Any]:
        if isinstance(request, _Malformed):
            await _abort(context, request.reason)
        async for response in inner(request, context):
            yield response

    return behavior


def _streaming(
    inner: Callable[[Any, Any], AsyncIterator[Any]],
) -> Callable[[Any, Any], AsyncIterator[Any]]:
    async def behavior(
        requests: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Any]:
        async def checked() -> AsyncIterator[Any]:
            async for request in requests:
                if isinstance(request, _Malformed):
                    raise _MalformedStream(request.reason)
                yield request

        try:
            async for response in inner(checked(), context):
                yield response
        except _MalformedStream as exc:
            # A corrupt frame breaks the stream's framing contract: end it. The items
            # answered so far stay answered; the client resends the rest.
            await _abort(context, exc.reason)

    return behavior

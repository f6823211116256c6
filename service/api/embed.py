"""EmbedService: unary Embed and the bulk EmbedStream."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from opentelemetry import trace

from embedserve.service import faults
from embedserve.service.api import calls
from embedserve.service.api.accounting import account_each, timing, usage
from embedserve.service.api.calls import Context
from embedserve.service.api.encoding import encode_vectors, finish_vectors
from embedserve.service.api.errors import FieldViolation, invalid_argument, model_not_found
from embedserve.service.api.validation import embed_options
from embedserve.service.engine.work import Lane
from embedserve.service.inference import Scheduling
from embedserve.service.lifecycle import Lifecycle
from embedserve.service.models.tokenization import InputTooLongError, Truncation
from embedserve.service.registry import ModelRegistry, UnknownModel
from embedserve.service.telemetry.metrics import ServerMetrics
from embedserve.v1 import embed_service_pb2, embed_service_pb2_grpc


@dataclass(frozen=True)
class ApiSettings:
    default_truncation: Truncation
    stream_window: int


class EmbedServicer(embed_service_pb2_grpc.EmbedServiceServicer):
    def __init__(
        self,
        registry: ModelRegistry,
        lifecycle: Lifecycle,
        settings: ApiSettings,
        metrics: ServerMetrics | None = None,
    ) -> None:
        self._registry = registry
        self._lifecycle = lifecycle
        self._settings = settings
        self._metrics = metrics

    async def Embed(  # noqa: N802 - the gRPC method name
        self, request: embed_service_pb2.EmbedRequest, context: Context
    ) -> embed_service_pb2.EmbedResponse:
        deadline = calls.absolute_deadline(context)
        return await calls.unary(
            self._lifecycle, context, lambda: self._embed(request, deadline, Lane.INTERACTIVE, "")
        )

    async def EmbedStream(  # noqa: N802
        self,
        request_iterator: AsyncIterator[embed_service_pb2.EmbedStreamRequest],
        context: Context,
    ) -> AsyncIterator[embed_service_pb2.EmbedStreamResponse]:
        refused = calls.refusal(self._lifecycle)
        if refused is not None:
            await calls.abort(context, refused)
        self._lifecycle.enter()
        try:
            if (fault := await faults.before_call()) is not None:  # test-only hooks
                await calls.abort(context, fault)
            stream = _Stream(self, request_iterator, calls.absolute_deadline(context))
            async for response in stream.responses():
                yield response
            if stream.stopped_for_drain:
                # Items already answered stay answered; the client resends the rest.
                await calls.abort(context, calls.unavailable_draining())
        finally:
            self._lifecycle.leave()

    async def _embed(
        self,
        request: embed_service_pb2.EmbedRequest,
        deadline: float | None,
        default_lane: Lane,
        field_prefix: str,
    ) -> embed_service_pb2.EmbedResponse:
        started = time.perf_counter()
        try:
            model = self._registry.embedder(request.model)
        except UnknownModel as exc:
            raise model_not_found(exc, f"{field_prefix}model") from exc
        options = embed_options(
            request,
            model,
            default_truncation=self._settings.default_truncation,
            default_lane=default_lane,
            max_inputs=model.engine.limits.max_inputs_per_request,
            prefix=field_prefix,
        )
        try:
            outcome = await model.embed(
                request.inputs,
                options.instruction,
                options.truncation,
                Scheduling(options.lane, deadline, detailed_trace=not field_prefix),
            )
        except InputTooLongError as exc:
            raise calls.too_long(
                exc, f"{field_prefix}inputs", f"{field_prefix}instruction"
            ) from exc
        if outcome.cached_inputs and not field_prefix:
            span = trace.get_current_span()
            if span.is_recording():
                span.set_attribute("embedserve.cached_inputs", outcome.cached_inputs)
        # After the cache: one cached raw vector serves every dimensions/normalize/encoding.
        vectors = finish_vectors(outcome.values, options.dimensions, options.normalize)
        return embed_service_pb2.EmbedResponse(
            model=model.name,
            embeddings=account_each(encode_vectors(vectors, options.encoding), outcome),
            usage=usage(outcome, len(request.inputs)),
            timing=timing(outcome, started),
        )


class _Stream:
    """One EmbedStream call: a reader bounded by the window, one task an item.

    A window slot is held from reading an item until its response has been sent, so a
    client that stops reading responses stops the server reading its requests too.
    """

    def __init__(
        self,
        servicer: EmbedServicer,
        requests: AsyncIterator[embed_service_pb2.EmbedStreamRequest],
        deadline: float | None,
    ) -> None:
        self._servicer = servicer
        self._requests = requests
        self._deadline = deadline
        self._window = asyncio.Semaphore(servicer._settings.stream_window)
        self._out: asyncio.Queue[embed_service_pb2.EmbedStreamResponse | None] = asyncio.Queue()
        self._active_ids: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.stopped_for_drain = False
        # Per-item work is aggregated on the stream's span: a million items must not
        # make a million spans.
        self._items = self._failed_items = self._inputs = self._tokens = self._cached = 0

    async def responses(self) -> AsyncIterator[embed_service_pb2.EmbedStreamResponse]:
        reader = asyncio.ensure_future(self._read())
        try:
            while (response := await self._out.get()) is not None:
                yield response
                self._window.release()
            await reader  # re-raises a broken request stream
        finally:
            span = trace.get_current_span()
            if span.is_recording():
                span.set_attributes(
                    {
                        "embedserve.stream.items": self._items,
                        "embedserve.stream.failed_items": self._failed_items,
                        "embedserve.stream.inputs": self._inputs,
                        "embedserve.stream.input_tokens": self._tokens,
                        "embedserve.stream.cached_inputs": self._cached,
                    }
                )
            reader.cancel()
            for task in self._tasks:
                task.cancel()  # the client went away: drop its queued work

    async def _read(self) -> None:
        lifecycle = self._servicer._lifecycle
        iterator = self._requests.__aiter__()
        try:
            while True:
                await self._window.acquire()
                if not lifecycle.accepting:
                    self.stopped_for_drain = True
                    return
                next_item = asyncio.ensure_future(iterator.__anext__())
                draining = asyncio.ensure_future(lifecycle.wait_draining())
                await asyncio.wait({next_item, draining}, return_when=asyncio.FIRST_COMPLETED)
                draining.cancel()
                if not next_item.done():
                    next_item.cancel()
                    self.stopped_for_drain = True
                    return
                try:
                    item = next_item.result()
                except StopAsyncIteration:
                    return
                task = asyncio.ensure_future(self._serve(item))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        finally:
            if self._tasks:
                await asyncio.gather(*list(self._tasks), return_exceptions=True)
            self._out.put_nowait(None)

    async def _serve(self, item: embed_service_pb2.EmbedStreamRequest) -> None:
        item_id = item.id
        owns_id = False
        try:
            if not item_id:
                raise invalid_argument([FieldViolation("id", "must not be empty")])
            if item_id in self._active_ids:
                raise invalid_argument(
                    [FieldViolation("id", f"{item_id!r} is already in flight on this stream")]
                )
            self._active_ids.add(item_id)
            owns_id = True
            result = await self._servicer._embed(
                item.request, self._deadline, Lane.BULK, "request."
            )
            response = embed_service_pb2.EmbedStreamResponse(id=item_id, result=result)
            model, outcome = result.model, "OK"
            self._inputs += result.usage.inputs
            self._tokens += result.usage.input_tokens
            self._cached += result.usage.cached_inputs
        except Exception as exc:
            error = calls.api_error(exc)
            response = embed_service_pb2.EmbedStreamResponse(id=item_id, error=error.to_status())
            model = item.request.model or self._servicer._registry.default_embedder
            outcome = error.code.name
            self._failed_items += 1
        finally:
            if owns_id:
                self._active_ids.discard(item_id)
        self._items += 1
        metrics = self._servicer._metrics
        if metrics is not None:
            metrics.stream_items.labels(model, outcome).inc()
        self._out.put_nowait(response)

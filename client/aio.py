"""The asyncio client: the one implementation of calls, retries and bulk.

The synchronous ``Client`` runs this same code on a private event loop thread, so both
surfaces behave identically.
"""

from __future__ import annotations

import asyncio
import random
import re
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind

from embedserve.client.coalesce import Coalescer
from embedserve.client.errors import BulkItemError, EmbedServeError, from_rpc_error, from_status
from embedserve.client.results import (
    Embeddings,
    Ranking,
    ServerInfo,
    decode_embeddings,
    decode_ranking,
)
from embedserve.client.retry import RetryPolicy
from embedserve.v1 import (
    common_pb2,
    embed_service_pb2,
    embed_service_pb2_grpc,
    info_service_pb2,
    info_service_pb2_grpc,
    rerank_service_pb2,
    rerank_service_pb2_grpc,
)

T = TypeVar("T")
EncodingName = Literal["float32", "float32_bytes", "int8", "binary"]
TruncationName = Literal["error", "end", "start"]
InputTypeName = Literal["query", "document"]

ENCODINGS: dict[str, common_pb2.Encoding.ValueType] = {
    "float32": common_pb2.ENCODING_FLOAT32,
    "float32_bytes": common_pb2.ENCODING_FLOAT32_BYTES,
    "int8": common_pb2.ENCODING_INT8,
    "binary": common_pb2.ENCODING_BINARY,
}
TRUNCATIONS: dict[str, common_pb2.TruncationPolicy.ValueType] = {
    "error": common_pb2.TRUNCATION_POLICY_ERROR,
    "end": common_pb2.TRUNCATION_POLICY_END,
    "start": common_pb2.TRUNCATION_POLICY_START,
}
INPUT_TYPES: dict[str, embed_service_pb2.InputType.ValueType] = {
    "query": embed_service_pb2.INPUT_TYPE_QUERY,
    "document": embed_service_pb2.INPUT_TYPE_DOCUMENT,
}
# Larger than the server's default message limit, so the server's limit is the one that bites.
DEFAULT_CHANNEL_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
)
_UNSET: Any = object()
_EMBED = "embedserve.v1.EmbedService/Embed"
_INPUT_FIELD = re.compile(r"^request\.inputs\[(\d+)\]$")


@dataclass(frozen=True)
class EmbedOptions:
    """Per-call embedding options; a client holds defaults for each."""

    model: str = ""
    instruction: str | None = None
    input_type: InputTypeName | None = None
    dimensions: int | None = None
    normalize: bool | None = None
    encoding: EncodingName = "float32_bytes"
    truncation: TruncationName | None = None

    def request(self, texts: Sequence[str]) -> embed_service_pb2.EmbedRequest:
        request = embed_service_pb2.EmbedRequest(
            model=self.model, inputs=texts, encoding=ENCODINGS[self.encoding]
        )
        if self.instruction is not None:
            request.instruction = self.instruction
        if self.input_type is not None:
            request.input_type = INPUT_TYPES[self.input_type]
        if self.dimensions is not None:
            request.dimensions = self.dimensions
        if self.normalize is not None:
            request.normalize = self.normalize
        if self.truncation is not None:
            request.truncation = TRUNCATIONS[self.truncation]
        return request


@dataclass(frozen=True)
class BulkItem:
    """One input of ``embed_bulk``: its vector, or (when errors are collected) its error."""

    index: int
    vector: np.ndarray | None
    error: EmbedServeError | None = None


def channel_credentials(
    root_certificates: bytes | None,
    private_key: bytes | None = None,
    certificate_chain: bytes | None = None,
) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(root_certificates, private_key, certificate_chain)


class AsyncClient:
    """embedserve over grpc.aio. Use as ``async with AsyncClient("host:port") as client``.

    Args:
        target: ``host:port``.
        timeout: default deadline of a call, in seconds (retries included); None for none.
        tls: use TLS; ``root_certificates`` (PEM) overrides the system roots, and
            ``private_key``/``certificate_chain`` present a client certificate (mTLS).
        metadata: sent with every call, for example ``[("authorization", "Bearer KEY")]``.
        channel_options: extra gRPC channel options (keepalive, message sizes, ...).
        retry: the retry policy for unary calls and for reopening bulk streams.
        defaults: default embedding options for every call.
        coalesce: merge ``embed`` calls made at the same time with the same options and
            timeout into one call of up to ``coalesce_max_inputs`` texts (see
            ``embedserve.client.coalesce``). For services that embed a text or two a request,
            many requests at a time: the server pays its per-call cost once a merged call.
            Needs a server that reports usage an input (`Embedding.input_tokens`).
    """

    def __init__(
        self,
        target: str,
        *,
        timeout: float | None = 30.0,
        tls: bool = False,
        root_certificates: bytes | None = None,
        private_key: bytes | None = None,
        certificate_chain: bytes | None = None,
        metadata: Sequence[tuple[str, str]] = (),
        channel_options: Sequence[tuple[str, Any]] = (),
        retry: RetryPolicy | None = None,
        defaults: EmbedOptions | None = None,
        tracer_provider: trace.TracerProvider | None = None,
        coalesce: bool = False,
        coalesce_max_inputs: int = 64,
    ) -> None:
        # First: a bad coalesce_max_inputs fails before a channel exists.
        self._coalescer = (
            Coalescer(self._send_merged_embed, coalesce_max_inputs) if coalesce else None
        )
        options = [*DEFAULT_CHANNEL_OPTIONS, *channel_options]
        if tls or root_certificates is not None or private_key is not None:
            credentials = channel_credentials(root_certificates, private_key, certificate_chain)
            self._channel = grpc.aio.secure_channel(target, credentials, options=options)
        else:
            self._channel = grpc.aio.insecure_channel(target, options=options)
        self.target = target
        self.timeout = timeout
        self.retry = retry or RetryPolicy()
        self.defaults = defaults or EmbedOptions()
        self._metadata = tuple(metadata)
        self._embed = embed_service_pb2_grpc.EmbedServiceStub(self._channel)
        self._rerank = rerank_service_pb2_grpc.RerankServiceStub(self._channel)
        self._info = info_service_pb2_grpc.InfoServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._rng = random.Random()
        # The global provider unless one is given: no-op spans when the application has
        # not configured OpenTelemetry.
        self._tracer = trace.get_tracer("embedserve.client", tracer_provider=tracer_provider)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._coalescer is not None:
            await self._coalescer.close()
        await self._channel.close(grace=None)

    # -- unary calls -----------------------------------------------------------------

    async def embed(
        self,
        texts: Sequence[str],
        *,
        timeout: float | None = _UNSET,
        **options: Any,
    ) -> Embeddings:
        """Embed ``texts`` in one call. ``options`` override the client's EmbedOptions
        (model, instruction, input_type, dimensions, normalize, encoding, truncation)."""
        chosen = self._options(options)
        if self._coalescer is not None:
            deadline = self.timeout if timeout is _UNSET else timeout
            return await self._coalescer.embed(
                (chosen, deadline), chosen.request, list(texts), deadline
            )
        response = await self._unary(
            _EMBED, self._embed.Embed, chosen.request(list(texts)), timeout
        )
        return decode_embeddings(response)

    async def _send_merged_embed(
        self,
        request: embed_service_pb2.EmbedRequest,
        timeout: float | None,
        calls: int,
        links: Sequence[trace.Link],
    ) -> embed_service_pb2.EmbedResponse:
        return await self._unary(
            _EMBED,
            self._embed.Embed,
            request,
            timeout,
            links=links,
            attributes={"embedserve.client.merged_calls": calls},
        )

    async def rerank(
        self,
        query: str,
        documents: Sequence[str],
        *,
        top_n: int | None = None,
        return_documents: bool = False,
        instruction: str | None = None,
        model: str = "",
        truncation: TruncationName | None = None,
        timeout: float | None = _UNSET,
    ) -> Ranking:
        request = rerank_service_pb2.RerankRequest(
            model=model, query=query, documents=list(documents), return_documents=return_documents
        )
        if top_n is not None:
            request.top_n = top_n
        if instruction is not None:
            request.instruction = instruction
        if truncation is not None:
            request.truncation = TRUNCATIONS[truncation]
        return decode_ranking(
            await self._unary(
                "embedserve.v1.RerankService/Rerank", self._rerank.Rerank, request, timeout
            )
        )

    async def info(self, *, timeout: float | None = _UNSET) -> ServerInfo:
        request = info_service_pb2.GetServerInfoRequest()
        response: ServerInfo = await self._unary(
            "embedserve.v1.InfoService/GetServerInfo", self._info.GetServerInfo, request, timeout
        )
        return response

    async def health(self, service: str = "", *, timeout: float | None = _UNSET) -> bool:
        """True when the server (or one of its services) answers SERVING."""
        request = health_pb2.HealthCheckRequest(service=service)
        reply = await self._unary(
            "grpc.health.v1.Health/Check", self._health.Check, request, timeout
        )
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

    async def _unary(
        self,
        rpc: str,
        method: Callable[..., Awaitable[T]],
        request: Any,
        timeout: float | None,
        *,
        links: Sequence[trace.Link] = (),
        attributes: dict[str, int] | None = None,
    ) -> T:
        with self._tracer.start_as_current_span(
            rpc,
            kind=SpanKind.CLIENT,
            attributes={**_rpc_attributes(rpc), **(attributes or {})},
            links=links,
        ) as span:
            metadata = self._traced_metadata(span)
            try:
                return await self._with_retries(
                    lambda remaining: method(request, timeout=remaining, metadata=metadata),
                    self.timeout if timeout is _UNSET else timeout,
                )
            except EmbedServeError as exc:
                span.set_attribute("rpc.grpc.status_code", exc.code.value[0])
                raise

    def _traced_metadata(self, span: trace.Span) -> tuple[tuple[str, str], ...]:
        """The call's metadata with the W3C trace context of ``span`` injected."""
        if not span.get_span_context().is_valid:
            return self._metadata
        carrier: dict[str, str] = {}
        propagate.inject(carrier, context=trace.set_span_in_context(span))
        return (*self._metadata, *carrier.items())

    async def _with_retries(
        self, attempt_call: Callable[[float | None], Awaitable[T]], timeout: float | None
    ) -> T:
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        attempt = 0
        retried_after: EmbedServeError | None = None
        while True:
            attempt += 1
            remaining = None if deadline is None else deadline - loop.time()
            try:
                return await attempt_call(remaining)
            except grpc.aio.AioRpcError as exc:
                error = from_rpc_error(exc)
                if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED and retried_after is not None:
                    # A retry that ran out of the call's time: the deadline is the verdict, and
                    # the error that made the client retry says why the time ran out.
                    raise error from retried_after
                if (
                    exc.code() not in self.retry.retryable_codes
                    or attempt >= self.retry.max_attempts
                ):
                    raise error from None
                delay = self.retry.delay(attempt, error.retry_after, self._rng)
                if deadline is not None and loop.time() + delay >= deadline:
                    raise error from None  # the deadline stops retrying
                await asyncio.sleep(delay)
                if deadline is not None and loop.time() >= deadline:
                    raise error from None  # the sleep overran the deadline: no attempt left
                retried_after = error

    def _options(self, overrides: dict[str, Any]) -> EmbedOptions:
        unknown = set(overrides) - set(EmbedOptions.__dataclass_fields__)
        if unknown:
            raise TypeError(f"unknown embed options: {', '.join(sorted(unknown))}")
        if not overrides:
            return self.defaults
        merged = {**self.defaults.__dict__, **overrides}
        return EmbedOptions(**merged)

    # -- bulk --------------------------------------------------------------------------

    async def embed_bulk(
        self,
        texts: Iterable[str] | AsyncIterable[str],
        *,
        batch_size: int = 64,
        max_in_flight: int = 8,
        raise_on_error: bool = True,
        retry: RetryPolicy | None = None,
        **options: Any,
    ) -> AsyncIterator[BulkItem]:
        """Embed any iterable of texts over EmbedStream; yield one BulkItem an input, in order.

        At most ``max_in_flight`` messages of ``batch_size`` texts are sent and not yet
        yielded, so memory stays bounded however long the input is. If the stream breaks,
        the unanswered messages go out again on a new stream (with ``retry``, default the
        client's policy): nothing is lost or duplicated. A failed input raises
        BulkItemError, or with ``raise_on_error=False`` is yielded with its error.
        """
        async for chunk in self.embed_bulk_chunks(
            texts,
            batch_size=batch_size,
            max_in_flight=max_in_flight,
            raise_on_error=raise_on_error,
            retry=retry,
            **options,
        ):
            for item in chunk:
                yield item

    async def embed_bulk_chunks(
        self,
        texts: Iterable[str] | AsyncIterable[str],
        *,
        batch_size: int = 64,
        max_in_flight: int = 8,
        raise_on_error: bool = True,
        retry: RetryPolicy | None = None,
        **options: Any,
    ) -> AsyncIterator[list[BulkItem]]:
        """Like embed_bulk, one list of consecutive items at a time (fewer Python objects)."""
        if batch_size < 1 or max_in_flight < 1:
            raise ValueError("batch_size and max_in_flight must be at least 1")
        bulk = _Bulk(
            self, texts, batch_size, max_in_flight, retry or self.retry, self._options(options)
        )
        async for chunk in bulk.run():
            if raise_on_error:
                for item in chunk:
                    if item.error is not None:
                        raise BulkItemError(item.index, item.error)
            yield chunk


class _Bulk:
    """The state of one embed_bulk run: messages sent and not answered, answers not yet
    yielded, and the order in which to yield them. Keys are each message's first index,
    which is also its stream id."""

    def __init__(
        self,
        client: AsyncClient,
        texts: Iterable[str] | AsyncIterable[str],
        batch_size: int,
        window: int,
        retry: RetryPolicy,
        options: EmbedOptions,
    ) -> None:
        self._client = client
        self._source = _aiter(texts)
        self._batch_size = batch_size
        self._window = window
        self._retry = retry
        self._options = options
        self._texts: dict[int, list[str]] = {}  # unanswered messages
        self._answers: dict[int, list[BulkItem]] = {}  # answered, waiting for their turn
        self._to_send: deque[int] = deque()
        self._next_start = 0  # index of the next input to read
        self._next_yield = 0  # index of the next input to yield
        self._exhausted = False
        self._wakeup = asyncio.Event()
        # Which stream is current. grpc.aio may leave the request generator of a dead
        # stream suspended; a stale generator must never read or send again.
        self._generation = 0

    def _in_window(self) -> int:
        return len(self._texts) + len(self._answers)

    async def run(self) -> AsyncIterator[list[BulkItem]]:
        failures = 0
        rng = random.Random()
        while not (self._exhausted and not self._texts and not self._answers):
            # A new stream resends every unanswered message, oldest first.
            self._to_send = deque(sorted(self._texts))
            self._generation += 1
            self._wakeup.set()  # stale generators wake up and leave
            span = self._client._tracer.start_span(
                _STREAM_RPC, kind=SpanKind.CLIENT, attributes=_rpc_attributes(_STREAM_RPC)
            )
            call = self._client._embed.EmbedStream(
                self._requests(self._generation), metadata=self._client._traced_metadata(span)
            )
            try:
                async for response in call:
                    failures = 0
                    self._receive(response)
                    while self._next_yield in self._answers:
                        chunk = self._answers.pop(self._next_yield)
                        self._next_yield += len(chunk)
                        self._wakeup.set()
                        yield chunk
                if self._texts or not self._exhausted:
                    raise _StreamEnded()
            except (grpc.aio.AioRpcError, _StreamEnded) as exc:
                code = (
                    _stream_failure_code(exc)
                    if isinstance(exc, grpc.aio.AioRpcError)
                    else grpc.StatusCode.UNAVAILABLE
                )
                failures += 1
                if code not in self._retry.retryable_codes or failures >= self._retry.max_attempts:
                    if isinstance(exc, grpc.aio.AioRpcError):
                        raise from_rpc_error(exc) from None
                    raise EmbedServeError(code, "the stream ended with items unanswered") from None
                hint = (
                    from_rpc_error(exc).retry_after
                    if isinstance(exc, grpc.aio.AioRpcError)
                    else None
                )
                await asyncio.sleep(self._retry.delay(failures, hint, rng))
            finally:
                call.cancel()
                span.end()

    def _receive(self, response: embed_service_pb2.EmbedStreamResponse) -> None:
        start = int(response.id)
        texts = self._texts.pop(start, None)
        if texts is None:
            return  # an answer to a message resent on this stream: already handled
        if response.HasField("result"):
            vectors = decode_embeddings(response.result).vectors
            self._answers[start] = [BulkItem(start + i, vectors[i]) for i in range(len(texts))]
            return
        error = from_status(response.error)
        bad = {
            int(m.group(1))
            for v in error.violations
            if (m := _INPUT_FIELD.match(v.field)) is not None
        }
        if len(texts) > 1 and bad and len(bad) < len(texts):
            # One bad input fails its whole message; resend the others one by one so
            # that a bad input fails alone.
            for i, text in enumerate(texts):
                self._texts[start + i] = [text]
                self._to_send.append(start + i)
            self._wakeup.set()
            return
        self._answers[start] = [BulkItem(start + i, None, error) for i in range(len(texts))]

    async def _requests(
        self, generation: int
    ) -> AsyncIterator[embed_service_pb2.EmbedStreamRequest]:
        while generation == self._generation:
            if self._to_send:
                start = self._to_send.popleft()
                if start in self._texts:
                    yield self._message(start)
                continue
            if self._exhausted:
                if not self._texts:
                    return  # half-close: everything is answered
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            if self._in_window() >= self._window:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            batch = await self._read_batch()
            if generation != self._generation:
                # The stream died while reading: keep the batch for the next one.
                self._hold_back(batch)
                return
            if not batch:
                self._exhausted = True
                continue
            start = self._next_start
            self._next_start += len(batch)
            self._texts[start] = batch
            yield self._message(start)

    def _hold_back(self, batch: list[str]) -> None:
        if batch:
            start = self._next_start
            self._next_start += len(batch)
            self._texts[start] = batch
            self._to_send.append(start)
        else:
            self._exhausted = True

    def _message(self, start: int) -> embed_service_pb2.EmbedStreamRequest:
        return embed_service_pb2.EmbedStreamRequest(
            id=str(start), request=self._options.request(self._texts[start])
        )

    async def _read_batch(self) -> list[str]:
        batch: list[str] = []
        async for text in self._source:
            batch.append(text)
            if len(batch) >= self._batch_size:
                break
        return batch


_STREAM_RPC = "embedserve.v1.EmbedService/EmbedStream"


# What grpc says, as INTERNAL, when a stream is reset in transit: the RST_STREAM itself, or
# this client's next write onto the reset stream failing inside grpc's core (the message is
# grpc.aio's own, never a server's).
_TRANSPORT_RESET_DETAILS = ("RST_STREAM", "Internal error from Core")


def _stream_failure_code(exc: grpc.aio.AioRpcError) -> grpc.StatusCode:
    """A stream reset in transit (a proxy's upstream died) is reported as INTERNAL by grpc,
    but it is a broken connection, not the server's verdict: resuming resends only
    unanswered items of a pure function, so it counts as UNAVAILABLE."""
    code = exc.code()
    details = exc.details() or ""
    if code is grpc.StatusCode.INTERNAL and any(s in details for s in _TRANSPORT_RESET_DETAILS):
        return grpc.StatusCode.UNAVAILABLE
    return code


def _rpc_attributes(rpc: str) -> dict[str, str]:
    service, _, method = rpc.partition("/")
    return {"rpc.system": "grpc", "rpc.service": service, "rpc.method": method}


class _StreamEnded(Exception):
    """The server closed the stream cleanly with messages unanswered (treated as UNAVAILABLE)."""


def _aiter(texts: Iterable[str] | AsyncIterable[str]) -> AsyncIterator[str]:
    if isinstance(texts, AsyncIterable):
        return aiter(texts)

    async def from_sync() -> AsyncIterator[str]:
        for text in texts:
            yield text

    return from_sync()

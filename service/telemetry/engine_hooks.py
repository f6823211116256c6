"""What the engine reports: queue spans, batch spans linked to every request they served,
and batch metrics. Every method is a no-op when tracing and metrics are both off."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Link, Span, SpanKind, Status, StatusCode

from embedserve.service.engine.work import QueuedSequence, WorkRequest

if TYPE_CHECKING:
    from embedserve.service.telemetry.metrics import ServerMetrics


class EngineTelemetry:
    def __init__(
        self,
        model: str,
        device: str,
        tracer: trace.Tracer | None,
        metrics: ServerMetrics | None,
    ) -> None:
        self.model = model
        self.device = device
        self.tracer = tracer
        self.metrics = metrics

    @contextmanager
    def span(self, name: str, enabled: bool, **attributes: Any) -> Iterator[Span | None]:
        """A child span of the current one, when tracing is on and ``enabled``."""
        if self.tracer is None or not enabled:
            yield None
            return
        with self.tracer.start_as_current_span(name, attributes=attributes) as span:
            yield span

    def request_queued(self, request: WorkRequest, detailed: bool) -> None:
        if self.tracer is None:
            return
        request.trace_context = otel_context.get_current()
        if detailed:
            request.queue_span = self.tracer.start_span(
                "queue",
                context=request.trace_context,
                attributes={
                    "embedserve.model": self.model,
                    "embedserve.lane": request.lane.value,
                    "embedserve.sequences": len(request.sequences),
                    "embedserve.tokens": request.queued_tokens,
                },
            )

    def request_dropped(self, request: WorkRequest, reason: str) -> None:
        span = request.queue_span
        if span is not None:
            span.set_status(Status(StatusCode.ERROR, reason))
            span.end()
            request.queue_span = None

    def batch_started(
        self, batch: list[QueuedSequence], padded_tokens: int, threads: int = 0
    ) -> Span | None:
        """``threads``: the torch threads the batch got on the CPU (0: not on a CPU)."""
        if self.tracer is None:
            return None
        requests: dict[int, WorkRequest] = {}
        for seq in batch:
            requests.setdefault(id(seq.request), seq.request)
        links: dict[int, Link] = {}
        for request in requests.values():
            if request.queue_span is not None:
                request.queue_span.end()
                request.queue_span = None
            if request.trace_context is not None:
                served = trace.get_current_span(request.trace_context).get_span_context()
                if served.is_valid:
                    links.setdefault(served.span_id, Link(served))
        first = next(iter(requests.values()))
        tokens = sum(seq.length for seq in batch)
        # A child of the oldest request it serves, so that request's trace shows it; the
        # links name every request (stream) span it served, once each.
        return self.tracer.start_span(
            "batch",
            context=first.trace_context,
            kind=SpanKind.INTERNAL,
            links=list(links.values()),
            attributes={
                "embedserve.model": self.model,
                "embedserve.device": self.device,
                "embedserve.batch.size": len(batch),
                "embedserve.batch.requests": len(requests),
                "embedserve.batch.tokens": tokens,
                "embedserve.batch.padded_tokens": padded_tokens,
                "embedserve.batch.padding_ratio": 1 - tokens / padded_tokens
                if padded_tokens
                else 0.0,
                **({"embedserve.batch.threads": threads} if threads else {}),
            },
        )

    def batch_finished(
        self,
        span: Span | None,
        batch: list[QueuedSequence],
        padded_tokens: int,
        seconds: float,
        error: BaseException | None = None,
    ) -> None:
        if self.metrics is not None and error is None:
            tokens = sum(seq.length for seq in batch)
            self.metrics.observe_batch(self.model, len(batch), tokens, padded_tokens, seconds)
        if span is not None:
            if error is not None:
                span.record_exception(error)
                span.set_status(Status(StatusCode.ERROR, type(error).__name__))
            span.end()

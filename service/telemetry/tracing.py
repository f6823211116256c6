"""OpenTelemetry tracing, configured by the standard OTEL_* environment variables.

With nothing configured there is no tracer at all: the hot path checks ``tracer is None``
and does no span work, no context extraction and no exporter exists.

Honoured variables: OTEL_SDK_DISABLED; OTEL_TRACES_EXPORTER (otlp, console or none; otlp
is chosen when an OTLP endpoint is set); OTEL_EXPORTER_OTLP_PROTOCOL and
OTEL_EXPORTER_OTLP_TRACES_PROTOCOL (grpc, http/protobuf); OTEL_EXPORTER_OTLP_ENDPOINT and
OTEL_EXPORTER_OTLP_TRACES_ENDPOINT; OTEL_TRACES_SAMPLER and OTEL_TRACES_SAMPLER_ARG;
OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES; OTEL_BSP_* for the batch processor.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass

from opentelemetry import trace
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
)

log = logging.getLogger(__name__)

INSTRUMENTATION = "embedserve"


@dataclass
class Tracing:
    provider: TracerProvider
    tracer: trace.Tracer

    def shutdown(self) -> None:
        self.provider.shutdown()


def exporter_name(environ: Mapping[str, str]) -> str:
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return "none"
    explicit = environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if explicit:
        return explicit.split(",")[0].strip()
    if environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or environ.get(
        "OTEL_EXPORTER_OTLP_ENDPOINT"
    ):
        return "otlp"
    return "none"


def _exporter(name: str, environ: Mapping[str, str]) -> SpanExporter:
    if name == "console":
        return ConsoleSpanExporter()
    if name != "otlp":
        raise ValueError(f"OTEL_TRACES_EXPORTER={name!r}: supported are otlp, console and none")
    protocol = (
        environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "grpc"
    ).strip()
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter()  # reads the endpoint, headers and TLS settings itself
    if protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
            OTLPSpanExporter as HttpExporter,
        )

        return HttpExporter()
    raise ValueError(f"OTLP protocol {protocol!r}: supported are grpc and http/protobuf")


def from_environment(service_name: str, environ: Mapping[str, str] | None = None) -> Tracing | None:
    """The server's tracing, or None when no exporter is configured (the default)."""
    environ = os.environ if environ is None else environ
    name = exporter_name(environ)
    if name == "none":
        return None
    resource = Resource.create({SERVICE_NAME: environ.get("OTEL_SERVICE_NAME", service_name)})
    # The sampler comes from OTEL_TRACES_SAMPLER(_ARG); the default is parent-based
    # always-on, so a caller's sampling decision is respected.
    provider = TracerProvider(resource=resource)
    exporter = _exporter(name, environ)
    processor = SimpleSpanProcessor(exporter) if name == "console" else BatchSpanProcessor(exporter)
    provider.add_span_processor(processor)
    log.info(
        "tracing on",
        extra={"exporter": name, "service_name": resource.attributes.get(SERVICE_NAME)},
    )
    return Tracing(provider, provider.get_tracer(INSTRUMENTATION))


class TraceContextFilter(logging.Filter):
    """Adds the current trace id and span id to every log record made inside a span."""

    def filter(self, record: logging.LogRecord) -> bool:
        context = trace.get_current_span().get_span_context()
        if context.is_valid:
            record.trace_id = format(context.trace_id, "032x")
            record.span_id = format(context.span_id, "016x")
        return True

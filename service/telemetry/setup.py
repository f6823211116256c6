"""Building the server's telemetry from its configuration and the OTEL_* environment."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from opentelemetry import trace

from embedserve.service import __version__
from embedserve.service.models.base import ModelAdapter
from embedserve.service.telemetry.engine_hooks import EngineTelemetry
from embedserve.service.telemetry.metrics import ServerMetrics
from embedserve.service.telemetry.tracing import TraceContextFilter, Tracing, from_environment

SERVICE_NAME = "embedserve"


@dataclass(frozen=True)
class Telemetry:
    tracing: Tracing | None
    metrics: ServerMetrics | None

    @classmethod
    def create(cls, *, metrics: bool) -> Telemetry:
        tracing = from_environment(SERVICE_NAME)
        if tracing is not None:
            for handler in logging.getLogger().handlers:
                handler.addFilter(TraceContextFilter())
        return cls(tracing, ServerMetrics(__version__) if metrics else None)

    @property
    def tracer(self) -> trace.Tracer | None:
        return self.tracing.tracer if self.tracing is not None else None

    def for_engine(self, adapter: ModelAdapter) -> EngineTelemetry:
        return EngineTelemetry(adapter.name, str(adapter.device.device), self.tracer, self.metrics)

    def shutdown(self) -> None:
        if self.tracing is not None:
            self.tracing.shutdown()  # flushes the spans still in the batch processor


DISABLED = Telemetry(None, None)

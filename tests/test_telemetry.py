"""Traces end to end into a real OTLP receiver, and Prometheus metrics after known traffic."""

from __future__ import annotations

import json
import logging
import threading
import urllib.request
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
from harness import InProcessServer, serving, wait_until
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.trace.v1 import trace_pb2
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client.parser import text_string_to_metric_families

from embedserve.client import Client
from embedserve.service.engine.work import Lane
from embedserve.service.logs import JsonFormatter
from embedserve.service.telemetry.setup import Telemetry
from embedserve.service.telemetry.tracing import TraceContextFilter, exporter_name
from embedserve.v1 import embed_service_pb2

SERVER = trace_pb2.Span.SPAN_KIND_SERVER


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """A real OTLP/gRPC trace receiver on 127.0.0.1."""

    def __init__(self) -> None:
        self.spans: list[trace_pb2.Span] = []
        self.services: dict[bytes, str] = {}  # span id -> the resource's service.name
        self.lock = threading.Lock()

    def Export(  # noqa: N802
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: grpc.ServicerContext
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        with self.lock:
            for resource_spans in request.resource_spans:
                service = next(
                    (
                        a.value.string_value
                        for a in resource_spans.resource.attributes
                        if a.key == "service.name"
                    ),
                    "",
                )
                for scope_spans in resource_spans.scope_spans:
                    self.spans.extend(scope_spans.spans)
                    for span in scope_spans.spans:
                        self.services[span.span_id] = service
        return trace_service_pb2.ExportTraceServiceResponse()

    def named(self, name: str) -> list[trace_pb2.Span]:
        with self.lock:
            return [span for span in self.spans if span.name == name]


@pytest.fixture
def receiver() -> Iterator[tuple[Receiver, int]]:
    servicer = Receiver()
    server = grpc.server(futures.ThreadPoolExecutor(2), options=[("grpc.so_reuseport", 0)])
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, port
    server.stop(None)


@pytest.fixture
def traced_server(
    receiver: tuple[Receiver, int], qwen3_embedding_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[InProcessServer]:
    _, port = receiver
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_INSECURE", "true")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "embedserve-test")
    with serving(model=qwen3_embedding_folder, warmup=False) as server:
        yield server


def hex_id(raw: bytes) -> str:
    return raw.hex()


def test_one_trace_from_client_span_through_queue_to_batch(
    traced_server: InProcessServer, receiver: tuple[Receiver, int]
) -> None:
    spans, _ = receiver
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    with Client(f"127.0.0.1:{traced_server.port}", tracer_provider=provider) as client:
        client.embed(["trace me", "and me"])
    (client_span,) = [s for s in exporter.get_finished_spans() if s.name.endswith("/Embed")]
    assert client_span.context is not None
    trace_id = client_span.context.trace_id.to_bytes(16, "big")

    wait_until(lambda: len(spans.named("batch")) >= 1, what="the batch span")
    wait_until(
        lambda: len(spans.named("embedserve.v1.EmbedService/Embed")) >= 1, what="server span"
    )
    (server_span,) = spans.named("embedserve.v1.EmbedService/Embed")
    assert server_span.kind == SERVER
    assert server_span.trace_id == trace_id
    assert server_span.parent_span_id == client_span.context.span_id.to_bytes(8, "big")
    (queue,) = spans.named("queue")
    (tokenize,) = spans.named("tokenize")
    for child in (queue, tokenize):
        assert child.trace_id == trace_id and child.parent_span_id == server_span.span_id
    (batch,) = spans.named("batch")
    assert batch.trace_id == trace_id and batch.parent_span_id == server_span.span_id
    assert [link.span_id for link in batch.links] == [server_span.span_id]
    attributes = {a.key: a.value for a in batch.attributes}
    assert attributes["embedserve.batch.size"].int_value == 2
    assert attributes["embedserve.device"].string_value == "cpu"
    assert attributes["embedserve.model"].string_value == traced_server.registry.default_embedder
    assert 0 <= attributes["embedserve.batch.padding_ratio"].double_value < 1


def test_one_batch_span_links_to_both_batched_requests(
    traced_server: InProcessServer, receiver: tuple[Receiver, int]
) -> None:
    spans, _ = receiver
    engine = traced_server.engines[0]
    traced_server.call(engine.hold)
    try:
        stub = traced_server.stubs.embed
        first = stub.Embed.future(embed_service_pb2.EmbedRequest(inputs=["alpha one"]))
        second = stub.Embed.future(embed_service_pb2.EmbedRequest(inputs=["beta two"]))
        wait_until(lambda: engine.queued_sequences(Lane.INTERACTIVE) == 2, what="both queued")
    finally:
        traced_server.call(engine.release)
    first.result(30)
    second.result(30)
    wait_until(lambda: len(spans.named("embedserve.v1.EmbedService/Embed")) == 2, what="2 spans")
    wait_until(lambda: len(spans.named("batch")) == 1, what="one batch span")
    server_ids = {s.span_id for s in spans.named("embedserve.v1.EmbedService/Embed")}
    (batch,) = spans.named("batch")
    assert {link.span_id for link in batch.links} == server_ids
    assert len({s.trace_id for s in spans.named("embedserve.v1.EmbedService/Embed")}) == 2


def test_a_stream_aggregates_its_items_on_one_span(
    traced_server: InProcessServer, receiver: tuple[Receiver, int]
) -> None:
    spans, _ = receiver
    items = [
        embed_service_pb2.EmbedStreamRequest(
            id=str(i),
            request=embed_service_pb2.EmbedRequest(inputs=[f"item {i}"] if i != 3 else [""]),
        )
        for i in range(40)
    ]
    answered = list(traced_server.stubs.embed.EmbedStream(iter(items)))
    assert len(answered) == 40
    name = "embedserve.v1.EmbedService/EmbedStream"
    wait_until(lambda: len(spans.named(name)) == 1, what="the stream span")
    (stream,) = spans.named(name)
    attributes = {
        a.key: a.value.int_value for a in stream.attributes if a.key.startswith("embedserve.stream")
    }
    assert attributes == {
        "embedserve.stream.items": 40,
        "embedserve.stream.failed_items": 1,
        "embedserve.stream.inputs": 39,
        "embedserve.stream.input_tokens": attributes["embedserve.stream.input_tokens"],
        "embedserve.stream.cached_inputs": 0,
    }
    assert attributes["embedserve.stream.input_tokens"] > 39
    assert spans.named("queue") == [] and spans.named("tokenize") == []  # no per-item spans
    wait_until(lambda: len(spans.named("batch")) >= 1, what="batch spans")
    for batch in spans.named("batch"):
        assert [link.span_id for link in batch.links] == [stream.span_id]  # once, not per item


def test_no_otel_variables_means_no_tracer(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (
        "OTEL_TRACES_EXPORTER",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    ):
        monkeypatch.delenv(name, raising=False)
    telemetry = Telemetry.create(metrics=False)
    assert telemetry.tracer is None and telemetry.metrics is None
    assert exporter_name({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://x:4317"}) == "otlp"
    assert exporter_name({"OTEL_TRACES_EXPORTER": "console"}) == "console"
    assert exporter_name({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "true"}) == "none"


def test_log_lines_carry_the_trace_and_span_ids() -> None:
    provider = TracerProvider()
    tracer = provider.get_tracer("test")
    record_holder: list[str] = []

    class Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            record_holder.append(self.format(record))

    handler = Capture()
    handler.setFormatter(JsonFormatter())
    handler.addFilter(TraceContextFilter())
    logger = logging.getLogger("embedserve.test.trace")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        with tracer.start_as_current_span("work") as span:
            logger.info("inside")
        logger.info("outside")
    finally:
        logger.removeHandler(handler)
    inside, outside = (json.loads(line) for line in record_holder)
    context = span.get_span_context()
    assert inside["trace_id"] == format(context.trace_id, "032x")
    assert inside["span_id"] == format(context.span_id, "016x")
    assert "trace_id" not in outside


def scrape(port: int) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    series: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            series.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return series


def value(
    series: dict[str, dict[tuple[tuple[str, str], ...], float]], name: str, **labels: str
) -> float:
    wanted = set(labels.items())
    return sum(v for key, v in series.get(name, {}).items() if wanted <= set(key))


def test_metrics_after_known_traffic(qwen3_embedding_folder: Path) -> None:
    with serving(
        model=qwen3_embedding_folder,
        model_name="tiny",
        warmup=False,
        metrics_port=0,
        max_batch_tokens=512,
        max_queue_tokens=512,
        max_input_tokens=64,
    ) as server:
        assert server.server.metrics_port
        stub = server.stubs.embed
        tokens = 0
        for i in range(3):
            tokens += stub.Embed(
                embed_service_pb2.EmbedRequest(inputs=[f"a{i}", f"b {i} c"])
            ).usage.input_tokens
        with pytest.raises(grpc.RpcError):
            stub.Embed(embed_service_pb2.EmbedRequest(inputs=[""]))
        items = [
            embed_service_pb2.EmbedStreamRequest(
                id=str(i),
                request=embed_service_pb2.EmbedRequest(inputs=["" if i == 0 else f"s{i}"]),
            )
            for i in range(4)
        ]
        for response in stub.EmbedStream(iter(items)):
            if response.HasField("result"):
                tokens += response.result.usage.input_tokens
        # Overload: hold the engine and fill the interactive queue until calls are refused.
        engine = server.engines[0]
        server.call(engine.hold)
        accepted: list[Any] = []
        rejected = 0
        try:
            while rejected == 0:
                future = stub.Embed.future(embed_service_pb2.EmbedRequest(inputs=["x " * 30] * 4))

                def settled(call: Any = future) -> bool:
                    return bool(call.done()) or engine.outstanding > len(accepted)

                wait_until(settled, what="the call queued or refused")
                if future.done() and future.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    rejected += 1
                else:
                    accepted.append(future)
        finally:
            server.call(engine.release)
        for future in accepted:
            tokens += future.result(30).usage.input_tokens

        series = scrape(server.server.metrics_port)
        assert value(
            series, "embedserve_requests_total", method="Embed", code="OK", model="tiny"
        ) == 3 + len(accepted)
        assert (
            value(series, "embedserve_requests_total", method="Embed", code="INVALID_ARGUMENT") == 1
        )
        assert (
            value(series, "embedserve_requests_total", method="Embed", code="RESOURCE_EXHAUSTED")
            == rejected
        )
        assert value(series, "embedserve_requests_total", method="EmbedStream", code="OK") == 1
        assert value(series, "embedserve_stream_items_total", outcome="OK", model="tiny") == 3
        assert value(series, "embedserve_stream_items_total", outcome="INVALID_ARGUMENT") == 1
        assert value(series, "embedserve_rejected_requests_total", model="tiny") == rejected
        assert value(series, "embedserve_sequences_total", model="tiny") == 6 + 3 + 4 * len(
            accepted
        )
        assert value(series, "embedserve_tokens_total", model="tiny") == tokens
        assert (
            value(series, "embedserve_request_duration_seconds_count", method="Embed")
            == 4 + len(accepted) + rejected
        )
        assert value(series, "embedserve_batch_size_count", model="tiny") == value(
            series, "embedserve_batches_total"
        )
        assert value(series, "embedserve_queue_tokens", model="tiny", lane="interactive") == 0
        assert value(series, "embedserve_requests_in_flight", model="tiny") == 0
        assert (
            value(series, "embedserve_build_info", model="tiny", device="cpu", dtype="float32") == 1
        )
        # The in-flight call limit is the server's, not a model's.
        server_wide = {
            "embedserve_calls_in_flight",
            "embedserve_calls_in_flight_limit",
            "embedserve_in_flight_refusals_total",
            "embedserve_in_flight_retry_delay_seconds",
            "embedserve_host_memory_trims_total",  # one trimmer a process (CPU)
            "embedserve_host_memory_trim_seconds_total",
        }
        assert server_wide <= set(series)
        for name, labelled in series.items():
            if name.startswith("embedserve_") and name not in server_wide:
                assert all(dict(key).get("model") for key in labelled), (
                    f"{name} lacks a model label"
                )


DEPLOY = Path(__file__).resolve().parents[1] / "deploy" / "observability"


def test_dashboard_and_alerts_use_series_the_server_exports(qwen3_embedding_folder: Path) -> None:
    import re

    import yaml

    # With the embedding cache on, so that its series are exported too.
    with serving(
        model=qwen3_embedding_folder, warmup=False, metrics_port=0, cache_bytes=1 << 20
    ) as server:
        server.stubs.embed.Embed(embed_service_pb2.EmbedRequest(inputs=["one"]))
        server.stubs.embed.Embed(embed_service_pb2.EmbedRequest(inputs=["one"]))
        list(
            server.stubs.embed.EmbedStream(
                iter(
                    [
                        embed_service_pb2.EmbedStreamRequest(
                            id="a", request=embed_service_pb2.EmbedRequest(inputs=["x"])
                        )
                    ]
                )
            )
        )
        assert server.server.metrics_port is not None
        exported = set(scrape(server.server.metrics_port))
    dashboard = json.loads((DEPLOY / "grafana-dashboard.json").read_text())
    alerts = yaml.safe_load((DEPLOY / "alerts.yaml").read_text())
    expressions = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    expressions += [r["expr"] for g in alerts["groups"] for r in g["rules"]]
    used = {name for e in expressions for name in re.findall(r"\bembedserve_[a-z_]+", e)}
    assert used, "no embedserve series referenced"
    assert used <= exported, f"not exported: {sorted(used - exported)}"
    titles = " ".join(p["title"].lower() for p in dashboard["panels"])
    for topic in ("throughput", "latency", "queue", "batch", "errors", "envoy", "cache", "workers"):
        assert topic in titles
    alert_names = {r["alert"] for g in alerts["groups"] for r in g["rules"]}
    assert {
        "EmbedserveHighP99Latency",
        "EmbedserveErrorRate",
        "EmbedserveQueueSaturated",
        "EmbedserveReplicaDown",
        "EmbedserveReplicaEjected",
    } <= alert_names


def test_one_trace_through_envoy_into_the_replica_queue_and_batch(
    receiver: tuple[Receiver, int], qwen3_embedding_folder: Path, tmp_path: Path
) -> None:
    """client span -> Envoy server and upstream spans -> replica server span -> queue ->
    the batch span that links back to it: one trace id."""
    from test_envoy import envoy_over, replicas_running

    from embedserve.envoy.render import Endpoint

    spans, port = receiver
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
        "OTEL_EXPORTER_OTLP_INSECURE": "true",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
        "OTEL_SERVICE_NAME": "embedserve-replica",
    }
    with (
        replicas_running(qwen3_embedding_folder, [env]) as replicas,
        envoy_over([r.port for r in replicas], tmp_path, otlp=Endpoint("127.0.0.1", port)) as proxy,
    ):
        exporter = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        with Client(proxy.target, tracer_provider=provider) as client:
            client.embed(["traced through envoy"])
        (client_span,) = exporter.get_finished_spans()
        assert client_span.context is not None
        trace_id = client_span.context.trace_id.to_bytes(16, "big")

        def in_trace(service: str) -> list[trace_pb2.Span]:
            with spans.lock:
                return [
                    s
                    for s in spans.spans
                    if s.trace_id == trace_id and spans.services.get(s.span_id) == service
                ]

        wait_until(lambda: len(in_trace("embedserve-envoy")) >= 2, timeout=60, what="Envoy spans")
        wait_until(
            lambda: {s.name for s in in_trace("embedserve-replica")} >= {"queue", "batch"},
            timeout=60,
            what="replica spans",
        )
    envoy_spans = in_trace("embedserve-envoy")
    kinds = {s.kind for s in envoy_spans}
    assert {trace_pb2.Span.SPAN_KIND_SERVER, trace_pb2.Span.SPAN_KIND_CLIENT} <= kinds
    envoy_server = next(s for s in envoy_spans if s.kind == trace_pb2.Span.SPAN_KIND_SERVER)
    assert envoy_server.parent_span_id == client_span.context.span_id.to_bytes(8, "big")
    upstream_ids = {s.span_id for s in envoy_spans if s.kind == trace_pb2.Span.SPAN_KIND_CLIENT}
    replica = {s.name: s for s in in_trace("embedserve-replica")}
    server = replica["embedserve.v1.EmbedService/Embed"]
    assert server.parent_span_id in upstream_ids  # Envoy's upstream span is the parent
    assert replica["queue"].parent_span_id == server.span_id
    assert [link.span_id for link in replica["batch"].links] == [server.span_id]

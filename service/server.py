"""Assembly and lifecycle: load models (failing at boot), serve, warm up, drain."""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from embedserve.service import faults
from embedserve.service.api.decoding import SafeDecodingInterceptor
from embedserve.service.api.embed import ApiSettings, EmbedServicer
from embedserve.service.api.in_flight import InFlightLimit, default_limit
from embedserve.service.api.info import InfoServicer, describe
from embedserve.service.api.rerank import RerankServicer
from embedserve.service.cache.setup import close_caches, install_caches
from embedserve.service.config import ServerConfig
from embedserve.service.cpus import available_cpus, bf16_matmul_flag
from embedserve.service.engine.engine import Engine
from embedserve.service.engine.host_memory import HostMemoryTrimmer
from embedserve.service.engine.limits import BatchLimits
from embedserve.service.engine.workers import SharedThreads
from embedserve.service.inference import EmbeddingModel, ModelReranker, SimilarityReranker
from embedserve.service.lifecycle import Lifecycle, Phase
from embedserve.service.models.base import ModelAdapter, ModelLoadError
from embedserve.service.models.loading import (
    DEFAULT_MODEL_NAME,
    default_model_folder,
    load_embedder,
    load_reranker,
    resolve_device,
)
from embedserve.service.models.options import ModelOptions
from embedserve.service.models.tokenization import Truncation
from embedserve.service.python_gc import freeze_startup_objects
from embedserve.service.registry import ModelRegistry
from embedserve.service.security.api_keys import ApiKeyInterceptor, KeyStore
from embedserve.service.security.tls import server_credentials
from embedserve.service.telemetry.interceptor import TelemetryInterceptor
from embedserve.service.telemetry.setup import DISABLED, Telemetry
from embedserve.v1 import (
    embed_service_pb2,
    embed_service_pb2_grpc,
    info_service_pb2,
    info_service_pb2_grpc,
    rerank_service_pb2,
    rerank_service_pb2_grpc,
)

log = logging.getLogger(__name__)

API_SERVICES = tuple(
    file.services_by_name[name].full_name
    for file, name in (
        (embed_service_pb2.DESCRIPTOR, "EmbedService"),
        (rerank_service_pb2.DESCRIPTOR, "RerankService"),
        (info_service_pb2.DESCRIPTOR, "InfoService"),
    )
)
# The calls that do a model's work, one at a time: those the in-flight limit counts.
UNARY_WORK_METHODS = tuple(
    f"/{method.containing_service.full_name}/{method.name}"
    for method in (
        embed_service_pb2.DESCRIPTOR.services_by_name["EmbedService"].methods_by_name["Embed"],
        rerank_service_pb2.DESCRIPTOR.services_by_name["RerankService"].methods_by_name["Rerank"],
    )
)
# Health has one status a service name, plus "" for the whole server.
HEALTH_NAMES = ("", *API_SERVICES)


def build_registry(config: ServerConfig, telemetry: Telemetry = DISABLED) -> ModelRegistry:
    """Load every configured model. Raises ModelLoadError (or ValueError) before serving."""
    faults.configure()  # test-only hooks: ValueError for a fault variable without the switch
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    device = resolve_device(config.device, config.dtype)
    cpu_threads = 0
    host_memory: HostMemoryTrimmer | None = None
    shared_threads: SharedThreads | None = None
    if device.device.type == "cpu":
        host_memory = HostMemoryTrimmer(config.memory_trim_interval_ms / 1000.0)
        if telemetry.metrics is not None and host_memory.enabled:
            telemetry.metrics.watch_host_memory(host_memory)
        cpu_threads = torch_threads(config)
        # This thread loads the models and then runs the event loop: it never runs a
        # parallel region, so that the parallel worker's OpenMP team is the process's only one
        # (engine/workers.py says why). The workers set their own counts per batch.
        torch.set_num_threads(1)
        shared_threads = SharedThreads(cpu_threads, config.forward_nice)
        workers = forward_workers(config, cpu_threads)
        log.info(
            "torch threads",
            extra={
                "threads": cpu_threads,
                "available_cpus": available_cpus(),
                "forward_workers": workers,
            },
        )
        if workers > cpu_threads:
            log.warning(
                "more forward workers than torch threads: every batch still gets a thread, "
                "so up to %d threads may compete for %d",
                workers,
                cpu_threads,
            )
        bf16_flag = bf16_matmul_flag() if device.dtype == torch.float32 else None
        if bf16_flag is not None and device.int8_linears:
            log.info(
                "this CPU multiplies bfloat16 in hardware (%s): --dtype bfloat16 served about "
                "as many calls as int8 on such a CPU and stays nearer float32 (a cosine of "
                "about 0.9999, against 0.990 for int8; docs/benchmarks.md)",
                bf16_flag,
            )
        elif bf16_flag is not None:
            log.info(
                "this CPU multiplies bfloat16 in hardware (%s): --dtype bfloat16 is faster "
                "here, at a cosine of about 0.9999 to float32 vectors (docs/benchmarks.md); "
                "float32 stays the default",
                bf16_flag,
            )
    elif config.forward_workers > 1:
        raise ValueError(
            f"--forward-workers {config.forward_workers}: more than one is for the CPU; "
            f"on {device.device.type} batches run one at a time"
        )
    limits = BatchLimits(
        max_batch_tokens=config.max_batch_tokens,
        max_batch_size=config.max_batch_size,
        max_inputs_per_request=config.max_inputs,
        max_queue_tokens=config.max_queue_tokens,
        max_queue_delay_s=config.max_queue_delay_ms / 1000.0,
        stream_window=config.stream_window,
        bulk_aging_s=config.bulk_aging_ms / 1000.0,
    )
    folder = config.model if config.model is not None else default_model_folder()
    name = config.model_name or (DEFAULT_MODEL_NAME if config.model is None else folder.name)
    embedder_options = ModelOptions(
        folder=folder,
        name=name,
        max_input_tokens=config.max_input_tokens,
        min_dimensions=config.min_dimensions,
        default_instruction=config.default_instruction,
        pooling=config.pooling,
        padding_free=config.padding_free,
    )
    embedder = EmbeddingModel(
        adapter := load_embedder(embedder_options, device),
        _engine(adapter, limits, telemetry, config, shared_threads, host_memory),
    )
    registry = ModelRegistry(default_embedder=name)
    registry.embedders[name] = embedder
    if config.reranker is None:
        registry.rerankers[name] = SimilarityReranker(embedder)
        registry.default_reranker = name
    else:
        reranker_name = config.reranker_name or config.reranker.name
        reranker_options = ModelOptions(
            folder=config.reranker,
            name=reranker_name,
            max_input_tokens=config.max_input_tokens,
            default_instruction=config.default_instruction,
            padding_free=config.padding_free,
        )
        reranker = load_reranker(reranker_options, device)
        registry.rerankers[reranker_name] = ModelReranker(
            reranker,
            # The same threads as the embedder's: whichever model's batch finds the parallel
            # worker free runs on every spare thread (engine/workers.py).
            _engine(reranker, limits, telemetry, config, shared_threads, host_memory),
        )
        registry.default_reranker = reranker_name
    install_caches(registry, config, folder, telemetry)  # an unusable Redis URL: ValueError
    return registry


def torch_threads(config: ServerConfig) -> int:
    """The torch threads the forward workers share on a CPU."""
    return config.threads or available_cpus()


def forward_workers(config: ServerConfig, cpu_threads: int) -> int:
    """Batches that may run at once: ``--forward-workers``, or on a CPU with two threads or
    more, two (``engine/workers.py`` says why); one on a GPU, which runs them in turn."""
    if config.forward_workers:
        return config.forward_workers
    return 2 if cpu_threads >= 2 else 1


def _cuda_graph_tokens(adapter: ModelAdapter, config: ServerConfig) -> int:
    """``--cuda-graph-tokens`` where it applies: on CUDA, to a model verified to capture."""
    if not config.cuda_graph_tokens:
        return 0
    if adapter.device.device.type != "cuda":
        log.warning("--cuda-graph-tokens applies on CUDA only; %s runs eagerly", adapter.name)
        return 0
    if not adapter.cuda_graphs:
        log.warning(
            "%s (%s) is not verified to run from CUDA graphs; it runs eagerly",
            adapter.name,
            adapter.family,
        )
        return 0
    return config.cuda_graph_tokens


def _engine(
    adapter: ModelAdapter,
    limits: BatchLimits,
    telemetry: Telemetry,
    config: ServerConfig,
    shared_threads: SharedThreads | None,
    host_memory: HostMemoryTrimmer | None,
) -> Engine:
    """``shared_threads``: the CPU's, shared by every engine; none off the CPU, where each
    engine runs its batches on a worker of its own, as it has no OpenMP team to share."""
    threads = shared_threads
    if threads is None:
        threads = SharedThreads(0, config.forward_nice, name=f"{adapter.name}-0")
    try:
        return Engine(
            adapter,
            limits,
            telemetry.for_engine(adapter),
            threads=threads,
            forward_workers=forward_workers(config, threads.cpu_threads),
            host_memory=host_memory,
            cuda_graph_tokens=_cuda_graph_tokens(adapter, config),
        )
    except ValueError as exc:
        raise ModelLoadError(f"batching limits do not fit the model: {exc}") from exc


@dataclass
class Server:
    config: ServerConfig
    registry: ModelRegistry
    telemetry: Telemetry = DISABLED

    def __post_init__(self) -> None:
        self.lifecycle = Lifecycle()
        self.health = HealthServicer()
        self.port = 0
        self.metrics_port: int | None = None
        # Security settings are read now, so that a bad file fails the start, not a call.
        config = self.config
        self._credentials = server_credentials(
            config.tls_cert, config.tls_key, config.tls_client_ca
        )
        self._auth: list[ApiKeyInterceptor] = []
        if config.api_keys is not None:
            exempt = [name.strip() for name in config.auth_exempt.split(",") if name.strip()]
            self._auth.append(ApiKeyInterceptor(KeyStore(config.api_keys), exempt))
        self.in_flight = _in_flight_limit(config, self.registry)
        self._grpc: grpc.aio.Server | None = None
        self._shutdown: asyncio.Task[None] | None = None
        self._stopped = asyncio.Event()

    async def start(self) -> None:
        """Bind and answer health (NOT_SERVING) at once; SERVING after the warm-up."""
        config = self.config
        limit = config.max_message_mb * 1024 * 1024
        telemetry = self.telemetry
        interceptor = TelemetryInterceptor(
            telemetry.tracer,
            telemetry.metrics,
            {
                API_SERVICES[0]: self.registry.default_embedder,
                API_SERVICES[1]: self.registry.default_reranker,
            },
        )
        server = grpc.aio.server(
            maximum_concurrent_rpcs=config.max_concurrent_rpcs or None,
            # Decoding first: every layer after it sees only well-formed messages.
            # Telemetry next, so that refused calls are counted and traced too. The
            # in-flight limit last, after authentication: it refuses before the request is
            # parsed, and a caller without a key learns nothing of the load.
            interceptors=[
                SafeDecodingInterceptor(),
                interceptor,
                *self._auth,
                *([self.in_flight] if self.in_flight is not None else []),
            ],
            options=[
                ("grpc.so_reuseport", 0),
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", limit),
                # Let clients keep idle connections alive without being told off.
                ("grpc.http2.min_ping_interval_without_data_ms", 5000),
                ("grpc.keepalive_permit_without_calls", 1),
                *_pending_call_options(config.max_pending_calls),
            ],
        )
        settings = ApiSettings(
            default_truncation=Truncation(config.truncation), stream_window=config.stream_window
        )
        embed_service_pb2_grpc.add_EmbedServiceServicer_to_server(
            EmbedServicer(self.registry, self.lifecycle, settings, telemetry.metrics), server
        )
        rerank_service_pb2_grpc.add_RerankServiceServicer_to_server(
            RerankServicer(self.registry, self.lifecycle, settings), server
        )
        info_service_pb2_grpc.add_InfoServiceServicer_to_server(
            InfoServicer(
                describe(
                    self.registry,
                    settings.default_truncation,
                    self.in_flight.limit if self.in_flight is not None else None,
                )
            ),
            server,
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (*API_SERVICES, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        try:
            address = f"{config.host}:{config.port}"
            if self._credentials is None:
                self.port = server.add_insecure_port(address)
            else:
                self.port = server.add_secure_port(address, self._credentials)
        except RuntimeError as exc:
            raise OSError(f"cannot listen on {config.host}:{config.port}: {exc}") from exc
        await server.start()
        self._grpc = server
        log.info(
            "listening",
            extra={
                "host": config.host,
                "port": self.port,
                "tls": self._credentials is not None,
                "mutual_tls": config.tls_client_ca is not None,
                "api_keys": bool(self._auth),
                "max_calls_in_flight": self.in_flight.limit if self.in_flight else 0,
            },
        )
        if telemetry.metrics is not None and config.metrics_port is not None:
            for engine in self.registry.engines():
                telemetry.metrics.watch(engine, asyncio.get_running_loop())
            if self.in_flight is not None:
                telemetry.metrics.watch_call_limit(self.in_flight)
            self.metrics_port = telemetry.metrics.serve(config.metrics_host, config.metrics_port)
            log.info(
                "metrics",
                extra={"host": config.metrics_host, "port": self.metrics_port, "path": "/metrics"},
            )
        for engine in self.registry.engines():
            await engine.start(warmup=config.warmup)
        if config.gc_freeze:
            freeze_startup_objects()
        self.lifecycle.phase = Phase.SERVING
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        log.info(
            "serving",
            extra={
                "host": config.host,
                "port": self.port,
                "embedding_models": list(self.registry.embedders),
                "rerankers": list(self.registry.rerankers),
            },
        )

    def request_shutdown(self) -> None:
        """Idempotent; safe to call from a signal handler."""
        if self._shutdown is None:
            self._shutdown = asyncio.ensure_future(self._drain_and_stop())

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    async def _drain_and_stop(self) -> None:
        config = self.config
        log.info("draining", extra={"in_flight": self.lifecycle.in_flight})
        # Balancers read NOT_SERVING first and move away; then new calls are refused
        # (UNAVAILABLE, retryable) while every accepted one finishes.
        await self.health.enter_graceful_shutdown()
        if config.drain_delay_s > 0:
            await asyncio.sleep(config.drain_delay_s)
        self.lifecycle.begin_drain()
        try:
            await asyncio.wait_for(self.lifecycle.wait_quiet(), timeout=config.grace_period_s)
        except TimeoutError:
            log.warning(
                "grace period over with calls still running",
                extra={"in_flight": self.lifecycle.in_flight},
            )
        if self._grpc is not None:
            await self._grpc.stop(grace=1.0)
        for engine in self.registry.engines():
            await engine.stop()
        await close_caches(self.registry)  # sends the queued Redis writes
        self.telemetry.shutdown()
        log.info("stopped")
        self._stopped.set()

    async def _set_health(self, status: health_pb2.HealthCheckResponse.ServingStatus) -> None:
        for name in HEALTH_NAMES:
            await self.health.set(name, status)


def _in_flight_limit(config: ServerConfig, registry: ModelRegistry) -> InFlightLimit | None:
    limit = config.max_calls_in_flight
    if limit is None:
        on_cuda = any(e.adapter.device.device.type == "cuda" for e in registry.engines())
        limit = default_limit(on_cuda=on_cuda, cpu_threads=torch_threads(config))
    if limit == 0:
        return None
    return InFlightLimit(limit, UNARY_WORK_METHODS)


def _pending_call_options(max_pending_calls: int) -> list[tuple[str, int]]:
    """gRPC core's bound on calls that have arrived but that the event loop has not taken.

    grpc.aio takes one call from the core per turn of the event loop, so under a flood
    the calls queue in the core, where no admission check can see them: with gRPC's
    defaults (1000 and 3000) refusals were measured waiting 1 to 2 s there. Bounded, the core
    sheds the excess itself, in microseconds, and what reaches Python is refused in
    milliseconds (docs/benchmarks.md, "Overload").
    """
    if max_pending_calls <= 0:
        return []
    return [
        ("grpc.server.max_pending_requests", max(1, max_pending_calls // 2)),
        ("grpc.server.max_pending_requests_hard_limit", max_pending_calls),
    ]

"""Prometheus metrics on an HTTP port (``--metrics-port``, path /metrics).

Every series carries a ``model`` label, except the server-wide ones: the call limit's and
the host memory trims'. Counters and gauges the engine already keeps (queue depth,
rejections, expiries) are read at scrape time by a collector, so they cost nothing on the
hot path; only the histograms are observed as work happens.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from embedserve.service.engine.work import Lane

if TYPE_CHECKING:
    from embedserve.service.api.in_flight import InFlightLimit
    from embedserve.service.cache.front import EmbeddingCache
    from embedserve.service.engine.engine import Engine
    from embedserve.service.engine.host_memory import HostMemoryTrimmer

_LATENCY_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30)
_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
_TOKEN_BUCKETS = (16, 64, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)
_RATIO_BUCKETS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 1.0)


class ServerMetrics:
    def __init__(self, version: str) -> None:
        self.version = version
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "embedserve_requests",
            "Finished RPCs by method and status code.",
            ["model", "method", "code"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "embedserve_request_duration_seconds",
            "RPC latency by method and status code.",
            ["model", "method", "code"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.stream_items = Counter(
            "embedserve_stream_items",
            "EmbedStream items answered, by outcome (ok or the error code).",
            ["model", "outcome"],
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "embedserve_batch_size",
            "Sequences in one forward pass.",
            ["model"],
            buckets=_SIZE_BUCKETS,
            registry=self.registry,
        )
        self.batch_tokens = Histogram(
            "embedserve_batch_tokens",
            "Tokens in one forward pass, padding included.",
            ["model"],
            buckets=_TOKEN_BUCKETS,
            registry=self.registry,
        )
        self.padding_ratio = Histogram(
            "embedserve_batch_padding_ratio",
            "Share of a forward pass spent on padding.",
            ["model"],
            buckets=_RATIO_BUCKETS,
            registry=self.registry,
        )
        self.forward_seconds = Histogram(
            "embedserve_forward_duration_seconds",
            "Duration of one forward pass.",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._engines = _EngineCollector(version)
        self.registry.register(self._engines)
        self._caches = _CacheCollector()
        self.registry.register(self._caches)
        self._call_limit = _CallLimitCollector()
        self.registry.register(self._call_limit)
        self._host_memory = _HostMemoryCollector()
        self.registry.register(self._host_memory)

    def watch(self, engine: Engine, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._engines.engines.append(engine)
        if loop is not None:
            self._engines.loop = loop

    def watch_cache(self, cache: EmbeddingCache) -> None:
        self._caches.caches.append(cache)

    def watch_call_limit(self, limit: InFlightLimit) -> None:
        self._call_limit.limit = limit

    def watch_host_memory(self, trimmer: HostMemoryTrimmer) -> None:
        self._host_memory.trimmer = trimmer

    def observe_batch(
        self, model: str, size: int, tokens: int, padded_tokens: int, seconds: float
    ) -> None:
        self.batch_size.labels(model).observe(size)
        self.batch_tokens.labels(model).observe(padded_tokens)
        self.padding_ratio.labels(model).observe(1 - tokens / padded_tokens if padded_tokens else 0)
        self.forward_seconds.labels(model).observe(seconds)

    def observe_call(self, model: str, method: str, code: str, seconds: float) -> None:
        self.requests.labels(model, method, code).inc()
        self.latency.labels(model, method, code).observe(seconds)

    def serve(self, host: str, port: int) -> int:
        """Start the /metrics endpoint; returns the bound port (useful with port 0)."""
        server, _ = start_http_server(port, addr=host, registry=self.registry)
        return int(server.server_address[1])


class _EngineCollector(Collector):
    """Reads the engines' own counters and queue depths at scrape time."""

    def __init__(self, version: str) -> None:
        self.version = version
        self.engines: list[Engine] = []
        self.loop: asyncio.AbstractEventLoop | None = None

    def describe(self) -> Iterable[Metric]:
        return []  # collected lazily; the set of engines grows after registration

    def collect(self) -> Iterator[Metric]:
        queue_tokens = GaugeMetricFamily(
            "embedserve_queue_tokens",
            "Tokens waiting in the queue, by lane.",
            labels=["model", "lane"],
        )
        queue_sequences = GaugeMetricFamily(
            "embedserve_queue_sequences",
            "Sequences waiting in the queue, by lane.",
            labels=["model", "lane"],
        )
        in_flight = GaugeMetricFamily(
            "embedserve_requests_in_flight",
            "Requests accepted by the engine and not yet answered.",
            labels=["model"],
        )
        tokens = CounterMetricFamily(
            "embedserve_tokens", "Tokens computed (rate() gives tokens/s).", labels=["model"]
        )
        sequences = CounterMetricFamily(
            "embedserve_sequences", "Sequences computed.", labels=["model"]
        )
        batches = CounterMetricFamily("embedserve_batches", "Forward passes run.", labels=["model"])
        rejected = CounterMetricFamily(
            "embedserve_rejected_requests",
            "Requests refused with RESOURCE_EXHAUSTED.",
            labels=["model"],
        )
        expired = CounterMetricFamily(
            "embedserve_expired_sequences",
            "Sequences dropped unseen because their deadline passed.",
            labels=["model"],
        )
        cancelled = CounterMetricFamily(
            "embedserve_cancelled_sequences",
            "Sequences dropped unseen because their call was cancelled.",
            labels=["model"],
        )
        failures = CounterMetricFamily(
            "embedserve_forward_failures", "Forward passes that failed.", labels=["model"]
        )
        queued_ahead = CounterMetricFamily(
            "embedserve_batches_queued_ahead",
            "Batches queued on a busy forward worker, behind the batch it runs.",
            labels=["model"],
        )
        recalled = CounterMetricFamily(
            "embedserve_batches_recalled",
            "Batches queued ahead that went back to the queue before they ran.",
            labels=["model"],
        )
        tasks = GaugeMetricFamily(
            "embedserve_event_loop_tasks",
            "asyncio tasks alive in the server process (a leak shows as growth).",
            labels=["model"],
        )
        info = GaugeMetricFamily(
            "embedserve_build_info",
            "Always 1: the server version and what each model runs on.",
            labels=["model", "version", "family", "device", "dtype"],
        )
        for engine in self.engines:
            model = engine.adapter.name
            stats = engine.stats
            for lane in Lane:
                queue_tokens.add_metric([model, lane.value], engine.queued_tokens(lane))
                queue_sequences.add_metric([model, lane.value], engine.queued_sequences(lane))
            in_flight.add_metric([model], engine.outstanding)
            tokens.add_metric([model], stats.tokens_computed)
            sequences.add_metric([model], stats.sequences_computed)
            batches.add_metric([model], stats.batches)
            rejected.add_metric([model], stats.requests_rejected)
            expired.add_metric([model], stats.sequences_expired)
            cancelled.add_metric([model], stats.sequences_cancelled)
            failures.add_metric([model], stats.forward_failures)
            queued_ahead.add_metric([model], stats.next_batches_queued)
            recalled.add_metric([model], stats.next_batches_recalled)
            device = engine.adapter.device
            info.add_metric(
                [model, self.version, engine.adapter.family, str(device.device), device.dtype_name],
                1,
            )
        if self.loop is not None and self.engines:
            tasks.add_metric([self.engines[0].adapter.name], _count_tasks(self.loop))
        yield from (
            tasks,
            queue_tokens,
            queue_sequences,
            in_flight,
            tokens,
            sequences,
            batches,
            rejected,
            expired,
            cancelled,
            failures,
            queued_ahead,
            recalled,
            info,
        )


class _CallLimitCollector(Collector):
    """Reads the server's in-flight call limit at scrape time."""

    def __init__(self) -> None:
        self.limit: InFlightLimit | None = None

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        limit = self.limit
        if limit is None:
            return
        yield GaugeMetricFamily(
            "embedserve_calls_in_flight",
            "Unary Embed and Rerank calls in progress (what --max-calls-in-flight counts).",
            value=limit.in_flight,
        )
        yield GaugeMetricFamily(
            "embedserve_calls_in_flight_limit",
            "--max-calls-in-flight: past it a call is refused before it is handled.",
            value=limit.limit,
        )
        yield CounterMetricFamily(
            "embedserve_in_flight_refusals",
            "Calls refused RESOURCE_EXHAUSTED because --max-calls-in-flight were in progress.",
            value=limit.refused,
        )
        yield GaugeMetricFamily(
            "embedserve_in_flight_retry_delay_seconds",
            "The RetryInfo delay the next in-flight refusal carries (it grows with the "
            "refusal rate, so that waiting callers retry about 100 times a second in all).",
            value=limit.pacing.delay,
        )


class _HostMemoryCollector(Collector):
    """Reads the host memory trimmer's counters at scrape time (CPU servers only)."""

    def __init__(self) -> None:
        self.trimmer: HostMemoryTrimmer | None = None

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        trimmer = self.trimmer
        if trimmer is None:
            return
        yield CounterMetricFamily(
            "embedserve_host_memory_trims",
            "Times freed host memory was given back to the system (--memory-trim-interval-ms).",
            value=trimmer.trims,
        )
        yield CounterMetricFamily(
            "embedserve_host_memory_trim_seconds",
            "Time forward workers spent giving freed host memory back, between batches.",
            value=trimmer.seconds,
        )
        allowance = trimmer.allowance
        if allowance is not None:
            yield GaugeMetricFamily(
                "embedserve_host_memory_trim_allowance_bytes",
                "How far the resident set may grow past its size after the last trim before "
                "the next: a full batch's working set, scaled to the batches running lately.",
                value=allowance,
            )


class _CacheCollector(Collector):
    """Reads the embedding caches' counters and sizes at scrape time."""

    def __init__(self) -> None:
        self.caches: list[EmbeddingCache] = []

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        if not self.caches:
            return
        hits = CounterMetricFamily(
            "embedserve_cache_hits",
            "Distinct inputs of a request found in the embedding cache, by tier (memory, redis).",
            labels=["model", "tier"],
        )
        misses = CounterMetricFamily(
            "embedserve_cache_misses",
            "Distinct inputs of a request found in no cache tier (then computed).",
            labels=["model"],
        )
        size = GaugeMetricFamily(
            "embedserve_cache_bytes",
            "Bytes held by the in-process cache tier (vectors, keys and bookkeeping).",
            labels=["model"],
        )
        entries = GaugeMetricFamily(
            "embedserve_cache_entries", "Entries in the in-process cache tier.", labels=["model"]
        )
        evictions = CounterMetricFamily(
            "embedserve_cache_evictions",
            "Entries the in-process tier dropped to stay within --cache-bytes.",
            labels=["model"],
        )
        errors = CounterMetricFamily(
            "embedserve_cache_errors",
            "Failed cache operations (answered by computing instead), by backend.",
            labels=["model", "backend"],
        )
        for cache in self.caches:
            model = cache.model
            hits.add_metric([model, "memory"], cache.hits_memory)
            hits.add_metric([model, "redis"], cache.hits_redis)
            misses.add_metric([model], cache.misses)
            memory = cache.memory
            size.add_metric([model], memory.bytes if memory is not None else 0)
            entries.add_metric([model], len(memory) if memory is not None else 0)
            evictions.add_metric([model], memory.evictions if memory is not None else 0)
            errors.add_metric([model, "redis"], cache.redis.errors if cache.redis else 0)
        yield from (hits, misses, size, entries, evictions, errors)


def _count_tasks(loop: asyncio.AbstractEventLoop) -> int:
    # Read from the scrape thread: the set can change while it is copied; retry.
    for _ in range(5):
        try:
            return len(asyncio.all_tasks(loop))
        except RuntimeError:
            continue
    return -1

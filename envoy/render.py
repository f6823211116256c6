"""One Envoy configuration for N embedserve replicas, rendered from typed parameters.

The same renderer produces the config for the local ``embedserve cluster`` (STATIC replica
addresses on loopback), for compose and for Kubernetes (STRICT_DNS on a service name). Every
number below is a decision; the reasons are in docs/reliability.md and
../shared/notes/envoy.md (facts measured on Envoy 1.40).

    python -m embedserve.envoy.render --replicas 127.0.0.1:50061,127.0.0.1:50062 \\
        --port 8080 --admin-port 9901 [--otlp 127.0.0.1:4317] --output envoy.yaml
    python -m embedserve.envoy.render --dns embedserve-replicas:50051 --listen-host 0.0.0.0 ...
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

CLUSTER = "embedserve"
COLLECTOR_CLUSTER = "otel_collector"
ADMIN_CLUSTER = "envoy_admin"
# The admin interface has no authentication: it listens on loopback only, always.
ADMIN_HOST = "127.0.0.1"
STREAM_PATH = "/embedserve.v1.EmbedService/EmbedStream"
# Long-lived streams that are not EmbedStream: they get the stream route too (no duration cap).
OTHER_STREAM_PATHS = (
    "/grpc.health.v1.Health/Watch",
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
)
UNARY_RETRY_ON = "unavailable,resource-exhausted,reset,connect-failure,refused-stream"
# Outlier detection ejects a replica after this many gateway failures in a row; a unary call
# gets as many retries, so one attempt more (the route's comment says why).
CONSECUTIVE_GATEWAY_FAILURES = 3
UNARY_RETRIES = CONSECUTIVE_GATEWAY_FAILURES
# A stream is replayed only when it was refused at open: REFUSED_STREAM, or a Trailers-Only
# UNAVAILABLE (warming up, draining, failing) that carries no response message. Envoy cannot
# retry once response headers went downstream, so a stream that already answered is never
# replayed: the client resumes it.
STREAM_RETRY_ON = "refused-stream,unavailable"

Json = dict[str, Any]
# A DNS cluster's in-flight limit when none is given: the count of replicas behind the name is
# not known here, so Envoy leaves shedding to the replicas' own admission.
DNS_MAX_REQUESTS = 4096
# Envoy's own refusal carries the same ErrorInfo reason as a replica's (clients treat both
# alike); the metadata says which one refused.
OVERFLOW_REASON = "OVERLOADED"
ERROR_DOMAIN = "embedserve"


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> Endpoint:
        host, sep, port = text.strip().rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"expected host:port, got {text!r}")
        return cls(host.strip("[]"), int(port))

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"

    def socket_address(self) -> Json:
        return {"socket_address": {"address": self.host, "port_value": self.port}}


@dataclass(frozen=True)
class DownstreamTls:
    """Envoy terminates TLS from clients; with ``client_ca`` it requires client certificates."""

    cert: str
    key: str
    client_ca: str | None = None


@dataclass(frozen=True)
class UpstreamTls:
    """TLS from Envoy to the replicas (their --tls-cert), verified against ``ca``; ``cert`` and
    ``key`` present a client certificate to replicas that require one (--tls-client-ca)."""

    ca: str
    cert: str | None = None
    key: str | None = None
    sni: str | None = None


_TLS_SOCKET = "envoy.transport_sockets.tls"
_TLS_TYPES = "envoy.extensions.transport_sockets.tls.v3."


def _certificates(cert: str, key: str) -> list[Json]:
    return [{"certificate_chain": {"filename": cert}, "private_key": {"filename": key}}]


def _downstream_tls(tls: DownstreamTls) -> Json:
    context: Json = {"tls_certificates": _certificates(tls.cert, tls.key), "alpn_protocols": ["h2"]}
    if tls.client_ca is not None:
        context["validation_context"] = {"trusted_ca": {"filename": tls.client_ca}}
    return {
        "name": _TLS_SOCKET,
        "typed_config": _typed(
            _TLS_TYPES + "DownstreamTlsContext",
            common_tls_context=context,
            require_client_certificate=tls.client_ca is not None,
        ),
    }


def _upstream_tls(tls: UpstreamTls) -> Json:
    context: Json = {
        "alpn_protocols": ["h2"],
        "validation_context": {"trusted_ca": {"filename": tls.ca}},
    }
    if tls.cert is not None and tls.key is not None:
        context["tls_certificates"] = _certificates(tls.cert, tls.key)
    body: Json = {"common_tls_context": context}
    if tls.sni:
        body["sni"] = tls.sni
    return {"name": _TLS_SOCKET, "typed_config": _typed(_TLS_TYPES + "UpstreamTlsContext", **body)}


@dataclass(frozen=True)
class EnvoyParams:
    """What varies between deployments. Exactly one of ``replicas`` and ``dns``."""

    replicas: tuple[Endpoint, ...] = ()  # STATIC: fixed addresses (local cluster, tests)
    dns: Endpoint | None = None  # STRICT_DNS: a headless service / compose service name
    listen_host: str = "127.0.0.1"
    port: int = 8080
    admin_port: int = 9901
    # A listener that exposes only the admin's /ready (for kubelet probes), so the admin itself
    # stays on loopback. None: no such listener.
    ready_port: int | None = None
    # OpenTelemetry: OTLP/gRPC collector; None switches tracing off.
    otlp: Endpoint | None = None
    trace_service_name: str = "embedserve-envoy"
    # Fraction of new traces (no sampled parent) that are recorded; parents are obeyed.
    trace_root_ratio: float = 1.0
    access_log_path: str | None = None  # None: JSON lines on Envoy's stdout
    # In-flight requests one replica may hold. It sizes the retry budget's floor, so that a lost
    # replica's calls can all be retried at once, and, for fixed addresses, the cluster's
    # in-flight limit below. 32 is where a CPU replica is already at full speed (the forward
    # ceiling peaks at batch 32 here); more only lengthens the queue (docs/benchmarks.md,
    # "Overload behind Envoy"). A GPU replica's best batch is larger: raise it there.
    replica_in_flight: int = 32
    # Calls (and open streams) in flight to the whole cluster: Envoy's max_requests circuit
    # breaker. Past it Envoy answers RESOURCE_EXHAUSTED itself, in C++ and in microseconds, so
    # a flood never reaches the replicas' Python event loops, whose CPU torch needs. None:
    # replica_in_flight per replica for fixed addresses; for a DNS cluster, whose replica count
    # changes under an autoscaler, DNS_MAX_REQUESTS (headroom: the replicas shed for
    # themselves).
    max_requests: int | None = None
    # The RetryInfo delay on Envoy's refusal: about one batch on a CPU replica.
    overflow_retry_after_ms: int = 100
    # Calls without a deadline (and the cap on a client's grpc-timeout).
    unary_timeout_s: float = 60.0
    # Envoy times a call out this much before the client would, so the client gets Envoy's
    # DEADLINE_EXCEEDED rather than cancelling mid-flight.
    grpc_timeout_offset_ms: int = 20
    stream_idle_timeout_s: float = 300.0
    # Every name must answer SERVING for the host to be healthy (Envoy 1.40 runs several named
    # checks and a host passes only when all of them do).
    health_check_services: tuple[str, ...] = (
        "embedserve.v1.EmbedService",
        "embedserve.v1.RerankService",
    )
    health_check_interval_s: float = 1.0
    # Circuit breakers (cluster-wide, per priority). Streams count as requests for their life.
    max_connections: int = 1024
    max_pending_requests: int = 4096
    max_message_mb: int = 16  # the replicas' --max-message-mb: retries need the body buffered
    dns_refresh_s: float = 5.0
    node_id: str = "embedserve-envoy"
    downstream_tls: DownstreamTls | None = None
    upstream_tls: UpstreamTls | None = None

    def __post_init__(self) -> None:
        if bool(self.replicas) == (self.dns is not None):
            raise ValueError("give either replica addresses or one DNS name, not both or none")
        for name in ("port", "admin_port"):
            value = getattr(self, name)
            if not 0 < value < 65536:
                raise ValueError(f"{name} must be a TCP port, got {value}")
        if not 0.0 <= self.trace_root_ratio <= 1.0:
            raise ValueError(f"trace_root_ratio must be in [0, 1], got {self.trace_root_ratio}")
        if not self.health_check_services:
            raise ValueError("give at least one health-checked service name")
        if self.replica_in_flight < 1:
            raise ValueError("replica_in_flight must be at least 1")
        if self.max_requests is not None and self.max_requests < 1:
            raise ValueError(f"max_requests must be at least 1, got {self.max_requests}")
        if self.overflow_retry_after_ms < 0:
            raise ValueError("overflow_retry_after_ms must not be negative")

    @property
    def request_limit(self) -> int:
        """The cluster's max_requests: the explicit value, or one derived from the replicas."""
        if self.max_requests is not None:
            return self.max_requests
        if self.dns is not None:
            return DNS_MAX_REQUESTS
        return self.replica_in_flight * len(self.replicas)


def _duration(seconds: float) -> str:
    return f"{seconds:.3f}".rstrip("0").rstrip(".") + "s"


def _typed(type_name: str, **body: Any) -> Json:
    return {"@type": f"type.googleapis.com/{type_name}", **body}


def _http2_upstream(keepalive: bool) -> Json:
    http2: Json = {}
    if keepalive:
        # Finds a replica that vanished without closing its connection (a node lost).
        http2["connection_keepalive"] = {"interval": "30s", "timeout": "5s"}
    return {
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": _typed(
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            explicit_http_config={"http2_protocol_options": http2},
        )
    }


def _load_assignment(cluster: str, endpoints: Sequence[Endpoint]) -> Json:
    return {
        "cluster_name": cluster,
        "endpoints": [
            {"lb_endpoints": [{"endpoint": {"address": e.socket_address()}} for e in endpoints]}
        ],
    }


def replica_cluster(params: EnvoyParams) -> Json:
    cluster: Json = {
        "name": CLUSTER,
        "connect_timeout": "1s",
        # Full scan: the host with the fewest in-flight requests, always. Two random choices
        # (the LEAST_REQUEST default) still send a slow host a large share with 2-3 replicas.
        "load_balancing_policy": {
            "policies": [
                {
                    "typed_extension_config": {
                        "name": "envoy.load_balancing_policies.least_request",
                        "typed_config": _typed(
                            "envoy.extensions.load_balancing_policies.least_request.v3.LeastRequest",
                            selection_method="FULL_SCAN",
                        ),
                    }
                }
            ]
        },
        # Never panic: a host that is unhealthy (NOT_SERVING: warming up or draining) or ejected
        # refuses calls anyway, so spraying traffic over it would only turn retries into
        # failures. With every host down Envoy answers UNAVAILABLE at once ("no healthy
        # upstream"), which clients retry with backoff.
        "common_lb_config": {"healthy_panic_threshold": {"value": 0.0}},
        "typed_extension_protocol_options": _http2_upstream(keepalive=True),
        **(
            {"transport_socket": _upstream_tls(params.upstream_tls)}
            if params.upstream_tls is not None
            else {}
        ),
        "upstream_connection_options": {
            "tcp_keepalive": {"keepalive_time": 30, "keepalive_interval": 5, "keepalive_probes": 3}
        },
        "circuit_breakers": {
            "thresholds": [
                {
                    "priority": "DEFAULT",
                    "max_connections": params.max_connections,
                    "max_pending_requests": params.max_pending_requests,
                    "max_requests": params.request_limit,
                    # Retries may add 25% to the active requests, but never fewer than one
                    # replica's in-flight requests: losing a replica must not fail its calls.
                    "retry_budget": {
                        "budget_percent": {"value": 25.0},
                        "min_retry_concurrency": params.replica_in_flight,
                    },
                    "track_remaining": True,
                }
            ]
        },
        "outlier_detection": {
            # A replica answering UNAVAILABLE / DEADLINE_EXCEEDED (or not connecting) three
            # times in a row is ejected at once. Enforcement is 0 by default: set it.
            "consecutive_gateway_failure": CONSECUTIVE_GATEWAY_FAILURES,
            "enforcing_consecutive_gateway_failure": 100,
            "consecutive_5xx": 5,
            "enforcing_consecutive_5xx": 100,
            # A replica failing most calls (not necessarily in a row) is ejected too.
            "failure_percentage_threshold": 50,
            "enforcing_failure_percentage": 100,
            "failure_percentage_minimum_hosts": 2,
            "failure_percentage_request_volume": 10,
            "enforcing_success_rate": 0,
            "interval": "2s",
            "base_ejection_time": "10s",
            "max_ejection_time": "120s",
            # At most half the replicas out at once; the rest must carry the load.
            "max_ejection_percent": 50,
            # Default true: the next passing health check would bring a host back within ~1 s,
            # and a replica that says SERVING but fails its calls would flap in and out. Off: an
            # ejected host serves again only after its ejection time.
            "successful_active_health_check_uneject_host": False,
        },
        # One gRPC check a served API: a host is healthy only while all of them say SERVING.
        # NOT_SERVING (warming up, draining) flips the host at the next check; a dead process
        # after two failed checks.
        "health_checks": [
            {
                "name": service.rsplit(".", 1)[-1],
                "timeout": "1s",
                "interval": _duration(params.health_check_interval_s),
                "interval_jitter": "0.1s",
                "no_traffic_interval": _duration(max(2.0, params.health_check_interval_s)),
                "unhealthy_threshold": 2,
                "healthy_threshold": 1,
                "reuse_connection": True,
                "grpc_health_check": {"service_name": service},
            }
            for service in params.health_check_services
        ],
    }
    if params.dns is not None:
        # STRICT_DNS (every address the name resolves to is a host), in the extension form
        # that Envoy 1.40 wants (the cluster-level dns_* fields are deprecated).
        cluster.update(
            {
                "cluster_type": {
                    "name": "envoy.cluster.dns",
                    "typed_config": _typed(
                        "envoy.extensions.clusters.dns.v3.DnsCluster",
                        all_addresses_in_single_endpoint=False,
                        dns_lookup_family="V4_PREFERRED",
                        # Pods come and go: re-resolve often, whatever the record's TTL.
                        dns_refresh_rate=_duration(params.dns_refresh_s),
                        respect_dns_ttl=False,
                    ),
                },
                "load_assignment": _load_assignment(CLUSTER, [params.dns]),
            }
        )
    else:
        cluster.update(
            {"type": "STATIC", "load_assignment": _load_assignment(CLUSTER, params.replicas)}
        )
    return cluster


def _retry_policy(retry_on: str, num_retries: int, backoff: bool) -> Json:
    policy: Json = {
        "retry_on": retry_on,
        "num_retries": num_retries,
        # Each retry goes to a host not tried yet for this call.
        "retry_host_predicate": [
            {
                "name": "envoy.retry_host_predicates.previous_hosts",
                "typed_config": _typed(
                    "envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"
                ),
            }
        ],
        "host_selection_retry_max_attempts": 5,
    }
    if backoff:
        policy["retry_back_off"] = {"base_interval": "0.025s", "max_interval": "0.25s"}
    return policy


def _routes(params: EnvoyParams) -> list[Json]:
    buffer_limit = params.max_message_mb * 1024 * 1024
    stream_route: Json = {
        "cluster": CLUSTER,
        "timeout": "0s",  # no cap on a stream's life
        "idle_timeout": _duration(params.stream_idle_timeout_s),
        "retry_policy": _retry_policy(STREAM_RETRY_ON, 2, backoff=True),
    }
    unary_route: Json = {
        "cluster": CLUSTER,
        "timeout": _duration(params.unary_timeout_s),
        "max_stream_duration": {
            # The client's grpc-timeout is the call's deadline (capped), less a small offset
            # so Envoy answers DEADLINE_EXCEEDED just before the client gives up.
            "max_stream_duration": _duration(params.unary_timeout_s),
            "grpc_timeout_header_max": _duration(params.unary_timeout_s),
            "grpc_timeout_header_offset": _duration(params.grpc_timeout_offset_ms / 1000.0),
        },
        # Three retries: four attempts, one more than the detector's consecutive failures: least-
        # request picks the host with the fewest calls, and a replica that just died has
        # none, so previous_hosts cannot steer a retry away from it (its reselection gets
        # the same host). A call's first three attempts could all meet the dead replica; the
        # fourth comes after its ejection. With two retries, a kill -9 failed about one
        # call in a few thousand (tests/test_envoy.py, ninth session).
        "retry_policy": _retry_policy(UNARY_RETRY_ON, UNARY_RETRIES, backoff=True),
    }
    routes: list[Json] = [
        {
            "name": "embed_stream",
            "match": {"path": STREAM_PATH, "grpc": {}},
            "route": stream_route,
            "request_body_buffer_limit": buffer_limit,
        }
    ]
    for index, path in enumerate(OTHER_STREAM_PATHS):
        routes.append(
            {
                "name": f"stream_{index}",
                "match": {"path": path, "grpc": {}},
                "route": {**stream_route, "retry_policy": _retry_policy("refused-stream", 1, True)},
            }
        )
    routes.append(
        {
            "name": "unary",
            "match": {"prefix": "/", "grpc": {}},
            "route": unary_route,
            "request_body_buffer_limit": buffer_limit,
        }
    )
    return routes


ACCESS_LOG_FORMAT: Json = {
    "start_time": "%START_TIME%",
    "method": "%REQ(:PATH)%",
    "grpc_status": "%GRPC_STATUS%",
    "grpc_status_code": "%GRPC_STATUS_NUMBER%",
    "response_code": "%RESPONSE_CODE%",
    "response_flags": "%RESPONSE_FLAGS%",
    "details": "%RESPONSE_CODE_DETAILS%",
    "upstream_host": "%UPSTREAM_HOST%",
    "attempts": "%UPSTREAM_REQUEST_ATTEMPT_COUNT%",
    "duration_ms": "%DURATION%",
    "upstream_service_ms": "%RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)%",
    "grpc_timeout": "%REQ(GRPC-TIMEOUT)%",
    "trace_id": "%TRACE_ID%",
    "traceparent": "%REQ(TRACEPARENT)%",
    "request_id": "%REQ(X-REQUEST-ID)%",
    "downstream": "%DOWNSTREAM_REMOTE_ADDRESS%",
    "bytes_received": "%BYTES_RECEIVED%",
    "bytes_sent": "%BYTES_SENT%",
}


def _access_log(params: EnvoyParams) -> list[Json]:
    log_format = {"json_format": ACCESS_LOG_FORMAT}
    if params.access_log_path is None:
        logger = _typed(
            "envoy.extensions.access_loggers.stream.v3.StdoutAccessLog", log_format=log_format
        )
        name = "envoy.access_loggers.stdout"
    else:
        logger = _typed(
            "envoy.extensions.access_loggers.file.v3.FileAccessLog",
            path=params.access_log_path,
            log_format=log_format,
        )
        name = "envoy.access_loggers.file"
    return [{"name": name, "typed_config": logger}]


def _tracing(params: EnvoyParams) -> Json | None:
    if params.otlp is None:
        return None
    ratio_sampler = {
        "name": "envoy.tracers.opentelemetry.samplers.trace_id_ratio_based",
        "typed_config": _typed(
            "envoy.extensions.tracers.opentelemetry.samplers.v3.TraceIdRatioBasedSamplerConfig",
            sampling_percentage={
                "numerator": round(params.trace_root_ratio * 1_000_000),
                "denominator": "MILLION",
            },
        ),
    }
    return {
        # Keep at 100: below it Envoy overrides even sampled parents and forwards "-00".
        # Root sampling is the OpenTelemetry sampler's job (parent-based below).
        "random_sampling": {"value": 100.0},
        # One CLIENT span per upstream attempt: retries show up in the trace.
        "spawn_upstream_span": True,
        "provider": {
            "name": "envoy.tracers.opentelemetry",
            "typed_config": _typed(
                "envoy.config.trace.v3.OpenTelemetryConfig",
                grpc_service={"envoy_grpc": {"cluster_name": COLLECTOR_CLUSTER}, "timeout": "1s"},
                service_name=params.trace_service_name,
                sampler={
                    "name": "envoy.tracers.opentelemetry.samplers.parent_based",
                    "typed_config": _typed(
                        "envoy.extensions.tracers.opentelemetry.samplers.v3.ParentBasedSamplerConfig",
                        wrapped_sampler=ratio_sampler,
                    ),
                },
            ),
        },
    }


def overflow_status(params: EnvoyParams) -> status_pb2.Status:
    """What a client gets when the cluster is at its in-flight limit: the google.rpc.Status a
    replica sends when it refuses work (RESOURCE_EXHAUSTED, ErrorInfo OVERLOADED, RetryInfo),
    so that clients need no Envoy-specific handling."""
    delay = duration_pb2.Duration()
    delay.FromMilliseconds(params.overflow_retry_after_ms)
    details = [
        error_details_pb2.ErrorInfo(
            reason=OVERFLOW_REASON,
            domain=ERROR_DOMAIN,
            metadata={"refused_by": "envoy", "max_requests": str(params.request_limit)},
        ),
        error_details_pb2.RetryInfo(retry_delay=delay),
    ]
    packed = []
    for detail in details:
        item = any_pb2.Any()
        item.Pack(detail, deterministic=True)
        packed.append(item)
    message = (
        f"every replica is busy: the cluster's {params.request_limit} in-flight calls are taken; "
        f"retry after {params.overflow_retry_after_ms} ms"
    )
    return status_pb2.Status(code=code_pb2.RESOURCE_EXHAUSTED, message=message, details=packed)


def _overflow_reply(params: EnvoyParams) -> Json:
    """Envoy answers a circuit-breaker overflow (flag UO) UNAVAILABLE by default, which reads as
    "this replica is down". It is overload: rewrite it to the replicas' own refusal. Envoy
    keeps a grpc-status that a local-reply mapper set, and sends the body as grpc-message."""
    status = overflow_status(params)
    # Deterministic: the committed deploy configs must not drift with map order.
    encoded = base64.b64encode(status.SerializeToString(deterministic=True)).decode("ascii")
    return {
        "mappers": [
            {
                "filter": {"response_flag_filter": {"flags": ["UO"]}},
                "headers_to_add": [
                    _header("grpc-status", str(status.code)),
                    _header("grpc-status-details-bin", encoded),
                ],
                "body": {"inline_string": status.message},
            }
        ]
    }


def _header(key: str, value: str) -> Json:
    return {"header": {"key": key, "value": value}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}


def _grpc_listener(params: EnvoyParams) -> Json:
    manager: Json = _typed(
        "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        stat_prefix="grpc_ingress",
        codec_type="AUTO",
        use_remote_address=True,
        generate_request_id=True,
        http2_protocol_options={"max_concurrent_streams": 1024},
        common_http_protocol_options={"idle_timeout": "3600s"},
        access_log=_access_log(params),
        local_reply_config=_overflow_reply(params),
        route_config={
            "name": CLUSTER,
            "virtual_hosts": [{"name": CLUSTER, "domains": ["*"], "routes": _routes(params)}],
        },
        http_filters=[
            {
                "name": "envoy.filters.http.grpc_stats",
                "typed_config": _typed(
                    "envoy.extensions.filters.http.grpc_stats.v3.FilterConfig",
                    stats_for_all_methods=True,
                    enable_upstream_stats=True,
                    replace_dots_in_grpc_service_name=True,
                    emit_filter_state=True,
                ),
            },
            {
                "name": "envoy.filters.http.router",
                "typed_config": _typed("envoy.extensions.filters.http.router.v3.Router"),
            },
        ],
    )
    tracing = _tracing(params)
    if tracing is not None:
        manager["tracing"] = tracing
    chain: Json = {
        "filters": [
            {
                "name": "envoy.filters.network.http_connection_manager",
                "typed_config": manager,
            }
        ]
    }
    if params.downstream_tls is not None:
        chain["transport_socket"] = _downstream_tls(params.downstream_tls)
    return {
        "name": "grpc",
        "address": Endpoint(params.listen_host, params.port).socket_address(),
        "filter_chains": [chain],
    }


def _ready_listener(params: EnvoyParams, port: int) -> Json:
    """Only GET /ready of the admin, on a public port, for kubelet probes."""
    manager = _typed(
        "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        stat_prefix="ready",
        codec_type="HTTP1",
        route_config={
            "name": "ready",
            "virtual_hosts": [
                {
                    "name": "ready",
                    "domains": ["*"],
                    "routes": [
                        {
                            "match": {"path": "/ready", "headers": [_method_is("GET")]},
                            "route": {"cluster": ADMIN_CLUSTER, "timeout": "2s"},
                        },
                        {"match": {"prefix": "/"}, "direct_response": {"status": 404}},
                    ],
                }
            ],
        },
        http_filters=[
            {
                "name": "envoy.filters.http.router",
                "typed_config": _typed("envoy.extensions.filters.http.router.v3.Router"),
            }
        ],
    )
    return {
        "name": "ready",
        "address": Endpoint(params.listen_host, port).socket_address(),
        "filter_chains": [
            {
                "filters": [
                    {
                        "name": "envoy.filters.network.http_connection_manager",
                        "typed_config": manager,
                    }
                ]
            }
        ],
    }


def _method_is(method: str) -> Json:
    return {"name": ":method", "string_match": {"exact": method}}


def render(params: EnvoyParams) -> Json:
    """The whole bootstrap config as a JSON-able dict."""
    clusters: list[Json] = [replica_cluster(params)]
    listeners = [_grpc_listener(params)]
    if params.otlp is not None:
        clusters.append(
            {
                "name": COLLECTOR_CLUSTER,
                "cluster_type": {
                    "name": "envoy.cluster.dns",
                    "typed_config": _typed(
                        "envoy.extensions.clusters.dns.v3.DnsCluster",
                        dns_lookup_family="V4_PREFERRED",
                    ),
                },
                "connect_timeout": "1s",
                "typed_extension_protocol_options": _http2_upstream(keepalive=False),
                "load_assignment": _load_assignment(COLLECTOR_CLUSTER, [params.otlp]),
            }
        )
    if params.ready_port is not None:
        listeners.append(_ready_listener(params, params.ready_port))
        clusters.append(
            {
                "name": ADMIN_CLUSTER,
                "type": "STATIC",
                "connect_timeout": "1s",
                "load_assignment": _load_assignment(
                    ADMIN_CLUSTER, [Endpoint(ADMIN_HOST, params.admin_port)]
                ),
            }
        )
    return {
        "node": {"id": params.node_id, "cluster": CLUSTER},
        "admin": {"address": Endpoint(ADMIN_HOST, params.admin_port).socket_address()},
        "static_resources": {"listeners": listeners, "clusters": clusters},
        "overload_manager": {
            "resource_monitors": [
                {
                    "name": "envoy.resource_monitors.global_downstream_max_connections",
                    "typed_config": _typed(
                        "envoy.extensions.resource_monitors.downstream_connections.v3.DownstreamConnectionsConfig",
                        max_active_downstream_connections=10000,
                    ),
                }
            ]
        },
    }


HEADER = (
    "# Generated by `python -m embedserve.envoy.render` (envoy/render.py): do not edit by hand.\n"
)


def to_yaml(config: Json, header: str = HEADER) -> str:
    import yaml

    return header + yaml.safe_dump(config, sort_keys=False, width=100)


def write(params: EnvoyParams, path: Path) -> Path:
    config = render(params)
    text = json.dumps(config, indent=2) + "\n" if path.suffix == ".json" else to_yaml(config)
    path.write_text(text)
    return path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m embedserve.envoy.render",
        description="Render the Envoy config for N embedserve replicas.",
    )
    upstream = parser.add_mutually_exclusive_group(required=True)
    upstream.add_argument("--replicas", help="host:port,host:port,... (a STATIC cluster)")
    upstream.add_argument("--dns", help="name:port resolved by Envoy (a STRICT_DNS cluster)")
    parser.add_argument("--listen-host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080, help="the gRPC listener's port")
    parser.add_argument("--admin-port", type=int, default=9901, help="admin, on 127.0.0.1")
    parser.add_argument("--ready-port", type=int, help="a listener exposing only /ready")
    parser.add_argument("--otlp", help="host:port of an OTLP/gRPC collector: turns tracing on")
    parser.add_argument("--trace-root-ratio", type=float, default=1.0)
    parser.add_argument("--access-log", help="a file for the JSON access log (default: stdout)")
    parser.add_argument(
        "--replica-in-flight",
        type=int,
        default=32,
        help="calls one replica may hold: the retry budget's floor and, with --replicas, the "
        "cluster's in-flight limit (x the replica count) [32]",
    )
    parser.add_argument(
        "--max-requests",
        type=int,
        help="calls in flight to the whole cluster before Envoy refuses with RESOURCE_EXHAUSTED "
        f"[replica-in-flight x replicas; {DNS_MAX_REQUESTS} with --dns]",
    )
    parser.add_argument("--overflow-retry-after-ms", type=int, default=100)
    parser.add_argument("--unary-timeout-s", type=float, default=60.0)
    parser.add_argument("--tls-cert", help="PEM certificate: terminate TLS from clients")
    parser.add_argument("--tls-key", help="PEM key of --tls-cert")
    parser.add_argument("--tls-client-ca", help="PEM CA: require client certificates (mTLS)")
    parser.add_argument("--upstream-ca", help="PEM CA: speak TLS to the replicas, verified")
    parser.add_argument("--upstream-cert", help="PEM client certificate for the replicas")
    parser.add_argument("--upstream-key", help="PEM key of --upstream-cert")
    parser.add_argument("--upstream-sni", help="SNI sent to the replicas")
    parser.add_argument("--output", type=Path, help="the file to write (.yaml or .json)")
    return parser


def params_from_args(args: argparse.Namespace) -> EnvoyParams:
    if bool(args.tls_cert) != bool(args.tls_key):
        raise ValueError("--tls-cert and --tls-key go together")
    return EnvoyParams(
        replicas=tuple(Endpoint.parse(r) for r in args.replicas.split(",") if r.strip())
        if args.replicas
        else (),
        dns=Endpoint.parse(args.dns) if args.dns else None,
        listen_host=args.listen_host,
        port=args.port,
        admin_port=args.admin_port,
        ready_port=args.ready_port,
        otlp=Endpoint.parse(args.otlp) if args.otlp else None,
        trace_root_ratio=args.trace_root_ratio,
        access_log_path=args.access_log,
        replica_in_flight=args.replica_in_flight,
        max_requests=args.max_requests,
        overflow_retry_after_ms=args.overflow_retry_after_ms,
        unary_timeout_s=args.unary_timeout_s,
        downstream_tls=DownstreamTls(args.tls_cert, args.tls_key, args.tls_client_ca)
        if args.tls_cert and args.tls_key
        else None,
        upstream_tls=UpstreamTls(
            args.upstream_ca, args.upstream_cert, args.upstream_key, args.upstream_sni
        )
        if args.upstream_ca
        else None,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        params = params_from_args(args)
    except ValueError as exc:
        parser.error(str(exc))
    if args.output is None:
        sys.stdout.write(to_yaml(render(params)))
    else:
        write(params, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())

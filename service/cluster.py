"""``embedserve cluster``: the production topology on one machine.

N ``embedserve serve`` replicas on free loopback ports behind one real Envoy (the ``envoy``
extra), with the config that compose and Kubernetes use (envoy/render.py), STATIC addresses
instead of DNS. SIGTERM/SIGINT drain the replicas first (health NOT_SERVING, Envoy moves away,
accepted calls finish), then stop Envoy. No child outlives the command: children also get
SIGTERM from the kernel if this process dies (PR_SET_PDEATHSIG).

TLS: ``--tls-cert/--tls-key`` make Envoy's listener speak TLS (``--tls-client-ca``: mutual).
``--upstream-ca`` also starts the replicas with TLS, serving that same certificate, which Envoy
and the readiness probe here verify against the CA; ``--upstream-cert/--upstream-key`` are the
client certificate Envoy (and the probe) present, and make the replicas require one signed by
``--upstream-ca``. The flags mean what they mean to ``python -m embedserve.envoy.render``.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from embedserve.envoy.process import EnvoyNotInstalled, EnvoyProcess, envoy_binary
from embedserve.envoy.render import (
    CLUSTER,
    DownstreamTls,
    Endpoint,
    EnvoyParams,
    UpstreamTls,
    write,
)
from embedserve.service.security.handshake import ClientEnd, ServerEnd, UnusableEnd, handshake

log = logging.getLogger("embedserve.cluster")

PR_SET_PDEATHSIG = 1
# Loopback ports the replicas listen on are picked here; the listener and admin are the user's.
HOST = "127.0.0.1"
# The cluster decides the replicas' TLS itself: these are never inherited from its environment.
REPLICA_TLS_ENV = ("EMBEDSERVE_TLS_CERT", "EMBEDSERVE_TLS_KEY", "EMBEDSERVE_TLS_CLIENT_CA")


def register(commands: Any) -> None:
    """Add ``cluster`` to the ``embedserve`` parser."""
    parser = commands.add_parser(
        "cluster",
        help="run N replicas behind a real Envoy on this machine",
        description="Start N `embedserve serve` replicas on free loopback ports and one Envoy "
        "(least-request balancing, health checks, outlier ejection, retries) in front of them. "
        "Prints one JSON line with the listener and admin addresses when everything is ready. "
        "SIGTERM or SIGINT drains the replicas, then stops Envoy. Replica settings not listed "
        "here come from EMBEDSERVE_* environment variables, which the replicas inherit.",
    )
    parser.add_argument("--replicas", type=int, default=2, help="number of replicas [2]")
    parser.add_argument("--host", default=HOST, help="Envoy's listener address [127.0.0.1]")
    parser.add_argument("--port", type=int, default=8080, help="Envoy's gRPC listener [8080]")
    parser.add_argument(
        "--admin-port", type=int, default=9901, help="Envoy's admin UI, on 127.0.0.1 [9901]"
    )
    parser.add_argument("--model", help="embedding model folder (each replica's --model)")
    parser.add_argument("--model-name")
    parser.add_argument("--reranker", help="reranker folder (each replica's --reranker)")
    parser.add_argument("--reranker-name")
    parser.add_argument("--device", help="each replica's --device")
    parser.add_argument(
        "--replica-threads",
        type=int,
        help="each replica's --threads (default: the cores divided among the replicas)",
    )
    parser.add_argument("--warmup", choices=("true", "false"), help="each replica's --warmup")
    parser.add_argument(
        "--replica-in-flight",
        type=int,
        default=32,
        help="calls each replica may hold; past replicas x this, Envoy refuses calls itself "
        "with RESOURCE_EXHAUSTED (in microseconds, so a flood never reaches the replicas' "
        "event loops), and each replica refuses past this itself (its --max-calls-in-flight), "
        "so that the two limits agree; raise it for GPU replicas, whose best batch is "
        "larger [32]",
    )
    parser.add_argument(
        "--drain-delay-s",
        type=float,
        default=2.0,
        help="each replica's --drain-delay-s; above Envoy's 1 s health-check interval so that "
        "Envoy moves away before the replica refuses calls [2.0]",
    )
    parser.add_argument("--grace-period-s", type=float, default=30.0)
    parser.add_argument("--otlp", help="host:port of an OTLP/gRPC collector: Envoy traces")
    parser.add_argument("--access-log", help="Envoy's JSON access log file (default: stderr)")
    parser.add_argument(
        "--envoy-config", type=Path, help="also keep the rendered Envoy config here"
    )
    parser.add_argument(
        "--startup-timeout-s",
        type=float,
        default=300.0,
        help="how long the replicas may take to report SERVING [300]",
    )
    tls = parser.add_argument_group(
        "TLS",
        "Client to Envoy: --tls-cert/--tls-key (--tls-client-ca: mutual). Envoy to the "
        "replicas: --upstream-ca starts the replicas with TLS, serving --tls-cert/--tls-key, "
        "which must be signed by that CA and name 127.0.0.1 (the address the replicas are "
        "dialled at); --upstream-cert/--upstream-key make them require a client certificate "
        "signed by --upstream-ca, which Envoy presents.",
    )
    tls.add_argument("--tls-cert", type=Path, help="PEM certificate chain of the listener")
    tls.add_argument("--tls-key", type=Path, help="PEM private key of --tls-cert")
    tls.add_argument(
        "--tls-client-ca",
        type=Path,
        help="PEM CA bundle: the listener requires client certificates it signed (mutual TLS)",
    )
    tls.add_argument(
        "--upstream-ca",
        type=Path,
        help="PEM CA bundle: TLS from Envoy to the replicas (which serve --tls-cert), verified "
        "against it",
    )
    tls.add_argument(
        "--upstream-cert",
        type=Path,
        help="PEM client certificate Envoy presents to the replicas; they then require one "
        "signed by --upstream-ca (mutual TLS)",
    )
    tls.add_argument("--upstream-key", type=Path, help="PEM private key of --upstream-cert")
    parser.set_defaults(handler=run)


class TlsFlagsError(ValueError):
    pass


@dataclass(frozen=True)
class ClusterTls:
    """The checked TLS flags. All None: plaintext everywhere."""

    cert: Path | None = None
    key: Path | None = None
    client_ca: Path | None = None
    upstream_ca: Path | None = None
    upstream_cert: Path | None = None
    upstream_key: Path | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ClusterTls:
        """Refuses incoherent combinations and unreadable files, before anything starts."""
        tls = cls(
            args.tls_cert,
            args.tls_key,
            args.tls_client_ca,
            args.upstream_ca,
            args.upstream_cert,
            args.upstream_key,
        )
        if (tls.cert is None) != (tls.key is None):
            raise TlsFlagsError("--tls-cert and --tls-key go together")
        if tls.client_ca is not None and tls.cert is None:
            raise TlsFlagsError("--tls-client-ca needs --tls-cert and --tls-key")
        if tls.upstream_ca is not None and tls.cert is None:
            raise TlsFlagsError(
                "--upstream-ca needs --tls-cert and --tls-key: the replicas serve that certificate"
            )
        if (tls.upstream_cert is None) != (tls.upstream_key is None):
            raise TlsFlagsError("--upstream-cert and --upstream-key go together")
        if tls.upstream_cert is not None and tls.upstream_ca is None:
            raise TlsFlagsError("--upstream-cert and --upstream-key need --upstream-ca")
        for flag, path in (
            ("--tls-cert", tls.cert),
            ("--tls-key", tls.key),
            ("--tls-client-ca", tls.client_ca),
            ("--upstream-ca", tls.upstream_ca),
            ("--upstream-cert", tls.upstream_cert),
            ("--upstream-key", tls.upstream_key),
        ):
            if path is not None:
                _check_pem(flag, path)
        tls._check_upstream_handshake()
        return tls

    def _check_upstream_handshake(self) -> None:
        """Envoy's TLS to the replicas, tried in memory before anything starts: a pairing that
        cannot work is refused here, naming the flag, instead of showing up as replicas that
        never become reachable."""
        if self.upstream_ca is None or self.cert is None or self.key is None:
            return
        replica = ServerEnd(self.cert, self.key, self.upstream_ca if self.upstream_mutual else None)
        envoy = ClientEnd(self.upstream_ca, HOST, self.upstream_cert, self.upstream_key)
        try:
            failure = handshake(replica, envoy)
        except UnusableEnd as exc:
            flags = (
                "--tls-cert/--tls-key" if exc.end == "server" else "--upstream-cert/--upstream-key"
            )
            raise TlsFlagsError(f"{flags} cannot be used for TLS: {exc.reason}") from exc
        if failure is None:
            return
        if failure.refused_by == "client":
            raise TlsFlagsError(
                f"Envoy would refuse the replicas' certificate (--tls-cert): it must be signed "
                f"by --upstream-ca and name {HOST}, the address the replicas are dialled at: "
                f"{failure.reason}"
            )
        raise TlsFlagsError(
            f"the replicas would refuse Envoy's client certificate (--upstream-cert): it must "
            f"be signed by --upstream-ca: {failure.reason}"
        )

    @property
    def listener(self) -> bool:
        return self.cert is not None

    @property
    def upstream(self) -> bool:
        return self.upstream_ca is not None

    @property
    def upstream_mutual(self) -> bool:
        return self.upstream_cert is not None

    def downstream_params(self) -> DownstreamTls | None:
        if self.cert is None or self.key is None:
            return None
        return DownstreamTls(
            str(self.cert.resolve()),
            str(self.key.resolve()),
            str(self.client_ca.resolve()) if self.client_ca is not None else None,
        )

    def upstream_params(self) -> UpstreamTls | None:
        if self.upstream_ca is None:
            return None
        return UpstreamTls(
            str(self.upstream_ca.resolve()),
            str(self.upstream_cert.resolve()) if self.upstream_cert is not None else None,
            str(self.upstream_key.resolve()) if self.upstream_key is not None else None,
        )

    def replica_flags(self) -> list[str]:
        """Each replica's TLS flags: the listener's certificate, and the upstream CA for client
        certificates when Envoy presents one."""
        if not self.upstream or self.cert is None or self.key is None:
            return []
        flags = ["--tls-cert", str(self.cert.resolve()), "--tls-key", str(self.key.resolve())]
        if self.upstream_mutual and self.upstream_ca is not None:
            flags += ["--tls-client-ca", str(self.upstream_ca.resolve())]
        return flags

    def probe_credentials(self) -> grpc.ChannelCredentials | None:
        """What the readiness probe dials the replicas with: what Envoy uses."""
        if self.upstream_ca is None:
            return None
        return grpc.ssl_channel_credentials(
            self.upstream_ca.read_bytes(),
            self.upstream_key.read_bytes() if self.upstream_key is not None else None,
            self.upstream_cert.read_bytes() if self.upstream_cert is not None else None,
        )

    def summary(self) -> dict[str, bool]:
        return {
            "tls": self.listener,
            "mutual_tls": self.client_ca is not None,
            "upstream_tls": self.upstream,
            "upstream_mutual_tls": self.upstream_mutual,
        }


def _check_pem(flag: str, path: Path) -> None:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise TlsFlagsError(f"{flag}: cannot read {path}: {exc.strerror}") from exc
    if b"-----BEGIN " not in data:
        raise TlsFlagsError(f"{flag}: {path} is not PEM (no -----BEGIN line)")


@dataclass
class Replica:
    port: int
    process: subprocess.Popen[bytes]
    metrics_port: int

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


# Looked up here, not in the child between fork and exec.
_prctl = getattr(ctypes.CDLL(None, use_errno=True), "prctl", None)  # Linux only


def die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the cluster process dies (even by SIGKILL)."""
    if _prctl is not None:
        _prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM))


def _spawn(command: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
    # Own process group: a Ctrl-C in the terminal reaches only this command, which drains the
    # replicas in order instead of every child stopping at once.
    return subprocess.Popen(command, start_new_session=True, preexec_fn=die_with_parent, **kwargs)


def replica_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in REPLICA_TLS_ENV}


def replica_command(
    args: argparse.Namespace,
    port: int,
    threads: int,
    metrics_port: int,
    tls: ClusterTls | None = None,
) -> list[str]:
    command = [
        sys.executable,
        "-m",
        "embedserve.service",
        "serve",
        "--host",
        HOST,
        "--port",
        str(port),
        "--threads",
        str(threads),
        "--drain-delay-s",
        str(args.drain_delay_s),
        "--grace-period-s",
        str(args.grace_period_s),
        "--metrics-port",
        str(metrics_port),
        # Below Envoy's share, a replica would refuse calls Envoy admitted and Envoy would
        # retry them: refusals paid twice, in Python. Measured: 10x the admitted p99 at 4x
        # capacity with Envoy at 64 a replica over replicas at 32 (docs/benchmarks.md).
        "--max-calls-in-flight",
        str(args.replica_in_flight),
    ]
    for flag in ("model", "model_name", "reranker", "reranker_name", "device", "warmup"):
        value = getattr(args, flag)
        if value is not None:
            command += ["--" + flag.replace("_", "-"), str(value)]
    if tls is not None:
        command += tls.replica_flags()
    return command


class TlsHandshakeError(RuntimeError):
    """The replica is up, but TLS with it fails: a certificate or CA problem, not a wait."""


# What grpc core says when the handshake, not the connection, failed.
# ("Tls handshake failed", "CERTIFICATE_VERIFY_FAILED", "Hostname Verification Check failed");
# a replica still loading refuses the connection instead.
_HANDSHAKE_FAILURES = ("handshake", "certificate", "verification", "peer name")


def probe(
    port: int, timeout: float = 1.0, credentials: grpc.ChannelCredentials | None = None
) -> str | None:
    """None when grpc.health.v1 says SERVING for the whole server (""), else why not. With
    ``credentials``, over TLS; raises TlsHandshakeError when the replica answers but the
    handshake fails (that does not get better by waiting)."""
    target = f"{HOST}:{port}"
    channel = (
        grpc.insecure_channel(target)
        if credentials is None
        else grpc.secure_channel(target, credentials)
    )
    with channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=timeout
            )
        except grpc.RpcError as exc:
            details = str(exc.details() if isinstance(exc, grpc.Call) else exc)
            if credentials is not None and any(
                word in details.lower() for word in _HANDSHAKE_FAILURES
            ):
                raise TlsHandshakeError(details) from exc
            return details
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))
    return None


class _Stop:
    """Set by SIGTERM/SIGINT; a second signal asks for an immediate stop."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.count = 0
        self.signal_name = ""

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        self.count += 1
        self.signal_name = signal.Signals(signum).name
        self.event.set()


def _emit(event: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


def run(args: argparse.Namespace) -> int:
    from embedserve.service import logs

    logs.configure("info")
    for flag, value in (
        ("--replicas", args.replicas),
        ("--replica-in-flight", args.replica_in_flight),
    ):
        if value < 1:
            log.error("%s must be at least 1", flag)
            return 2
    try:
        tls = ClusterTls.from_args(args)
    except TlsFlagsError as exc:
        log.error("cannot start: %s", exc)
        return 2
    try:
        envoy_binary()
        import yaml  # noqa: F401  (the envoy extra: the rendered config is YAML)
    except (ImportError, EnvoyNotInstalled) as exc:
        log.error("cannot start: %s", exc)
        return 2

    stop = _Stop()
    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    cores = len(os.sched_getaffinity(0))
    threads = args.replica_threads or max(1, cores // args.replicas)
    replicas: list[Replica] = []
    envoy: EnvoyProcess | None = None
    workdir = Path(tempfile.mkdtemp(prefix="embedserve-cluster-"))
    code = 0
    try:
        for _ in range(args.replicas):
            port, metrics_port = free_port(), free_port()
            command = replica_command(args, port, threads, metrics_port, tls)
            process = _spawn(command, stdout=subprocess.DEVNULL, env=replica_env())
            replicas.append(Replica(port, process, metrics_port))
        log.info(
            "starting replicas",
            extra={"replicas": [r.address for r in replicas], "threads": threads, **tls.summary()},
        )
        if not _wait_serving(replicas, args.startup_timeout_s, stop, tls.probe_credentials()):
            code = 1
            return code
        config_path = args.envoy_config or workdir / "envoy.yaml"
        params = EnvoyParams(
            replicas=tuple(Endpoint(HOST, r.port) for r in replicas),
            listen_host=args.host,
            port=args.port,
            admin_port=args.admin_port,
            replica_in_flight=args.replica_in_flight,
            otlp=Endpoint.parse(args.otlp) if args.otlp else None,
            access_log_path=args.access_log,
            downstream_tls=tls.downstream_params(),
            upstream_tls=tls.upstream_params(),
        )
        write(params, config_path)
        envoy = EnvoyProcess(
            config_path,
            args.admin_port,
            stdout=sys.stderr,  # the access log (stdout is this command's JSON lines)
            new_session=True,
            preexec_fn=die_with_parent,
        )
        _wait_envoy(envoy, CLUSTER, len(replicas), stop)
        _emit(
            {
                "event": "ready",
                "listener": f"{args.host}:{args.port}",
                **tls.summary(),
                "admin": f"http://127.0.0.1:{args.admin_port}/",
                "envoy_metrics": f"http://127.0.0.1:{args.admin_port}/stats/prometheus",
                "envoy_config": str(config_path),
                "pid": os.getpid(),
                "envoy_pid": envoy.pid,
                "replicas": [
                    {
                        "address": r.address,
                        "pid": r.process.pid,
                        "metrics": f"http://{HOST}:{r.metrics_port}/metrics",
                    }
                    for r in replicas
                ],
            }
        )
        code = _supervise(replicas, envoy, stop)
    except (OSError, RuntimeError, TimeoutError) as exc:
        log.error("cluster failed: %s", exc)
        code = 1
    finally:
        _shutdown(replicas, envoy, stop, args.drain_delay_s + args.grace_period_s + 10)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for path in sorted(workdir.glob("*")):
            path.unlink()
        workdir.rmdir()
        _emit({"event": "stopped", "code": code})
    return code


def _wait_serving(
    replicas: list[Replica],
    timeout: float,
    stop: _Stop,
    credentials: grpc.ChannelCredentials | None = None,
) -> bool:
    end = time.monotonic() + timeout
    pending = list(replicas)
    why: dict[str, str] = {}
    while pending:
        if stop.event.is_set():
            log.error("interrupted while the replicas were starting")
            return False
        for replica in list(pending):
            code = replica.process.poll()
            if code is not None:
                log.error(
                    "a replica exited while starting",
                    extra={"replica": replica.address, "exit_code": code},
                )
                return False
            try:
                problem = probe(replica.port, credentials=credentials)
            except TlsHandshakeError as exc:
                log.error(
                    "TLS with a replica fails: its certificate (--tls-cert) must be signed by "
                    "--upstream-ca and name 127.0.0.1",
                    extra={"replica": replica.address, "error": str(exc)},
                )
                return False
            if problem is None:
                pending.remove(replica)
            else:
                why[replica.address] = problem
        if pending and time.monotonic() > end:
            log.error(
                "replicas not SERVING in time",
                extra={"pending": {r.address: why.get(r.address, "") for r in pending}},
            )
            return False
        if pending:
            stop.event.wait(0.2)
    return True


def _wait_envoy(envoy: EnvoyProcess, cluster: str, count: int, stop: _Stop) -> None:
    envoy.wait_ready(timeout=30)
    envoy.wait_healthy(cluster, count, timeout=30)
    if stop.event.is_set():
        raise RuntimeError("interrupted while Envoy was starting")


def _supervise(replicas: list[Replica], envoy: EnvoyProcess, stop: _Stop) -> int:
    """Until a signal (0) or Envoy's death (1); a replica that dies is reported, not fatal."""
    reported: set[int] = set()
    while not stop.event.wait(0.5):
        if envoy.process.poll() is not None:
            log.error("envoy exited", extra={"exit_code": envoy.process.returncode})
            return 1
        for replica in replicas:
            code = replica.process.poll()
            if code is not None and replica.port not in reported:
                reported.add(replica.port)
                log.warning(
                    "a replica exited; Envoy routes around it",
                    extra={"replica": replica.address, "exit_code": code},
                )
        if len(reported) == len(replicas):
            log.error("every replica has exited")
            return 1
    log.info("stopping: draining the replicas", extra={"signal": stop.signal_name})
    return 0


def _shutdown(
    replicas: list[Replica], envoy: EnvoyProcess | None, stop: _Stop, drain_timeout: float
) -> None:
    """Replicas first (SIGTERM: they drain while Envoy still routes their last calls), then Envoy.
    A second signal, or the timeout, kills what is left."""
    for replica in replicas:
        if replica.process.poll() is None:
            replica.process.send_signal(signal.SIGTERM)
    signals_seen = stop.count
    end = time.monotonic() + drain_timeout
    for replica in replicas:
        while replica.process.poll() is None:
            if stop.count > signals_seen or time.monotonic() > end:
                replica.process.kill()
            try:
                replica.process.wait(0.2)
            except subprocess.TimeoutExpired:
                continue
    if envoy is not None:
        envoy.stop(timeout=10)

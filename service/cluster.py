"""``embedserve cluster``: the production topology on one machine.

N ``embedserve serve`` replicas on free loopback ports behind one real Envoy (the ``envoy``
extra), with the config that compose and Kubernetes use (envoy/render.py), STATIC addresses
instead of DNS. SIGTERM/SIGINT drain the replicas first (health NOT_SERVING, Envoy moves away,
accepted calls finish), then stop Envoy. No child outlives the command: children also get
SIGTERM from the kernel if this process dies (PR_SET_PDEATHSIG).
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
from embedserve.envoy.render import CLUSTER, Endpoint, EnvoyParams, write

log = logging.getLogger("embedserve.cluster")

PR_SET_PDEATHSIG = 1
# Loopback ports the replicas listen on are picked here; the listener and admin are the user's.
HOST = "127.0.0.1"


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
    parser.set_defaults(handler=run)


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


def replica_command(
    args: argparse.Namespace, port: int, threads: int, metrics_port: int
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
    ]
    for flag in ("model", "model_name", "reranker", "reranker_name", "device", "warmup"):
        value = getattr(args, flag)
        if value is not None:
            command += ["--" + flag.replace("_", "-"), str(value)]
    return command


def serving(port: int, timeout: float = 1.0) -> bool:
    """grpc.health.v1 says SERVING for the whole server ("")."""
    with grpc.insecure_channel(f"{HOST}:{port}") as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=timeout
            )
        except grpc.RpcError:
            return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


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
    if args.replicas < 1:
        log.error("--replicas must be at least 1")
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
            command = replica_command(args, port, threads, metrics_port)
            replicas.append(Replica(port, _spawn(command, stdout=subprocess.DEVNULL), metrics_port))
        log.info(
            "starting replicas",
            extra={"replicas": [r.address for r in replicas], "threads": threads},
        )
        if not _wait_serving(replicas, args.startup_timeout_s, stop):
            code = 1
            return code
        config_path = args.envoy_config or workdir / "envoy.yaml"
        params = EnvoyParams(
            replicas=tuple(Endpoint(HOST, r.port) for r in replicas),
            listen_host=args.host,
            port=args.port,
            admin_port=args.admin_port,
            otlp=Endpoint.parse(args.otlp) if args.otlp else None,
            access_log_path=args.access_log,
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


def _wait_serving(replicas: list[Replica], timeout: float, stop: _Stop) -> bool:
    end = time.monotonic() + timeout
    pending = list(replicas)
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
            if serving(replica.port):
                pending.remove(replica)
        if pending and time.monotonic() > end:
            log.error(
                "replicas not SERVING in time", extra={"pending": [r.address for r in pending]}
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

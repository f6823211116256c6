"""The Go example client (client/go/example) against a real server.

It is built with `make go-example` (Go from Debian packages, GOPATH mode). Without a Go
toolchain the tests skip, except under CI (the CI environment variable set), where they fail:
CI must not lose the Go client silently."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from harness import InProcessServer

from embedserve.v1 import common_pb2, embed_service_pb2, rerank_service_pb2

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "build" / "go" / "embedserve-example"


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr

    def summary(self) -> dict[str, Any]:
        """The JSON line the example prints last."""
        lines = self.stdout.strip().splitlines()
        assert lines, f"no output:\n{self.output}"
        parsed: dict[str, Any] = json.loads(lines[-1])
        return parsed


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


@pytest.fixture(scope="session")
def example() -> Path:
    if shutil.which("go") is None:
        reason = "no Go toolchain on PATH: `make go-deps` installs it (Debian packages)"
        if _in_ci():
            pytest.fail(f"{reason}; CI is set, so the Go client test may not skip", pytrace=False)
        pytest.skip(reason)
    build = subprocess.run(
        ["make", "--no-print-directory", "go-example"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert build.returncode == 0, f"make go-example failed:\n{build.stdout}\n{build.stderr}"
    assert EXAMPLE.is_file()
    return EXAMPLE


def run_example(example: Path, *args: str) -> Run:
    done = subprocess.run(
        [str(example), *args], capture_output=True, text=True, timeout=60, check=False
    )
    return Run(done.returncode, done.stdout, done.stderr)


@pytest.fixture
def dead_port() -> Iterator[int]:
    """A port bound but not listening: connections to it are refused while the test runs."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        yield port


def test_example_runs_health_embed_and_rerank(example: Path, qwen3_server: InProcessServer) -> None:
    run = run_example(example, "-target", f"127.0.0.1:{qwen3_server.port}", "-timeout", "30s")
    assert run.returncode == 0, run.output
    summary = run.summary()
    assert summary["health"] == "SERVING"
    assert summary["model"] == "qwen3-embedding-tiny"
    assert summary["embeddings"] == 2
    assert summary["dimensions"] == 64
    assert summary["reranker"] == "qwen3-reranker-tiny"
    assert sorted(summary["indices"]) == [0, 1, 2]
    assert summary["top_index"] == summary["indices"][0]
    assert summary["scores"] == sorted(summary["scores"], reverse=True)

    # The Go client decoded the float32 bytes and read the ranking as Python does.
    embedded = qwen3_server.stubs.embed.Embed(
        embed_service_pb2.EmbedRequest(
            inputs=summary["inputs"], encoding=common_pb2.ENCODING_FLOAT32
        ),
        timeout=30,
    )
    expected = np.array(embedded.embeddings[0].float32.values[:4], dtype=np.float32)
    np.testing.assert_allclose(np.array(summary["first_values"], dtype=np.float32), expected)
    ranked = qwen3_server.stubs.rerank.Rerank(
        rerank_service_pb2.RerankRequest(query=summary["query"], documents=summary["documents"]),
        timeout=30,
    )
    assert [r.index for r in ranked.results] == summary["indices"]

    # 16 goroutines embedding one text each through the coalescing client shared calls, and
    # each got the vector and usage of its own text, as one direct call of all 16 gives them.
    concurrent = summary["concurrent"]
    assert concurrent["callers"] == 16
    assert 1 <= concurrent["rpcs"] < concurrent["callers"]
    assert concurrent["max_diff"] < 1e-4
    assert concurrent["input_tokens"] == concurrent["direct_tokens"] > 16


def test_example_prints_bad_request_violations(
    example: Path, qwen3_server: InProcessServer
) -> None:
    run = run_example(example, "-target", f"127.0.0.1:{qwen3_server.port}", "-query", "")
    assert run.returncode == 1, run.output
    assert "grpc code: INVALID_ARGUMENT" in run.stderr
    assert "field violation: query: must not be empty" in run.stderr


def test_example_propagates_its_deadline(example: Path, qwen3_server: InProcessServer) -> None:
    run = run_example(example, "-target", f"127.0.0.1:{qwen3_server.port}", "-timeout", "1ns")
    assert run.returncode == 1, run.output
    assert "grpc code: DEADLINE_EXCEEDED" in run.stderr


def test_example_fails_unavailable_on_a_dead_port(example: Path, dead_port: int) -> None:
    run = run_example(example, "-target", f"127.0.0.1:{dead_port}", "-timeout", "10s")
    assert run.returncode != 0, run.output
    assert "UNAVAILABLE" in run.output
    assert not run.stdout.strip().endswith("}"), "no summary after a failure"

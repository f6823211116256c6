"""The command-line client end to end: real server, real subprocesses, a real terminal."""

from __future__ import annotations

import json
import os
import pty
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from harness import InProcessServer, wait_until
from support.scripted import ScriptedEmbedServicer, scripted_server

from embedserve.client import Client

COMMAND = [sys.executable, "-m", "embedserve.service"]


def cli(
    server: InProcessServer, *args: str, check: bool = True
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [*COMMAND, *args[:1], "--target", f"127.0.0.1:{server.port}", *args[1:]],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if check:
        assert result.returncode == 0, result.stderr
    return result


@pytest.fixture(scope="module")
def client(qwen3_server: InProcessServer) -> Iterator[Client]:
    with Client(f"127.0.0.1:{qwen3_server.port}") as c:
        yield c


def test_embed_json_and_npy(qwen3_server: InProcessServer, client: Client, tmp_path: Path) -> None:
    texts = ["hello there", "general kenobi"]
    expected = client.embed(texts, dimensions=32, instruction="greet").vectors
    document = json.loads(
        cli(qwen3_server, "embed", *texts, "--dimensions", "32", "--instruction", "greet").stdout
    )
    np.testing.assert_allclose(np.array(document["embeddings"]), expected, atol=1e-6)
    assert document["dimensions"] == 32 and document["usage"]["inputs"] == 2
    out = tmp_path / "v.npy"
    cli(qwen3_server, "embed", *texts, "--format", "npy", "--output", str(out))
    np.testing.assert_allclose(np.load(out), client.embed(texts).vectors, atol=1e-6)


def test_rerank_and_info(qwen3_server: InProcessServer, client: Client) -> None:
    docs = ["first doc", "second doc", "third doc"]
    document = json.loads(cli(qwen3_server, "rerank", "--query", "q", *docs, "--top-n", "2").stdout)
    expected = client.rerank("q", docs, top_n=2)
    assert [r["index"] for r in document["results"]] == [r.index for r in expected.results]
    assert [r["document"] for r in document["results"]] == [docs[r.index] for r in expected.results]
    info = json.loads(cli(qwen3_server, "info").stdout)
    assert {m["name"] for m in info["models"]} == {"qwen3-embedding-tiny", "qwen3-reranker-tiny"}


def test_errors_exit_non_zero_naming_the_field(qwen3_server: InProcessServer) -> None:
    result = cli(qwen3_server, "embed", "ok", "", check=False)
    assert result.returncode == 1
    assert "INVALID_ARGUMENT" in result.stderr and "inputs[1]" in result.stderr
    dead = subprocess.run(
        [*COMMAND, "info", "--target", "127.0.0.1:1", "--retries", "1", "--timeout", "5"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert dead.returncode == 1 and "UNAVAILABLE" in dead.stderr


def test_a_deadline_that_cut_a_retry_short_prints_what_was_retried() -> None:
    # One UNAVAILABLE, then an attempt that runs into the deadline.
    servicer = ScriptedEmbedServicer(grpc.StatusCode.UNAVAILABLE, stall_from_attempt=2)
    with scripted_server(servicer) as port:
        result = subprocess.run(
            [*COMMAND, "embed", "x", "--target", f"127.0.0.1:{port}", "--timeout", "2"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert lines[-2].startswith("embedserve: DEADLINE_EXCEEDED")
    assert lines[-1] == "  while retrying after: UNAVAILABLE: scripted failure"
    assert servicer.attempts == 2


def test_bulk_txt_to_npy_equals_unary(
    qwen3_server: InProcessServer, client: Client, tmp_path: Path
) -> None:
    texts = [f"line {i} " + "x " * (i % 7) for i in range(700)]
    source = tmp_path / "in.txt"
    source.write_text("\n".join(texts) + "\n", encoding="utf-8")
    out = tmp_path / "out.npy"
    result = cli(
        qwen3_server, "bulk", "--input", str(source), "--output", str(out), "--batch-size", "32"
    )
    assert "items/s" not in result.stderr  # not a terminal: no progress bar
    vectors = np.load(out)
    expected = np.concatenate(
        [client.embed(texts[:512]).vectors, client.embed(texts[512:]).vectors]
    )
    np.testing.assert_allclose(vectors, expected, atol=1e-5)
    progress = json.loads((tmp_path / "out.npy.progress.json").read_text())
    assert progress["complete"] and progress["done"] == 700


def test_bulk_jsonl_to_jsonl_with_ids_and_item_errors(
    qwen3_server: InProcessServer, client: Client, tmp_path: Path
) -> None:
    records = [{"doc": f"document {i}", "key": f"k{i}"} for i in range(50)]
    records[7]["doc"] = ""  # fails alone
    source = tmp_path / "in.jsonl"
    source.write_text("\n".join(json.dumps(r) for r in records) + "\n\n", encoding="utf-8")
    out = tmp_path / "out.jsonl"
    cli(
        qwen3_server,
        "bulk",
        "--input",
        str(source),
        "--output",
        str(out),
        "--field",
        "doc",
        "--id-field",
        "key",
        "--batch-size",
        "8",
    )
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["id"] for line in lines] == [r["key"] for r in records]
    assert lines[7]["error"]["code"] == "INVALID_ARGUMENT" and "embedding" not in lines[7]
    good = [i for i in range(50) if i != 7]
    expected = client.embed([records[i]["doc"] for i in good]).vectors
    np.testing.assert_allclose(np.array([lines[i]["embedding"] for i in good]), expected, atol=1e-5)


def test_bulk_shows_a_progress_bar_on_a_terminal(
    qwen3_server: InProcessServer, tmp_path: Path
) -> None:
    source = tmp_path / "in.txt"
    source.write_text("\n".join(f"text {i}" for i in range(3000)) + "\n", encoding="utf-8")
    out = tmp_path / "out.jsonl"
    controller, terminal = pty.openpty()
    process = subprocess.Popen(
        [
            *COMMAND,
            "bulk",
            "--target",
            f"127.0.0.1:{qwen3_server.port}",
            "--input",
            str(source),
            "--output",
            str(out),
            "--batch-size",
            "16",
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=terminal,
    )
    os.close(terminal)
    screen = b""
    while True:
        try:
            data = os.read(controller, 4096)
        except OSError:  # the terminal closed: the process exited
            break
        if not data:
            break
        screen += data
    os.close(controller)
    assert process.wait(60) == 0
    text = screen.decode("utf-8", "replace")
    assert "items/s" in text and "ETA" in text and "3,000/3,000" in text
    assert len(out.read_text().splitlines()) == 3000


@pytest.mark.parametrize("suffix", ["jsonl", "npy"])
def test_bulk_resume_after_an_interruption(
    qwen3_server: InProcessServer, client: Client, tmp_path: Path, suffix: str
) -> None:
    count = 20_000
    texts = [f"resumable text {i}" for i in range(count)]
    source = tmp_path / "in.txt"
    source.write_text("\n".join(texts) + "\n", encoding="utf-8")
    out = tmp_path / f"out.{suffix}"
    args = [
        *COMMAND,
        "bulk",
        "--target",
        f"127.0.0.1:{qwen3_server.port}",
        "--input",
        str(source),
        "--output",
        str(out),
        "--batch-size",
        "16",
        "--max-in-flight",
        "2",
    ]
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    sidecar = tmp_path / f"out.{suffix}.progress.json"

    def written() -> int:
        if suffix == "jsonl":
            return out.read_bytes().count(b"\n") if out.exists() else 0
        return json.loads(sidecar.read_text())["done"] if sidecar.exists() else 0

    wait_until(lambda: written() >= 1000, timeout=120, what="a partial output")
    process.send_signal(signal.SIGKILL)
    process.wait(30)
    interrupted = written()
    assert interrupted < count, "the run finished before it could be interrupted"
    resumed = subprocess.run([*args, "--resume"], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stderr.strip().splitlines()[-1])["resumed_at"] >= interrupted
    if suffix == "jsonl":
        lines = [json.loads(line) for line in out.read_text().splitlines()]
        assert [line["id"] for line in lines] == list(range(count))  # every item exactly once
        vectors = np.array([lines[i]["embedding"] for i in range(0, count, 997)])
    else:
        vectors = np.load(out)[::997]
    np.testing.assert_allclose(vectors, client.embed(texts[::997]).vectors, atol=1e-5)

"""Health, reflection, server info, the warm-up gate, draining on SIGTERM, start-up failures."""

from __future__ import annotations

import importlib.metadata
import json
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from harness import InProcessServer, ServerProcess, serving, stubs_for, wait_until
from support.qwen3 import DEFAULT_INSTRUCTION, build_qwen3_tokenizer

from embedserve.v1 import common_pb2, embed_service_pb2, info_service_pb2

API_SERVICES = (
    "embedserve.v1.EmbedService",
    "embedserve.v1.RerankService",
    "embedserve.v1.InfoService",
)
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# Limits that differ from the defaults, so that the info can only echo the configuration.
LIMITS: dict[str, int] = {
    "max_batch_tokens": 4096,
    "max_batch_size": 32,
    "max_inputs": 100,
    "max_queue_tokens": 20000,
    "stream_window": 8,
    "max_queue_delay_ms": 250,
    "forward_workers": 3,  # not the default (2 for the tests' 2 threads)
}


@pytest.fixture(scope="module")
def qwen3_info_server(qwen3_embedding_folder: Path) -> Iterator[InProcessServer]:
    with serving(
        model=qwen3_embedding_folder,
        model_name="qwen3-tiny",
        warmup=False,
        max_input_tokens=256,
        truncation="start",
        **LIMITS,
    ) as server:
        yield server


def health_status(channel: grpc.Channel, service: str) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
    return int(response.status)


def error_reasons(error: grpc.Call) -> list[str]:
    status = rpc_status.from_call(error)
    if status is None:
        return []
    reasons = []
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reasons.append(info.reason)
    return reasons


# -- health and reflection -------------------------------------------------------------


@pytest.mark.parametrize("service", ["", *API_SERVICES])
def test_health_answers_serving(qwen3_info_server: InProcessServer, service: str) -> None:
    assert health_status(qwen3_info_server.stubs.channel, service) == SERVING


def test_health_of_an_unknown_service_is_not_found(qwen3_info_server: InProcessServer) -> None:
    with pytest.raises(grpc.RpcError) as raised:
        health_status(qwen3_info_server.stubs.channel, "embedserve.v1.NoSuchService")
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND


def grpcurl(port: int, *target: str, data: str | None = None) -> str:
    """Run the grpcurl binary installed next to this interpreter; no proto files given."""
    binary = Path(sys.executable).parent / "grpcurl"
    assert binary.exists(), f"grpcurl is not installed next to {sys.executable}"
    options = ["-plaintext", "-max-time", "30", *(["-d", data] if data is not None else [])]
    done = subprocess.run(
        [str(binary), *options, f"127.0.0.1:{port}", *target],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_reflection_lists_the_services(qwen3_info_server: InProcessServer) -> None:
    listed = set(grpcurl(qwen3_info_server.port, "list").split())
    assert {*API_SERVICES, "grpc.health.v1.Health"} <= listed
    methods = set(grpcurl(qwen3_info_server.port, "list", "embedserve.v1.EmbedService").split())
    assert methods == {"embedserve.v1.EmbedService.Embed", "embedserve.v1.EmbedService.EmbedStream"}


def test_grpcurl_calls_without_proto_files(qwen3_info_server: InProcessServer) -> None:
    port = qwen3_info_server.port
    info = json.loads(grpcurl(port, "embedserve.v1.InfoService/GetServerInfo"))
    # grpcurl prints the proto field names.
    assert info["server_version"] == importlib.metadata.version("embedserve")
    assert {m["name"] for m in info["models"]} == {"qwen3-tiny"}
    reply = json.loads(
        grpcurl(port, "embedserve.v1.EmbedService/Embed", data='{"inputs": ["hello"]}')
    )
    assert reply["model"] == "qwen3-tiny"
    (embedding,) = reply["embeddings"]
    values = embedding["float32"]["values"]
    assert len(values) == embedding["dimensions"] == 64
    assert abs(sum(v * v for v in values) - 1.0) < 1e-4  # normalized by default


# -- InfoService -------------------------------------------------------------------------


def get_info(server: InProcessServer) -> dict[str, info_service_pb2.ModelInfo]:
    response = server.stubs.info.GetServerInfo(info_service_pb2.GetServerInfoRequest(), timeout=10)
    assert response.server_version == importlib.metadata.version("embedserve")
    by_kind = {info_service_pb2.ModelKind.Name(m.kind): m for m in response.models}
    assert len(by_kind) == len(response.models) == 2
    return by_kind


def test_info_describes_the_qwen3_embedder(qwen3_info_server: InProcessServer) -> None:
    models = get_info(qwen3_info_server)
    embedder = models["MODEL_KIND_EMBEDDING"]
    assert embedder.name == "qwen3-tiny"
    assert embedder.is_default
    assert embedder.family == "qwen3-embedding"
    assert embedder.rerank_method == info_service_pb2.RERANK_METHOD_UNSPECIFIED
    assert (embedder.embedding_dimensions, embedder.min_dimensions, embedder.max_dimensions) == (
        64,
        32,
        64,
    )
    assert embedder.max_input_tokens == 256
    assert embedder.default_instruction == DEFAULT_INSTRUCTION
    assert embedder.default_truncation == common_pb2.TRUNCATION_POLICY_START
    assert embedder.pooling == "last_token"
    assert embedder.device == "cpu" and embedder.dtype == "float32"
    batching = embedder.batching
    assert {
        "max_batch_tokens": batching.max_batch_tokens,
        "max_batch_size": batching.max_batch_size,
        "max_inputs": batching.max_inputs_per_request,
        "max_queue_tokens": batching.max_queue_tokens,
        "stream_window": batching.stream_window,
        "max_queue_delay_ms": batching.max_queue_delay.ToMilliseconds(),
        "forward_workers": batching.forward_workers,
    } == LIMITS
    assert batching.HasField("max_queue_delay")

    reranker = models["MODEL_KIND_RERANKER"]
    assert reranker.rerank_method == info_service_pb2.RERANK_METHOD_EMBEDDING_SIMILARITY
    assert reranker.embedding_model == "qwen3-tiny"
    assert reranker.is_default
    assert reranker.family == "embedding-similarity"
    assert reranker.embedding_dimensions == 0
    assert reranker.batching == embedder.batching


def test_info_limits_are_the_ones_enforced(qwen3_info_server: InProcessServer) -> None:
    embedder = get_info(qwen3_info_server)["MODEL_KIND_EMBEDDING"]
    embed = qwen3_info_server.stubs.embed.Embed
    ok = embed(embed_service_pb2.EmbedRequest(inputs=["x"], dimensions=embedder.min_dimensions))
    assert ok.embeddings[0].dimensions == embedder.min_dimensions
    with pytest.raises(grpc.RpcError) as raised:
        embed(embed_service_pb2.EmbedRequest(inputs=["x"], dimensions=embedder.min_dimensions - 1))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    too_many = ["x"] * (embedder.batching.max_inputs_per_request + 1)
    with pytest.raises(grpc.RpcError) as raised:
        embed(embed_service_pb2.EmbedRequest(inputs=too_many))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # Truncation from the start: a long input still fits, with its end kept.
    long_text = "retrieval " * 400
    truncated = embed(embed_service_pb2.EmbedRequest(inputs=[long_text]))
    assert truncated.usage.truncated_inputs == 1
    assert truncated.usage.input_tokens == embedder.max_input_tokens


def test_info_of_the_default_minilm_server(minilm_server: InProcessServer) -> None:
    models = get_info(minilm_server)
    embedder = models["MODEL_KIND_EMBEDDING"]
    assert embedder.name == "all-MiniLM-L6-v2"
    assert embedder.family == "sentence-transformers"
    assert embedder.embedding_dimensions == embedder.max_dimensions == 384
    assert embedder.pooling == "mean"
    assert embedder.max_input_tokens == 256
    reranker = models["MODEL_KIND_RERANKER"]
    assert reranker.rerank_method == info_service_pb2.RERANK_METHOD_EMBEDDING_SIMILARITY
    assert reranker.embedding_model == embedder.name
    assert reranker.is_default


# -- subprocess lifecycle ------------------------------------------------------------------


def messages(process: ServerProcess) -> list[str]:
    return [str(entry.get("message")) for entry in process.logs]


def stop(process: ServerProcess) -> int:
    process.process.send_signal(signal.SIGTERM)
    return process.wait_exit(60)


def test_warm_up_comes_before_serving_and_logs_are_json(qwen3_embedding_folder: Path) -> None:
    process = ServerProcess("--model", str(qwen3_embedding_folder), "--warmup", "true")
    try:
        port = process.wait_serving()
        seen = messages(process)
        assert seen.count("warm-up done") == 1
        assert seen.index("listening") < seen.index("warm-up done") < seen.index("serving")
        warm = process.logs[seen.index("warm-up done")]
        assert warm["batch_tokens"] > 0 and warm["batch_size"] >= 1
        channel = stubs_for(port).channel
        try:
            assert health_status(channel, "") == SERVING
        finally:
            channel.close()
        assert stop(process) == 0
    finally:
        process.kill()
    lines = process.output.splitlines()
    assert lines
    for line in lines:
        entry: Any = json.loads(line)  # every line is one JSON object
        assert isinstance(entry, dict), line
        assert {"ts", "level", "logger", "message"} <= entry.keys(), line
    assert messages(process)[-1] == "stopped"


def drain_texts(count: int) -> list[str]:
    sentence = "Sentence {} is about retrieval, embeddings and the quick brown fox. "
    return [sentence.format(i) * 5 for i in range(count)]


def test_sigterm_drains_in_flight_calls(qwen3_embedding_folder: Path) -> None:
    process = ServerProcess(
        "--model",
        str(qwen3_embedding_folder),
        "--device",
        "cpu",
        "--warmup",
        "false",
        "--drain-delay-s",
        "1",
        "--max-queue-tokens",
        "4000000",
        # The heavy calls must all be admitted, however long the queue they make.
        "--max-queue-delay-ms",
        "0",
    )
    try:
        stubs = stubs_for(process.wait_serving())
        try:
            texts = drain_texts(384)
            # The connection is up before the heavy calls go out.
            stubs.embed.Embed(embed_service_pb2.EmbedRequest(inputs=["ready"]), timeout=30)
            request = embed_service_pb2.EmbedRequest(inputs=texts)
            futures = [stubs.embed.Embed.future(request, timeout=120) for _ in range(8)]
            in_flight = [f for f in futures if not f.done()]
            process.process.send_signal(signal.SIGTERM)
            assert in_flight, "every call finished before SIGTERM: nothing was drained"

            wait_until(
                lambda: health_status(stubs.channel, "") == NOT_SERVING,
                what="health to turn NOT_SERVING",
            )
            assert all(health_status(stubs.channel, s) == NOT_SERVING for s in API_SERVICES)

            refusal: list[grpc.RpcError] = []
            accepted_while_not_serving = 0

            def refused() -> bool:
                # A short deadline: during the delay the probe is accepted and expires
                # in the queue behind the heavy calls; after it, it is refused at once.
                nonlocal accepted_while_not_serving
                try:
                    stubs.embed.Embed(embed_service_pb2.EmbedRequest(inputs=["p"]), timeout=0.25)
                except grpc.RpcError as error:
                    if error.code() == grpc.StatusCode.UNAVAILABLE:
                        refusal.append(error)
                        return True
                    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED, error
                accepted_while_not_serving += 1
                return False

            wait_until(refused, what="new calls to be refused")
            # Balancers saw NOT_SERVING while calls were still accepted: the drain delay.
            assert accepted_while_not_serving >= 1
            still_running = [f for f in futures if not f.done()]
            (error,) = refusal
            assert isinstance(error, grpc.Call)
            assert error_reasons(error) == ["DRAINING"], error
            assert still_running, "accepted calls were not running when the refusal came"

            for future in futures:
                response = future.result(timeout=120)
                assert len(response.embeddings) == len(texts)
        finally:
            stubs.channel.close()
        assert process.wait_exit(60) == 0
    finally:
        process.kill()
    seen = messages(process)
    assert "draining" in seen
    assert seen[-1] == "stopped"


# -- start-up failures -----------------------------------------------------------------------


def failed_start(*args: str, env: dict[str, str] | None = None) -> ServerProcess:
    process = ServerProcess(*args, env=env)
    try:
        # Fail fast if it does start: a server that listens would never exit by itself.
        wait_until(
            lambda: process.process.poll() is not None or "listening" in messages(process),
            timeout=120,
            what="the server to exit",
        )
        assert "listening" not in messages(process), process.output
        assert process.wait_exit(30) == 2, process.output
    finally:
        process.kill()
    assert "listening" not in messages(process), process.output
    return process


def start_error(process: ServerProcess) -> str:
    errors = [entry for entry in process.logs if entry.get("level") == "error"]
    assert len(errors) == 1, process.output
    message = str(errors[0]["message"])
    assert message.startswith("cannot start:"), message
    return message


def test_missing_model_folder_fails_start_up(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    message = start_error(failed_start("--model", str(missing)))
    assert str(missing) in message and "does not exist" in message


def test_corrupt_config_fails_start_up(tmp_path: Path, qwen3_embedding_folder: Path) -> None:
    folder = tmp_path / "corrupt"
    shutil.copytree(qwen3_embedding_folder, folder)
    (folder / "config.json").write_text('{"model_type": "qwen3", ', encoding="utf-8")
    message = start_error(failed_start("--model", str(folder)))
    assert str(folder) in message and "config" in message


def test_qwen3_tokenizer_without_end_token_fails_start_up(
    tmp_path: Path, qwen3_embedding_folder: Path
) -> None:
    folder = tmp_path / "no-eos"
    shutil.copytree(qwen3_embedding_folder, folder)
    build_qwen3_tokenizer(folder, append_eos=False)
    message = start_error(failed_start("--model", str(folder)))
    assert "does not append <|endoftext|>" in message and str(folder) in message


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("EMBEDSERVE_MAX_BATCH_SIZE", "abc", "invalid literal"),
        ("EMBEDSERVE_MAX_BATCH_SIZE", "0", "must be at least 1"),
        ("EMBEDSERVE_WARMUP", "maybe", "expected true or false"),
        ("EMBEDSERVE_DTYPE", "float64", "choose from"),
    ],
)
def test_invalid_environment_fails_clearly(variable: str, value: str, expected: str) -> None:
    process = failed_start(env={variable: value})
    assert f"{variable}={value!r}" in process.output
    assert expected in process.output


def test_invalid_flag_fails_clearly() -> None:
    process = failed_start("--max-batch-tokens", "-5")
    assert "--max-batch-tokens" in process.output and "must be at least 1" in process.output

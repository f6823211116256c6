"""The Python client (sync, asyncio, bulk) against real servers."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from harness import InProcessServer, ServerProcess
from support.qwen3 import reference_qwen3_embed
from support.scripted import ScriptedEmbedServicer, scripted_server

from embedserve.client import (
    AsyncClient,
    BulkItemError,
    Client,
    DeadlineExceededError,
    EmbedOptions,
    InvalidArgumentError,
    NotFoundError,
    OverloadedError,
    RetryPolicy,
    UnavailableError,
)

TEXTS = ["first text", "a second, somewhat longer text", "third"]


@pytest.fixture(scope="module")
def client(qwen3_server: InProcessServer) -> Iterator[Client]:
    with Client(f"127.0.0.1:{qwen3_server.port}") as c:
        yield c


def test_embed_returns_float32_arrays_with_usage_and_timing(
    client: Client, qwen3_embedding_folder: Path
) -> None:
    result = client.embed(TEXTS)
    assert result.vectors.dtype == np.float32 and result.vectors.shape == (3, 64)
    np.testing.assert_allclose(
        result.vectors, reference_qwen3_embed(qwen3_embedding_folder, TEXTS), atol=1e-5
    )
    assert result.model == "qwen3-embedding-tiny"
    assert result.usage.inputs == 3 and result.usage.input_tokens > 3
    assert result.timing.total >= result.timing.inference >= 0


def test_per_call_and_per_client_options(qwen3_server: InProcessServer, client: Client) -> None:
    per_call = client.embed(TEXTS, dimensions=32, instruction="find things")
    defaults = EmbedOptions(dimensions=32, instruction="find things")
    with Client(f"127.0.0.1:{qwen3_server.port}", defaults=defaults) as configured:
        per_client = configured.embed(TEXTS)
        assert configured.embed(TEXTS, dimensions=48).vectors.shape == (3, 48)
    np.testing.assert_allclose(per_call.vectors, per_client.vectors, atol=1e-6)
    assert per_call.vectors.shape == (3, 32)


@pytest.mark.parametrize("encoding", ["float32", "int8", "binary"])
def test_encodings_decode(client: Client, encoding: str) -> None:
    full = client.embed(TEXTS).vectors
    result = client.embed(TEXTS, encoding=encoding)
    if encoding == "float32":
        np.testing.assert_allclose(result.vectors, full, atol=1e-6)
    elif encoding == "int8":
        assert result.scales is not None and result.vectors.dtype == np.int8
        restored = result.vectors * result.scales[:, None]
        assert np.all(np.abs(restored - full) <= result.scales[:, None] / 2 + 1e-6)
    else:
        bits = np.unpackbits(result.vectors, axis=1)[:, : result.dimensions]
        np.testing.assert_array_equal(bits.astype(bool), full > 0)


def test_rerank_info_and_health(client: Client) -> None:
    ranking = client.rerank(
        "query", ["doc one", "doc two", "doc three"], top_n=2, return_documents=True
    )
    assert len(ranking.results) == 2
    assert ranking.results[0].score >= ranking.results[1].score
    assert (
        ranking.results[0].document == ["doc one", "doc two", "doc three"][ranking.results[0].index]
    )
    info = client.info()
    assert {m.name for m in info.models} == {"qwen3-embedding-tiny", "qwen3-reranker-tiny"}
    assert client.health() and client.health("embedserve.v1.EmbedService")


def test_errors_carry_code_and_field_violations(client: Client) -> None:
    with pytest.raises(InvalidArgumentError) as bad:
        client.embed(["ok", ""], dimensions=4096)
    assert {v.field for v in bad.value.violations} == {"inputs[1]", "dimensions"}
    assert bad.value.code == grpc.StatusCode.INVALID_ARGUMENT and bad.value.reason
    with pytest.raises(NotFoundError):
        client.embed(["x"], model="no-such-model")


def test_embed_bulk_equals_unary_in_order_with_bounded_memory(client: Client) -> None:
    count, batch_size, max_in_flight = 20_000, 64, 4
    texts = [f"bulk text number {i} " + "word " * (i % 13) for i in range(count)]
    pulled = 0
    yielded = 0
    most_ahead = 0

    def source() -> Iterator[str]:
        nonlocal pulled, most_ahead
        for text in texts:
            pulled += 1
            most_ahead = max(most_ahead, pulled - yielded)
            yield text

    bulk: list[np.ndarray] = []
    for item in client.embed_bulk(source(), batch_size=batch_size, max_in_flight=max_in_flight):
        assert item.index == yielded and item.error is None and item.vector is not None
        bulk.append(item.vector)
        yielded += 1
    assert yielded == count
    # Memory is bounded: never more than the window of messages read ahead of the consumer.
    assert most_ahead <= batch_size * (max_in_flight + 1)
    unary = np.concatenate([client.embed(texts[i : i + 512]).vectors for i in range(0, count, 512)])
    np.testing.assert_allclose(np.stack(bulk), unary, atol=1e-5)


def test_embed_bulk_reports_item_errors_with_their_index(client: Client) -> None:
    texts = ["good", "also good", "", "fine", "x"]
    collected = list(client.embed_bulk(texts, batch_size=4, raise_on_error=False))
    assert [item.index for item in collected] == list(range(5))
    failed = [item for item in collected if item.error is not None]
    assert [item.index for item in failed] == [2]  # the bad input fails alone
    assert isinstance(failed[0].error, InvalidArgumentError)
    with pytest.raises(BulkItemError) as raised:
        list(client.embed_bulk(texts, batch_size=4))
    assert raised.value.index == 2 and raised.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_async_client_under_100_concurrent_calls(qwen3_server: InProcessServer) -> None:
    async def run() -> list[np.ndarray]:
        async with AsyncClient(f"127.0.0.1:{qwen3_server.port}") as aclient:
            results = await asyncio.gather(*(aclient.embed([f"text {i}"]) for i in range(100)))
            items = [item async for item in aclient.embed_bulk(f"text {i}" for i in range(100))]
            assert [item.index for item in items] == list(range(100))
            return [r.vectors[0] for r in results]

    concurrent = asyncio.run(run())
    with Client(f"127.0.0.1:{qwen3_server.port}") as sync_client:
        expected = sync_client.embed([f"text {i}" for i in range(100)]).vectors
    np.testing.assert_allclose(np.stack(concurrent), expected, atol=1e-5)


def test_bulk_survives_a_server_restart(qwen3_embedding_folder: Path) -> None:
    """kill -9 mid-bulk, restart on the same port: every item exactly once, correct."""
    first = ServerProcess("--model", str(qwen3_embedding_folder), "--warmup", "false")
    restarted: ServerProcess | None = None
    try:
        port = first.wait_serving()
        texts = [f"restart text {i}" for i in range(3000)]
        policy = RetryPolicy(max_attempts=60, initial_backoff=0.05, max_backoff=0.5)
        seen: list[int] = []
        vectors: list[np.ndarray] = []
        with Client(f"127.0.0.1:{port}", retry=policy) as client:
            for item in client.embed_bulk(texts, batch_size=16, max_in_flight=4):
                seen.append(item.index)
                assert item.vector is not None
                vectors.append(item.vector)
                if len(seen) == 500:
                    first.process.kill()
                    first.wait_exit()
                    restarted = ServerProcess(
                        "--model",
                        str(qwen3_embedding_folder),
                        "--warmup",
                        "false",
                        "--port",
                        str(port),
                    )
        assert seen == list(range(len(texts)))
        assert restarted is not None
        np.testing.assert_allclose(
            np.stack(vectors[::250]),
            reference_qwen3_embed(qwen3_embedding_folder, texts[::250]),
            atol=1e-5,
        )
    finally:
        first.kill()
        if restarted is not None:
            restarted.kill()


@pytest.mark.parametrize(
    ("code", "retried"),
    [
        (grpc.StatusCode.UNAVAILABLE, True),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, True),
        (grpc.StatusCode.CANCELLED, True),  # sent by the server: its core shed the call
        (grpc.StatusCode.INVALID_ARGUMENT, False),
        (grpc.StatusCode.INTERNAL, False),
        (grpc.StatusCode.DEADLINE_EXCEEDED, False),
        (grpc.StatusCode.NOT_FOUND, False),
        (grpc.StatusCode.UNKNOWN, False),
    ],
)
def test_retries_only_when_the_replica_could_not_take_the_call(
    code: grpc.StatusCode, retried: bool
) -> None:
    servicer = ScriptedEmbedServicer(code)
    policy = RetryPolicy(max_attempts=4, initial_backoff=0.001, max_backoff=0.01)
    with scripted_server(servicer) as port:
        with (
            Client(f"127.0.0.1:{port}", retry=policy) as client,
            pytest.raises(Exception) as raised,
        ):
            client.embed(["x"], timeout=30)
        assert getattr(raised.value, "code", None) == code
        assert servicer.attempts == (4 if retried else 1)


def test_a_deadline_stops_retrying() -> None:
    servicer = ScriptedEmbedServicer(grpc.StatusCode.UNAVAILABLE)
    policy = RetryPolicy(max_attempts=100_000, initial_backoff=0.01, max_backoff=0.05)
    with scripted_server(servicer) as port:
        with (
            Client(f"127.0.0.1:{port}", retry=policy) as client,
            pytest.raises((UnavailableError, DeadlineExceededError)) as raised,
        ):
            client.embed(["x"], timeout=0.5)
        # Either the deadline left no time for another attempt (the last UNAVAILABLE), or it
        # cut one short, which says which error made the client retry.
        if isinstance(raised.value, DeadlineExceededError):
            assert isinstance(raised.value.__cause__, UnavailableError)
        # Far fewer attempts than the policy allows: the deadline ended the retries.
        assert 2 <= servicer.attempts < 1000


def test_a_retry_cut_short_by_the_deadline_names_why_it_retried() -> None:
    servicer = ScriptedEmbedServicer(grpc.StatusCode.UNAVAILABLE, stall_from_attempt=2)
    policy = RetryPolicy(max_attempts=5, initial_backoff=0.001, max_backoff=0.001)
    with scripted_server(servicer) as port:
        with (
            Client(f"127.0.0.1:{port}", retry=policy) as client,
            pytest.raises(DeadlineExceededError) as raised,
        ):
            client.embed(["x"], timeout=0.5)
        assert isinstance(raised.value.__cause__, UnavailableError)
        assert raised.value.__cause__.message == "scripted failure"
        assert servicer.attempts == 2


def test_a_deadline_without_retries_has_no_cause() -> None:
    servicer = ScriptedEmbedServicer(grpc.StatusCode.UNAVAILABLE, stall_from_attempt=1)
    with scripted_server(servicer) as port:
        with Client(f"127.0.0.1:{port}") as client, pytest.raises(DeadlineExceededError) as raised:
            client.embed(["x"], timeout=0.3)
        assert raised.value.__cause__ is None
        assert servicer.attempts == 1


def test_server_retry_hint_is_honoured_within_the_deadline() -> None:
    # The server asks for 10 s; the deadline is 1 s, so the client must not retry at all.
    servicer = ScriptedEmbedServicer(grpc.StatusCode.RESOURCE_EXHAUSTED, retry_delay_s=10.0)
    policy = RetryPolicy(max_attempts=10, initial_backoff=0.001, max_backoff=30)
    with scripted_server(servicer) as port:
        with Client(f"127.0.0.1:{port}", retry=policy) as client:
            with pytest.raises(OverloadedError) as raised:
                client.embed(["x"], timeout=1.0)
            assert raised.value.retry_after == pytest.approx(10.0)
        assert servicer.attempts == 1


def test_retry_policy_refuses_unsafe_codes() -> None:
    with pytest.raises(ValueError, match="only UNAVAILABLE, RESOURCE_EXHAUSTED and CANCELLED"):
        RetryPolicy(retryable_codes=frozenset({grpc.StatusCode.INVALID_ARGUMENT}))


@pytest.mark.parametrize(
    ("code", "details", "resumable"),
    [
        # A proxy reset the stream, seen as the RST_STREAM itself or as this client's next
        # write failing in grpc's core: both are a broken connection, and the stream resumes.
        (grpc.StatusCode.INTERNAL, "Received RST_STREAM with error code 2", True),
        (grpc.StatusCode.INTERNAL, "Internal error from Core", True),
        # The server's own INTERNAL (a forward pass failed) is its verdict: not resumed.
        (grpc.StatusCode.INTERNAL, "forward pass failed: CUDA out of memory", False),
        (grpc.StatusCode.INVALID_ARGUMENT, "Internal error from Core", False),
    ],
)
def test_a_stream_reset_in_transit_is_resumed_but_a_server_error_is_not(
    code: grpc.StatusCode, details: str, resumable: bool
) -> None:
    from embedserve.client.aio import _stream_failure_code

    error = grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details, None)
    resumed_as = grpc.StatusCode.UNAVAILABLE if resumable else code
    assert _stream_failure_code(error) is resumed_as

"""The client's merging of concurrent embed calls (``coalesce=True``) against a real server."""

from __future__ import annotations

import asyncio
import copy
import pickle
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import grpc
import numpy as np
import pytest
from harness import InProcessServer, serving
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from support.scripted import ScriptedEmbedServicer, scripted_server

from embedserve.client import (
    AsyncClient,
    Client,
    Embeddings,
    InvalidArgumentError,
    OverloadedError,
    RetryPolicy,
)

T = TypeVar("T")
TEXTS = [f"caller {i} asks about {'rivers ' * (i % 5)}and hills" for i in range(12)]


def traced(
    server: InProcessServer,
    calls: Callable[[AsyncClient], Awaitable[T]],
    max_inputs: int = 64,
) -> tuple[T, list[ReadableSpan]]:
    """``calls`` on a coalescing client, and the Embed spans the client made."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))

    async def run() -> T:
        async with AsyncClient(
            f"127.0.0.1:{server.port}",
            coalesce=True,
            coalesce_max_inputs=max_inputs,
            tracer_provider=provider,
        ) as client:
            return await calls(client)

    result = asyncio.run(run())
    spans = [s for s in exporter.get_finished_spans() if s.name.endswith("/Embed")]
    return result, spans


def merged_calls(spans: list[ReadableSpan]) -> list[int]:
    return sorted(int(s.attributes["embedserve.client.merged_calls"]) for s in spans)  # type: ignore[arg-type,index]


def test_concurrent_calls_become_one_call_and_each_gets_its_own_rows_and_usage(
    qwen3_server: InProcessServer,
) -> None:
    async def calls(client: AsyncClient) -> list[Embeddings]:
        return await asyncio.gather(*(client.embed([text]) for text in TEXTS))

    results, spans = traced(qwen3_server, calls)
    assert merged_calls(spans) == [len(TEXTS)]
    with Client(f"127.0.0.1:{qwen3_server.port}") as plain:
        alone = [plain.embed([text]) for text in TEXTS]
    for got, expected in zip(results, alone, strict=True):
        np.testing.assert_allclose(got.vectors, expected.vectors, atol=1e-5)
        assert got.usage == expected.usage  # its own tokens, not the merged call's
    assert len({r.usage.input_tokens for r in results}) > 1


def test_only_equal_options_merge_and_a_call_of_many_texts_stays_whole(
    qwen3_server: InProcessServer,
) -> None:
    async def calls(client: AsyncClient) -> list[Embeddings]:
        return list(
            await asyncio.gather(
                client.embed(TEXTS[:3]),
                client.embed(TEXTS[3:5]),
                client.embed(TEXTS[5:6], dimensions=32),
                client.embed(TEXTS[6:7], dimensions=32),
                client.embed(TEXTS[7:8], timeout=20),
            )
        )

    results, spans = traced(qwen3_server, calls)
    # One merged call per options-and-deadline key: (3 + 2 texts), 2 x 32 dimensions, timeout 20.
    assert merged_calls(spans) == [1, 2, 2]
    assert [r.vectors.shape for r in results] == [(3, 64), (2, 64), (1, 32), (1, 32), (1, 64)]
    assert [r.usage.inputs for r in results] == [3, 2, 1, 1, 1]


def test_merged_calls_hold_at_most_max_inputs_without_splitting_a_caller(
    qwen3_server: InProcessServer,
) -> None:
    async def calls(client: AsyncClient) -> list[Embeddings]:
        return await asyncio.gather(*(client.embed(TEXTS[i : i + 2]) for i in range(0, 10, 2)))

    results, spans = traced(qwen3_server, calls, max_inputs=4)
    assert merged_calls(spans) == [1, 2, 2]
    assert [r.vectors.shape[0] for r in results] == [2] * 5


def test_a_bad_input_fails_only_its_own_caller(qwen3_server: InProcessServer) -> None:
    async def calls(client: AsyncClient) -> list[Embeddings | BaseException]:
        return list(
            await asyncio.gather(
                client.embed([TEXTS[0]]),
                client.embed(["fine", ""]),
                client.embed([TEXTS[1]]),
                return_exceptions=True,
            )
        )

    results, spans = traced(qwen3_server, calls)
    first, bad, third = results
    assert isinstance(bad, InvalidArgumentError)
    # Named in the caller's own request, not at its place in the merged one.
    assert [v.field for v in bad.violations] == ["inputs[1]"]
    assert isinstance(first, Embeddings) and isinstance(third, Embeddings)
    assert first.vectors.shape == third.vectors.shape == (1, 64)
    # The merged call, then each of its callers alone.
    assert merged_calls(spans) == [1, 1, 1, 3]


def test_a_caller_that_gives_up_leaves_the_merged_call_to_the_others(
    qwen3_server: InProcessServer,
) -> None:
    async def calls(client: AsyncClient) -> tuple[bool, list[Embeddings]]:
        leaving = asyncio.ensure_future(client.embed([TEXTS[0]]))
        staying = [asyncio.ensure_future(client.embed([t])) for t in TEXTS[1:4]]
        await asyncio.sleep(0)  # all four are waiting for the flush
        leaving.cancel()
        answers = await asyncio.gather(*staying)
        return leaving.cancelled(), answers

    (cancelled, answers), spans = traced(qwen3_server, calls)
    assert cancelled
    assert [a.vectors.shape for a in answers] == [(1, 64)] * 3
    assert merged_calls(spans) == [3]


def test_the_sync_client_merges_calls_from_many_threads(qwen3_server: InProcessServer) -> None:
    results: dict[int, np.ndarray] = {}
    start = threading.Barrier(8)

    def call(client: Client, index: int) -> None:
        start.wait()
        results[index] = client.embed([TEXTS[index]]).vectors[0]

    with Client(f"127.0.0.1:{qwen3_server.port}", coalesce=True) as client:
        threads = [threading.Thread(target=call, args=(client, i)) for i in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    with Client(f"127.0.0.1:{qwen3_server.port}") as plain:
        expected = plain.embed(TEXTS[:8]).vectors
    np.testing.assert_allclose(np.stack([results[i] for i in range(8)]), expected, atol=1e-5)


def test_max_inputs_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_inputs"):
        AsyncClient("127.0.0.1:1", coalesce=True, coalesce_max_inputs=0)


def test_an_empty_call_and_bad_options_fail_as_they_would_alone(
    qwen3_server: InProcessServer,
) -> None:
    async def calls(client: AsyncClient) -> list[Embeddings | BaseException]:
        return list(
            await asyncio.gather(
                client.embed([]),
                client.embed([TEXTS[0]]),
                client.embed([TEXTS[1]], dimensions=4096),
                client.embed([TEXTS[2]], dimensions=4096),
                return_exceptions=True,
            )
        )

    (empty, fine, *too_wide), spans = traced(qwen3_server, calls)
    assert isinstance(empty, InvalidArgumentError)
    assert isinstance(fine, Embeddings) and fine.vectors.shape == (1, 64)
    for error in too_wide:
        assert isinstance(error, InvalidArgumentError)
        assert [v.field for v in error.violations] == ["dimensions"]
    assert too_wide[0] is not too_wide[1]
    # The options' error is both callers' at once: no call of either alone.
    assert merged_calls(spans) == [1, 1, 2]


def test_a_server_that_takes_fewer_texts_a_call_answers_every_caller(
    minilm_folder: Path,
) -> None:
    """The server takes 3 texts a call, the client merges up to 64: a merged call's
    violation of ``inputs`` is nobody's error, so its callers are sent alone, and the
    client halves what it merges until its calls fit."""

    async def calls(client: AsyncClient) -> list[Embeddings]:
        results: list[Embeddings] = []
        for _ in range(3):
            results += await asyncio.gather(*(client.embed([text]) for text in TEXTS[:8]))
        return results

    with serving(model=minilm_folder, max_inputs=3, warmup=False) as server:
        results, spans = traced(server, calls)
    for result in results:
        assert result.vectors.shape == (1, 384)
        assert result.usage.inputs == 1
    # 8 merged, refused, then 8 alone (and 4 from then on); 2 calls of 4, refused, then 8
    # alone (2 from then on); 4 calls of 2.
    assert merged_calls(spans) == [1] * 16 + [2] * 4 + [4] * 2 + [8]


def test_an_overload_reaches_every_merged_caller_with_its_retry_hint() -> None:
    servicer = ScriptedEmbedServicer(grpc.StatusCode.RESOURCE_EXHAUSTED, retry_delay_s=10.0)
    policy = RetryPolicy(max_attempts=3, initial_backoff=0.001, max_backoff=30)

    async def run() -> list[Embeddings | BaseException]:
        async with AsyncClient(f"127.0.0.1:{port}", retry=policy, coalesce=True) as client:
            return list(
                await asyncio.gather(
                    *(client.embed([text], timeout=1.0) for text in TEXTS[:5]),
                    return_exceptions=True,
                )
            )

    with scripted_server(servicer) as port:
        errors = asyncio.run(run())
    assert servicer.attempts == 1  # one merged call; the 10 s hint is past the deadline
    assert all(isinstance(e, OverloadedError) and e.retry_after == 10.0 for e in errors)
    assert len({id(e) for e in errors}) == 5


def test_errors_copy_and_pickle_with_their_details() -> None:
    error = OverloadedError(
        grpc.StatusCode.RESOURCE_EXHAUSTED, "busy", reason="OVERLOADED", retry_after=0.5
    )
    for twin in (copy.copy(error), pickle.loads(pickle.dumps(error))):
        assert type(twin) is OverloadedError and twin is not error
        assert (twin.code, twin.message, twin.reason, twin.retry_after) == (
            error.code,
            "busy",
            "OVERLOADED",
            0.5,
        )
        assert str(twin) == str(error)

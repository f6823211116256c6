"""Deadlines, cancellation and overload against a real in-process server.

The engine is held (no batch starts) while a test arranges the queue, so what gets
computed is decided by the code under test, not by how fast this machine is.
"""

from __future__ import annotations

import asyncio
import dataclasses
import queue
import re
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from harness import InProcessServer, serving, wait_until

from embedserve.service.engine.engine import Engine
from embedserve.service.engine.errors import DeadlineExpired
from embedserve.service.engine.stats import EngineStats
from embedserve.service.engine.work import Lane
from embedserve.v1 import common_pb2, embed_service_pb2, rerank_service_pb2

MAX_INPUT_TOKENS = 64
MAX_BATCH_TOKENS = 512
MAX_QUEUE_TOKENS = 512
# Longer than 64 tokens: truncated at the end (the default policy) to exactly 64.
SENTENCE = "The quick brown fox jumps over the lazy dog and keeps on running. "
LONG_TEXT = SENTENCE * 12
SHORT_TEXTS = ["hello world", "a short text", "yes", "the quick brown fox"]


@pytest.fixture(scope="module")
def server(qwen3_embedding_folder: Path) -> Iterator[InProcessServer]:
    with serving(
        model=qwen3_embedding_folder,
        model_name="qwen3-tiny",
        warmup=False,
        max_batch_tokens=MAX_BATCH_TOKENS,
        max_queue_tokens=MAX_QUEUE_TOKENS,
        max_input_tokens=MAX_INPUT_TOKENS,
        # These tests are about the token bound; admission by expected wait has its own.
        max_queue_delay_ms=0,
    ) as running:
        yield running


def engine_of(server: InProcessServer) -> Engine:
    (engine,) = server.engines
    return engine


def settle(server: InProcessServer) -> EngineStats:
    """Wait until no accepted work is left (a failed test leaves none behind), then stats."""
    server.run(engine_of(server).wait_idle(), timeout=60)
    return stats(server)


def stats(server: InProcessServer) -> EngineStats:
    """A copy of the counters, read on the server's loop."""
    engine = engine_of(server)
    return server.call(lambda: dataclasses.replace(engine.stats))


def queued(server: InProcessServer, lane: Lane) -> tuple[int, int]:
    engine = engine_of(server)
    return server.call(lambda: (engine.queued_sequences(lane), engine.queued_tokens(lane)))


@contextmanager
def held(server: InProcessServer) -> Iterator[Engine]:
    engine = engine_of(server)
    server.call(engine.hold)
    try:
        yield engine
    finally:
        server.call(engine.release)


def embed_request(texts: list[str], **fields: object) -> embed_service_pb2.EmbedRequest:
    return embed_service_pb2.EmbedRequest(inputs=texts, **fields)  # type: ignore[arg-type]


def check_computes_exactly(server: InProcessServer, texts: list[str]) -> None:
    """A normal request completes, and the engine computed its sequences and no others."""
    before = settle(server).sequences_computed
    response = server.stubs.embed.Embed(embed_request(texts), timeout=60)
    assert len(response.embeddings) == len(texts)
    assert stats(server).sequences_computed == before + len(texts)


def test_expired_deadline_is_not_computed(server: InProcessServer) -> None:
    check_computes_exactly(server, ["warm the path"])
    before = settle(server)
    texts = [f"{text} {i}" for i, text in enumerate(SHORT_TEXTS * 3)]
    with held(server):
        with pytest.raises(grpc.RpcError) as raised:
            server.stubs.embed.Embed(embed_request(texts), timeout=0.5)
        assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED

        # The server's own deadline timer usually drops the sequences (expired); on a
        # loaded machine the client's cancellation, sent at its slightly earlier copy
        # of the same deadline, can get there first (cancelled). Either way, none runs.
        def dropped() -> int:
            now = stats(server)
            return (
                now.sequences_expired
                - before.sequences_expired
                + now.sequences_cancelled
                - before.sequences_cancelled
            )

        wait_until(lambda: dropped() == len(texts), what="the expired sequences to be dropped")
        assert queued(server, Lane.INTERACTIVE) == (0, 0)
    assert dropped() == len(texts)
    assert stats(server).sequences_computed == before.sequences_computed
    # Released: the dead entries are skipped, only the next request's sequences run.
    check_computes_exactly(server, SHORT_TEXTS)


def test_engine_drops_queued_work_at_its_deadline(server: InProcessServer) -> None:
    """The engine's deadline timer, without a client that could cancel first."""
    engine = engine_of(server)
    before = settle(server)
    sequences = [[7, 8, 9, 10]] * 6

    async def compute_until_deadline() -> BaseException | None:
        deadline = asyncio.get_running_loop().time() + 0.3
        try:
            await engine.compute(sequences, Lane.INTERACTIVE, deadline)
        except DeadlineExpired as exc:
            return exc
        return None

    with held(server):
        # Held, nothing can run: only the deadline can end the call.
        outcome = server.run(compute_until_deadline(), timeout=30)
        assert isinstance(outcome, DeadlineExpired)
        after = stats(server)
        assert after.sequences_expired == before.sequences_expired + len(sequences)
        assert after.sequences_cancelled == before.sequences_cancelled
        assert queued(server, Lane.INTERACTIVE) == (0, 0)
    check_computes_exactly(server, ["after the deadline"])
    assert stats(server).sequences_computed == before.sequences_computed + 1


def test_cancelled_call_is_not_computed(server: InProcessServer) -> None:
    before = settle(server)
    texts = [f"{text} {i}" for i, text in enumerate(SHORT_TEXTS * 2)]
    with held(server):
        future = server.stubs.embed.Embed.future(embed_request(texts), timeout=60)
        wait_until(
            lambda: queued(server, Lane.INTERACTIVE)[0] == len(texts),
            what="the call's sequences to be queued",
        )
        assert future.cancel()  # type: ignore[no-untyped-call]
        wait_until(
            lambda: stats(server).sequences_cancelled == before.sequences_cancelled + len(texts),
            what="the cancelled sequences to be dropped",
        )
        assert queued(server, Lane.INTERACTIVE) == (0, 0)
    assert future.cancelled()
    after = stats(server)
    assert after.sequences_expired == before.sequences_expired
    assert after.sequences_computed == before.sequences_computed
    check_computes_exactly(server, SHORT_TEXTS)


def settled(
    server: InProcessServer,
    future: grpc.Future,  # type: ignore[type-arg]
    queued_sequences: int,
) -> Callable[[], bool]:
    """Whether the call failed, or the interactive lane holds ``queued_sequences``."""
    return lambda: future.done() or queued(server, Lane.INTERACTIVE)[0] == queued_sequences


def test_overload_is_rejected_with_retry_info_and_server_keeps_serving(
    server: InProcessServer,
) -> None:
    before = settle(server)
    request = embed_request([LONG_TEXT] * 4)  # 4 x 64 = 256 tokens
    accepted: list[grpc.Future] = []  # type: ignore[type-arg]
    rejected: grpc.RpcError | None = None
    with held(server):
        for attempt in range(8):
            future = server.stubs.embed.Embed.future(request, timeout=60)
            wanted = (attempt + 1) * 4
            wait_until(settled(server, future, wanted), what="the call to be queued or rejected")
            if future.done():
                error = future.exception()
                assert isinstance(error, grpc.RpcError)
                rejected = error
                break
            accepted.append(future)
        assert rejected is not None, "the queue bound never rejected a call"
        # 512 tokens hold exactly two such calls.
        assert len(accepted) == MAX_QUEUE_TOKENS // 256
        assert queued(server, Lane.INTERACTIVE) == (8, 512)
        assert not any(f.done() for f in accepted)

        assert isinstance(rejected, grpc.Call)
        assert rejected.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        # Trailers-only: no headers of its own, the status and details in the trailers.
        assert [key for key, _ in rejected.initial_metadata() or ()] == []
        status = rpc_status.from_call(rejected)
        assert status is not None and status.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
        retry = [d for d in status.details if d.Is(error_details_pb2.RetryInfo.DESCRIPTOR)]
        assert len(retry) == 1
        info = error_details_pb2.RetryInfo()
        retry[0].Unpack(info)
        assert info.retry_delay.ToNanoseconds() > 0
        reasons = []
        for detail in status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                error_info = error_details_pb2.ErrorInfo()
                detail.Unpack(error_info)
                reasons.append(error_info.reason)
        assert reasons == ["OVERLOADED"]
        assert stats(server).requests_rejected == before.requests_rejected + 1
    for future in accepted:
        response = future.result(timeout=60)
        assert len(response.embeddings) == 4
    # Nothing of the rejected call was queued or computed.
    assert stats(server).sequences_computed == before.sequences_computed + 4 * len(accepted)
    check_computes_exactly(server, [LONG_TEXT] * 4)
    assert stats(server).requests_rejected == before.requests_rejected + 1


def test_a_call_that_alone_exceeds_the_queue_bound_is_rejected(server: InProcessServer) -> None:
    before = settle(server)
    with pytest.raises(grpc.RpcError) as raised:
        server.stubs.embed.Embed(embed_request([LONG_TEXT] * 9), timeout=60)  # 576 > 512
    assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert stats(server).requests_rejected == before.requests_rejected + 1
    assert stats(server).sequences_computed == before.sequences_computed


def stream_items(count: int, inputs: int) -> Iterator[embed_service_pb2.EmbedStreamRequest]:
    for index in range(count):
        yield embed_service_pb2.EmbedStreamRequest(
            id=f"item-{index}", request=embed_request([LONG_TEXT] * inputs)
        )


def test_bulk_stream_waits_instead_of_rejecting(server: InProcessServer) -> None:
    items, inputs = 20, 4  # 20 x 256 tokens, ten times the bound
    assert items * inputs * MAX_INPUT_TOKENS >= 10 * MAX_QUEUE_TOKENS
    before = settle(server)
    responses: queue.Queue[embed_service_pb2.EmbedStreamResponse | BaseException] = queue.Queue()
    finished = threading.Event()

    def consume() -> None:
        try:
            for response in server.stubs.embed.EmbedStream(
                stream_items(items, inputs), timeout=120
            ):
                responses.put(response)
        except BaseException as exc:  # reported to the test thread
            responses.put(exc)
        finally:
            finished.set()

    peak = 0

    def bulk_tokens() -> int:
        nonlocal peak
        tokens = queued(server, Lane.BULK)[1]
        peak = max(peak, tokens)
        return tokens

    consumer = threading.Thread(target=consume, daemon=True)
    with held(server):
        consumer.start()
        wait_until(lambda: bulk_tokens() >= 2 * inputs * MAX_INPUT_TOKENS, what="bulk work")
        assert bulk_tokens() <= MAX_QUEUE_TOKENS
        assert responses.empty()

    def stream_done() -> bool:
        bulk_tokens()  # sample the bound while the stream runs
        return finished.is_set()

    wait_until(stream_done, timeout=120, what="the stream to finish")
    consumer.join(10)
    received = [responses.get_nowait() for _ in range(responses.qsize())]
    errors = [r for r in received if isinstance(r, BaseException)]
    assert not errors, errors
    results = [r for r in received if isinstance(r, embed_service_pb2.EmbedStreamResponse)]
    assert sorted(r.id for r in results) == sorted(f"item-{i}" for i in range(items))
    for response in results:
        assert response.WhichOneof("outcome") == "result", response.error
        assert len(response.result.embeddings) == inputs
    assert peak <= MAX_QUEUE_TOKENS
    after = stats(server)
    assert after.requests_rejected == before.requests_rejected
    assert after.sequences_computed == before.sequences_computed + items * inputs
    assert queued(server, Lane.BULK) == (0, 0)


def test_bulk_item_larger_than_the_bound_still_runs(server: InProcessServer) -> None:
    inputs = 2 * MAX_QUEUE_TOKENS // MAX_INPUT_TOKENS  # one item of twice the bound
    responses = list(server.stubs.embed.EmbedStream(stream_items(2, inputs), timeout=120))
    assert sorted(r.id for r in responses) == ["item-0", "item-1"]
    for response in responses:
        assert response.WhichOneof("outcome") == "result", response.error
        assert len(response.result.embeddings) == inputs


def test_interactive_call_is_served_while_bulk_lane_is_full(server: InProcessServer) -> None:
    """Bulk backpressure does not spill into the interactive lane's bound."""
    with held(server):
        stream = server.stubs.embed.EmbedStream(stream_items(6, 8), timeout=120)
        wait_until(lambda: queued(server, Lane.BULK)[1] > 0, what="bulk work")
        future = server.stubs.embed.Embed.future(
            embed_request(SHORT_TEXTS, priority=common_pb2.PRIORITY_INTERACTIVE), timeout=60
        )
        wait_until(
            lambda: future.done() or queued(server, Lane.INTERACTIVE)[0] == len(SHORT_TEXTS),
            what="the interactive call to be queued",
        )
        assert not future.done(), future.exception()
    assert len(future.result(timeout=60).embeddings) == len(SHORT_TEXTS)
    results = list(stream)
    assert len(results) == 6
    assert all(r.WhichOneof("outcome") == "result" for r in results)


# -- admission by expected wait and the concurrent-call bound ---------------------------


def rejection_of(future: grpc.Future) -> grpc.RpcError:  # type: ignore[type-arg]
    wait_until(future.done, timeout=60, what="the call to end")
    error = future.exception()
    assert isinstance(error, grpc.RpcError), "the call was not refused"
    return error


def test_calls_past_the_expected_wait_are_refused_at_once(qwen3_embedding_folder: Path) -> None:
    # A 1 ms budget: whatever the measured rate, one queued call is more than 1 ms of work
    # for the next, while a call into an empty queue is always admitted. Batches of 4
    # sequences, so that the second call does not fit in the next batch with the first.
    with serving(
        model=qwen3_embedding_folder,
        max_input_tokens=MAX_INPUT_TOKENS,
        max_queue_delay_ms=1,
        max_batch_size=4,
    ) as server:
        engine = engine_of(server)
        assert server.call(lambda: engine.drain_rate.tokens_per_s) is not None, (
            "warm-up did not seed the drain rate"
        )
        with held(server):
            first = server.stubs.embed.Embed.future(embed_request([LONG_TEXT] * 4), timeout=60)
            wait_until(settled(server, first, 4), what="the first call to be queued")
            assert not first.done(), first.exception()
            second = server.stubs.embed.Embed.future(embed_request(SHORT_TEXTS), timeout=60)
            error = rejection_of(second)
            assert isinstance(error, grpc.Call)
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            # The limit is 1 ms, or 3x the call's own work when that is longer, which
            # depends on the rate this machine measured.
            assert "ms of work (limit " in (error.details() or "")
            status = rpc_status.from_call(error)
            assert status is not None
            assert any(d.Is(error_details_pb2.RetryInfo.DESCRIPTOR) for d in status.details)
            assert queued(server, Lane.INTERACTIVE)[0] == 4  # nothing of it was queued
        assert len(first.result(timeout=60).embeddings) == 4


@contextmanager
def slow_drain_server(folder: Path) -> Iterator[InProcessServer]:
    """A 100 ms wait budget, batches of 4 and a drain rate of 1,000 tokens/s, set by hand:
    the engine is held while it matters, so no batch runs to change it."""
    with serving(
        model=folder,
        warmup=False,
        max_input_tokens=MAX_INPUT_TOKENS,
        max_queue_delay_ms=100,
        max_batch_size=4,
    ) as server:
        engine = engine_of(server)
        server.call(lambda: setattr(engine.drain_rate, "tokens_per_s", 1000.0))
        yield server


def test_a_large_call_may_wait_three_times_its_own_work(qwen3_embedding_folder: Path) -> None:
    # A call of 4 x 64 tokens is 256 ms of work, so it may wait 768 ms: it is admitted behind
    # 256, 512 and 768 ms of work, where counting its own work against 100 ms refused it. A
    # small call keeps (about) the 100 ms bound, and a large one behind more than 768 ms is
    # refused.
    with slow_drain_server(qwen3_embedding_folder) as server:
        large = embed_request([LONG_TEXT] * 4)
        with held(server):
            admitted = []
            for queued_calls in range(1, 5):
                call = server.stubs.embed.Embed.future(large, timeout=60)
                wait_until(settled(server, call, 4 * queued_calls), what="a large call queued")
                assert not call.done(), call.exception()
                admitted.append(call)
                if queued_calls == 2:
                    # 512 ms queued. At its largest (4 x 64 tokens) this call could wait 768 ms,
                    # so it passes the check before tokenizing; tokenized, it is short, and
                    # its own bound (3x its work, over 100 ms) is what refuses it.
                    short = rejection_of(
                        server.stubs.embed.Embed.future(embed_request([SENTENCE] * 4), timeout=60)
                    )
                    found = re.search(
                        r"is 512 ms of work \(limit (\d+) ms: 3x the (\d+) ms this call takes\)",
                        short.details() or "",
                    )
                    assert found is not None, short.details()
                    limit_ms, own_ms = int(found[1]), int(found[2])
                    assert 100 < limit_ms < 512 and abs(limit_ms - 3 * own_ms) <= 2
            assert queued(server, Lane.INTERACTIVE) == (16, 1024)
            # Refused before tokenizing: at its largest (64 tokens) it could wait 192 ms.
            small = rejection_of(server.stubs.embed.Embed.future(embed_request(["yes"])))
            assert "is 1024 ms of work (limit 192 ms: 3x the 64 ms this call may take)" in (
                small.details() or ""
            )
            refused = rejection_of(server.stubs.embed.Embed.future(large, timeout=60))
            assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "is 1024 ms of work (limit 768 ms: 3x the 256 ms this call may take)" in (
                refused.details() or ""
            )
        assert all(len(c.result(timeout=60).embeddings) == 4 for c in admitted)


def test_a_similarity_reranks_query_rides_on_its_documents_admission(
    qwen3_embedding_folder: Path,
) -> None:
    # The setup above, with 256 ms of work queued. A lone query (a few tokens) may wait
    # 100 ms and is refused; the same query as part of a rerank of 4 x 64 tokens of
    # documents, which may wait 768 ms, is admitted with them.
    with slow_drain_server(qwen3_embedding_folder) as server:
        with held(server):
            ahead = server.stubs.embed.Embed.future(embed_request([LONG_TEXT] * 4), timeout=60)
            wait_until(settled(server, ahead, 4), what="work to be queued")
            lone = rejection_of(server.stubs.embed.Embed.future(embed_request(["a query"])))
            assert lone.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            rerank = server.stubs.rerank.Rerank.future(
                rerank_service_pb2.RerankRequest(query="a query", documents=[LONG_TEXT] * 4),
                timeout=60,
            )
            wait_until(settled(server, rerank, 9), what="the query and its documents queued")
            assert not rerank.done(), rerank.exception()
        assert len(rerank.result(timeout=60).results) == 4
        assert len(ahead.result(timeout=60).embeddings) == 4


def test_a_call_that_fits_in_the_next_batch_is_admitted(qwen3_embedding_folder: Path) -> None:
    # The same 1 ms budget, with room for both calls in one batch of 64: the second waits
    # for the running batch only, so it is admitted however slow the drain rate says it is.
    with serving(
        model=qwen3_embedding_folder, max_input_tokens=MAX_INPUT_TOKENS, max_queue_delay_ms=1
    ) as server:
        with held(server):
            first = server.stubs.embed.Embed.future(embed_request([LONG_TEXT] * 4), timeout=60)
            wait_until(settled(server, first, 4), what="the first call to be queued")
            second = server.stubs.embed.Embed.future(embed_request(SHORT_TEXTS), timeout=60)
            wait_until(settled(server, second, 8), what="the second call to be queued")
            assert not second.done(), second.exception()
        assert len(second.result(timeout=60).embeddings) == len(SHORT_TEXTS)
        assert len(first.result(timeout=60).embeddings) == 4


def test_expected_wait_admission_can_be_turned_off(server: InProcessServer) -> None:
    # The module's server runs with max_queue_delay_ms=0: after full batches have set a
    # drain rate, a queue of far more than 1 ms of work still admits up to the token bound.
    check_computes_exactly(server, [LONG_TEXT] * 8)  # one full 512-token batch
    assert server.call(lambda: engine_of(server).drain_rate.tokens_per_s) is not None
    with held(server):
        futures = []
        for attempt in range(2):
            futures.append(server.stubs.embed.Embed.future(embed_request([LONG_TEXT] * 4)))
            wait_until(settled(server, futures[-1], 4 * (attempt + 1)), what="queued")
        assert not any(f.done() for f in futures)
    assert all(len(f.result(timeout=60).embeddings) == 4 for f in futures)


def test_calls_past_the_concurrent_rpc_bound_are_refused(qwen3_embedding_folder: Path) -> None:
    with serving(model=qwen3_embedding_folder, warmup=False, max_concurrent_rpcs=2) as server:
        with held(server):
            calls = [
                server.stubs.embed.Embed.future(embed_request(SHORT_TEXTS), timeout=60)
                for _ in range(2)
            ]
            wait_until(lambda: engine_of(server).outstanding == 2, what="two calls in progress")
            error = rejection_of(server.stubs.embed.Embed.future(embed_request(["x"])))
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert stats(server).requests_rejected == 0  # refused before the engine saw it
        assert all(len(c.result(timeout=60).embeddings) == len(SHORT_TEXTS) for c in calls)
        # Once the bound has room again, calls are served.
        check_computes_exactly(server, ["again"])


def test_a_flood_the_event_loop_cannot_take_is_shed_by_grpc_core(
    qwen3_embedding_folder: Path,
) -> None:
    # With the event loop blocked, arriving calls can only wait in gRPC's core. Past
    # --max-pending-calls the core cancels the excess at once, with the loop still
    # blocked; the calls it kept are served once the loop runs again.
    with serving(model=qwen3_embedding_folder, warmup=False, max_pending_calls=4) as server:
        check_computes_exactly(server, ["warm"])
        loop_free = threading.Event()
        loop_blocked = threading.Event()

        def block_the_loop() -> None:
            loop_blocked.set()
            loop_free.wait(60)

        server.schedule(block_the_loop)
        try:
            assert loop_blocked.wait(10)
            calls = [
                server.stubs.embed.Embed.future(embed_request([f"text {n}"]), timeout=60)
                for n in range(12)
            ]
            # At most 4 pending, and one taken by the loop's outstanding request.
            wait_until(lambda: sum(c.done() for c in calls) >= 7, what="the core to shed")
            shed = [c for c in calls if c.done()]
            assert {c.code() for c in shed} == {grpc.StatusCode.CANCELLED}
        finally:
            loop_free.set()
        kept = [c for c in calls if c not in shed]
        assert kept, "the core kept none of the calls"
        assert all(len(c.result(timeout=60).embeddings) == 1 for c in kept)

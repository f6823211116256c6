"""EmbedStream: ids echoed once each, per-item errors, flow control and half-close.

The tests that need work to stay in flight hold the engine (no batch starts) and feed
the stream from an ``Outbox`` whose iterator the test closes when it wants the client
to half-close. Nothing waits on a fixed sleep: state is polled with ``wait_until``.
"""

from __future__ import annotations

import queue
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2, status_pb2
from harness import InProcessServer, wait_until

from embedserve.service.engine.work import Lane
from embedserve.v1 import common_pb2, embed_service_pb2, info_service_pb2

INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT.value[0]
NOT_FOUND = grpc.StatusCode.NOT_FOUND.value[0]


class Outbox:
    """A request iterator the test feeds while the call runs; close() half-closes."""

    def __init__(self) -> None:
        self._items: queue.Queue[embed_service_pb2.EmbedStreamRequest | None] = queue.Queue()

    def put(self, *items: embed_service_pb2.EmbedStreamRequest) -> None:
        for item in items:
            self._items.put(item)

    def close(self) -> None:
        self._items.put(None)

    def __iter__(self) -> Iterator[embed_service_pb2.EmbedStreamRequest]:
        while True:
            try:
                item = self._items.get(timeout=120)
            except queue.Empty:  # a test that forgot to close: end rather than hang
                return
            if item is None:
                return
            yield item


@dataclass
class Stream:
    outbox: Outbox
    call: grpc.CallIterator[embed_service_pb2.EmbedStreamResponse]
    responses: Iterator[embed_service_pb2.EmbedStreamResponse]

    def next(self) -> embed_service_pb2.EmbedStreamResponse:
        return next(self.responses)

    def rest(self) -> list[embed_service_pb2.EmbedStreamResponse]:
        return list(self.responses)


@contextmanager
def open_stream(server: InProcessServer) -> Iterator[Stream]:
    outbox = Outbox()
    call = server.stubs.embed.EmbedStream(iter(outbox), timeout=60)
    try:
        yield Stream(outbox, call, iter(call))
    finally:
        outbox.close()
        cancel: Callable[[], object] = call.cancel  # grpc-stubs leaves it untyped
        cancel()  # a no-op once the call has finished


@contextmanager
def held(server: InProcessServer) -> Iterator[None]:
    """No batch starts until the block ends; queued work waits."""
    engine = server.engines[0]
    server.call(engine.hold)
    try:
        yield
    finally:
        server.call(engine.release)


def queued_bulk_sequences(server: InProcessServer) -> int:
    engine = server.engines[0]
    count: int = server.call(lambda: engine.queued_sequences(Lane.BULK))
    return count


def item(item_id: str, inputs: list[str], **options: int) -> embed_service_pb2.EmbedStreamRequest:
    request = embed_service_pb2.EmbedRequest(inputs=inputs)
    for name, value in options.items():
        setattr(request, name, value)
    return embed_service_pb2.EmbedStreamRequest(id=item_id, request=request)


def unary_vectors(server: InProcessServer, inputs: list[str]) -> np.ndarray:
    response = server.stubs.embed.Embed(embed_service_pb2.EmbedRequest(inputs=inputs), timeout=60)
    return result_vectors(response)


def result_vectors(result: embed_service_pb2.EmbedResponse) -> np.ndarray:
    return np.array([list(e.float32.values) for e in result.embeddings], dtype=np.float32)


def violations(error: status_pb2.Status) -> list[str]:
    fields: list[str] = []
    for detail in error.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            fields.extend(str(v.field) for v in bad.field_violations)
    return fields


def error_domain(error: status_pb2.Status) -> str:
    for detail in error.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return str(info.domain)
    raise AssertionError(f"no ErrorInfo in {error}")


def by_id(
    responses: list[embed_service_pb2.EmbedStreamResponse],
) -> dict[str, embed_service_pb2.EmbedStreamResponse]:
    counts = Counter(r.id for r in responses)
    assert all(n == 1 for n in counts.values()), f"ids answered more than once: {counts}"
    return {r.id: r for r in responses}


def inputs_for(index: int) -> list[str]:
    return [f"item {index} text {j}: " + "word " * (index % 7) for j in range(1 + index % 3)]


# -- tests -------------------------------------------------------------------------


def test_each_item_is_answered_once_with_its_id(minilm_server: InProcessServer) -> None:
    items = [item(f"item-{i}", inputs_for(i)) for i in range(12)]
    call = minilm_server.stubs.embed.EmbedStream(iter(items), timeout=120)
    responses = list(call)
    assert call.code() == grpc.StatusCode.OK
    answered = by_id(responses)
    assert sorted(answered) == sorted(i.id for i in items)
    for sent in items:
        response = answered[sent.id]
        assert response.WhichOneof("outcome") == "result", response
        result = response.result
        assert result.model == "all-MiniLM-L6-v2"
        assert result.usage.inputs == len(sent.request.inputs)
        np.testing.assert_allclose(
            result_vectors(result),
            unary_vectors(minilm_server, list(sent.request.inputs)),
            atol=1e-5,
        )


def test_a_bad_item_fails_alone(minilm_server: InProcessServer) -> None:
    good = [item(f"good-{i}", inputs_for(i)) for i in range(4)]
    bad = {
        "empty-input": (item("empty-input", [""]), INVALID_ARGUMENT, ["request.inputs[0]"]),
        "second-empty": (
            item("second-empty", ["fine", ""]),
            INVALID_ARGUMENT,
            ["request.inputs[1]"],
        ),
        "unknown-encoding": (
            item("unknown-encoding", ["fine"], encoding=99),
            INVALID_ARGUMENT,
            ["request.encoding"],
        ),
        "unknown-priority": (
            item("unknown-priority", ["fine"], priority=99),
            INVALID_ARGUMENT,
            ["request.priority"],
        ),
        "too-long": (
            item(
                "too-long",
                ["ok", " ".join(["cat"] * 300)],
                truncation=common_pb2.TRUNCATION_POLICY_ERROR,
            ),
            INVALID_ARGUMENT,
            ["request.inputs[1]"],
        ),
    }
    unknown_model = embed_service_pb2.EmbedStreamRequest(
        id="unknown-model", request=embed_service_pb2.EmbedRequest(model="nope", inputs=["x"])
    )
    sent = [
        good[0],
        bad["empty-input"][0],
        good[1],
        bad["second-empty"][0],
        bad["unknown-encoding"][0],
        unknown_model,
        good[2],
        bad["unknown-priority"][0],
        bad["too-long"][0],
        good[3],
    ]
    call = minilm_server.stubs.embed.EmbedStream(iter(sent), timeout=120)
    answered = by_id(list(call))
    assert call.code() == grpc.StatusCode.OK  # bad items never end the stream
    assert sorted(answered) == sorted(s.id for s in sent)
    for name, (_, code, fields) in bad.items():
        response = answered[name]
        assert response.WhichOneof("outcome") == "error", response
        assert response.error.code == code
        assert violations(response.error) == fields
        assert error_domain(response.error) == "embedserve"
        for field in fields:
            assert field in response.error.message
    missing = answered["unknown-model"]
    assert missing.WhichOneof("outcome") == "error"
    assert missing.error.code == NOT_FOUND
    (field,) = violations(missing.error)
    assert field.endswith("model")
    for good_item in good:
        response = answered[good_item.id]
        assert response.WhichOneof("outcome") == "result", response
        np.testing.assert_allclose(
            result_vectors(response.result),
            unary_vectors(minilm_server, list(good_item.request.inputs)),
            atol=1e-5,
        )


def test_the_stream_error_matches_the_unary_error(minilm_server: InProcessServer) -> None:
    request = embed_service_pb2.EmbedRequest(inputs=["ok", ""], dimensions=3)
    with pytest.raises(grpc.RpcError) as caught:
        minilm_server.stubs.embed.Embed(request, timeout=60)
    (response,) = list(
        minilm_server.stubs.embed.EmbedStream(
            iter([embed_service_pb2.EmbedStreamRequest(id="x", request=request)]), timeout=60
        )
    )
    assert response.error.code == caught.value.code().value[0]
    assert sorted(violations(response.error)) == ["request.dimensions", "request.inputs[1]"]


def test_an_empty_id_is_rejected(minilm_server: InProcessServer) -> None:
    sent = [item("", ["no id"]), item("with-id", ["has an id"])]
    call = minilm_server.stubs.embed.EmbedStream(iter(sent), timeout=120)
    answered = by_id(list(call))
    assert call.code() == grpc.StatusCode.OK
    assert set(answered) == {"", "with-id"}
    assert answered[""].WhichOneof("outcome") == "error"
    assert answered[""].error.code == INVALID_ARGUMENT
    assert violations(answered[""].error) == ["id"]
    assert "id" in answered[""].error.message
    assert answered["with-id"].WhichOneof("outcome") == "result"


def test_an_id_in_flight_cannot_be_reused(minilm_server: InProcessServer) -> None:
    with open_stream(minilm_server) as stream:
        with held(minilm_server):
            stream.outbox.put(item("dup", ["first"]), item("dup", ["second"]))
            # The first item is stuck in the held engine, so the only possible answer
            # now is the duplicate's rejection.
            rejected = stream.next()
            assert rejected.id == "dup"
            assert rejected.WhichOneof("outcome") == "error", rejected
            assert rejected.error.code == INVALID_ARGUMENT
            assert violations(rejected.error) == ["id"]
            assert "dup" in rejected.error.message
            wait_until(lambda: queued_bulk_sequences(minilm_server) == 1, what="first item queued")
        first = stream.next()
        assert first.id == "dup" and first.WhichOneof("outcome") == "result", first
        np.testing.assert_allclose(
            result_vectors(first.result), unary_vectors(minilm_server, ["first"]), atol=1e-5
        )
        # Once answered, the id is free again.
        stream.outbox.put(item("dup", ["third"]))
        again = stream.next()
        assert again.id == "dup" and again.WhichOneof("outcome") == "result", again
        np.testing.assert_allclose(
            result_vectors(again.result), unary_vectors(minilm_server, ["third"]), atol=1e-5
        )
        stream.outbox.close()
        assert stream.rest() == []
        assert stream.call.code() == grpc.StatusCode.OK


def test_many_items_through_the_window(minilm_server: InProcessServer) -> None:
    info = minilm_server.stubs.info.GetServerInfo(
        info_service_pb2.GetServerInfoRequest(), timeout=30
    )
    assert {m.batching.stream_window for m in info.models} == {16}
    items = [item(f"{i:03d}", inputs_for(i)) for i in range(200)]
    call = minilm_server.stubs.embed.EmbedStream(iter(items), timeout=300)
    responses = list(call)
    assert call.code() == grpc.StatusCode.OK
    assert len(responses) == len(items)
    answered = by_id(responses)
    assert sorted(answered) == [i.id for i in items]
    for sent in items:
        response = answered[sent.id]
        assert response.WhichOneof("outcome") == "result", response
        assert len(response.result.embeddings) == len(sent.request.inputs)
    # Spot-check the content: a stream item equals the unary call on the same inputs.
    for index in (0, 101, 199):
        sent = items[index]
        np.testing.assert_allclose(
            result_vectors(answered[sent.id].result),
            unary_vectors(minilm_server, list(sent.request.inputs)),
            atol=1e-5,
        )


def test_the_window_bounds_the_items_in_flight(minilm_server: InProcessServer) -> None:
    window = 16
    count = 3 * window
    with open_stream(minilm_server) as stream:
        with held(minilm_server):
            stream.outbox.put(*[item(f"w{i}", [f"one input {i}"]) for i in range(count)])
            stream.outbox.close()
            wait_until(lambda: queued_bulk_sequences(minilm_server) >= window, what="a full window")
            # No response can be sent while the engine is held, so no slot frees: the
            # server must not have read past the window. (One-sided: a broken window
            # could still be caught mid-read, but a correct one never fails this.)
            assert queued_bulk_sequences(minilm_server) == window
        answered = by_id(stream.rest())
        assert sorted(answered) == sorted(f"w{i}" for i in range(count))
        assert all(r.WhichOneof("outcome") == "result" for r in answered.values())
        assert stream.call.code() == grpc.StatusCode.OK


def test_half_close_with_items_in_flight_gets_every_answer(
    minilm_server: InProcessServer,
) -> None:
    sent = [item(f"h{i}", inputs_for(i)) for i in range(6)]
    expected_sequences = sum(len(s.request.inputs) for s in sent)
    with open_stream(minilm_server) as stream:
        with held(minilm_server):
            stream.outbox.put(*sent)
            wait_until(
                lambda: queued_bulk_sequences(minilm_server) == expected_sequences,
                what="every item queued",
            )
            stream.outbox.close()  # the client is done sending; nothing is answered yet
        answered = by_id(stream.rest())  # ends only when the server ends the call
        assert stream.call.code() == grpc.StatusCode.OK
    assert sorted(answered) == sorted(s.id for s in sent)
    for s in sent:
        response = answered[s.id]
        assert response.WhichOneof("outcome") == "result", response
        np.testing.assert_allclose(
            result_vectors(response.result),
            unary_vectors(minilm_server, list(s.request.inputs)),
            atol=1e-5,
        )


def test_a_small_item_overtakes_a_large_one(minilm_server: InProcessServer) -> None:
    """Responses come back as they complete, not in request order.

    What makes the order deterministic is the scheduler, not timing: with the engine
    held, both items are queued before any batch starts; the first batch grows around
    the oldest sequence (the large item's short first input) with the sequences closest
    in length, so it takes the small item's equally short input and then fills up to
    max_batch_size with long inputs. The small item is done after that first batch,
    while the large item's remaining long inputs need several more batches.
    """
    info = minilm_server.stubs.info.GetServerInfo(
        info_service_pb2.GetServerInfoRequest(), timeout=30
    )
    batching = info.models[0].batching
    long_text = " ".join(["word"] * 120)  # 122 tokens
    long_count = 199
    assert long_count > batching.max_batch_size  # the large item needs several batches
    assert batching.max_batch_size * 122 <= batching.max_batch_tokens
    large = item("large", ["hi", *[long_text] * long_count])
    small = item("small", ["hi"])
    with open_stream(minilm_server) as stream:
        with held(minilm_server):
            stream.outbox.put(large, small)
            stream.outbox.close()
            wait_until(
                lambda: queued_bulk_sequences(minilm_server) == long_count + 2,
                what="both items queued",
            )
        responses = stream.rest()
        assert stream.call.code() == grpc.StatusCode.OK
    assert [r.id for r in responses] == ["small", "large"]
    answered = by_id(responses)
    small_vectors = result_vectors(answered["small"].result)
    large_vectors = result_vectors(answered["large"].result)
    assert large_vectors.shape == (long_count + 1, 384)
    assert small_vectors.shape == (1, 384)
    # Same text, same vector, whichever item and batch carried it.
    np.testing.assert_allclose(large_vectors[0], small_vectors[0], atol=1e-5)
    expected = unary_vectors(minilm_server, ["hi", long_text])
    np.testing.assert_allclose(large_vectors[0], expected[0], atol=1e-5)
    np.testing.assert_allclose(large_vectors[1:], np.repeat(expected[1:], long_count, 0), atol=1e-5)

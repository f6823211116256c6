"""Property-based fuzzing: over 10,000 random requests, the only outcomes are OK or a
precise client-error code, never INTERNAL or UNKNOWN, never a crash or a hang; the
server answers a health check after every 100 requests."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from harness import InProcessServer, serving
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from embedserve.v1 import embed_service_pb2, rerank_service_pb2

# Enough examples across the tests below for at least 10,000 requests in all.
SCALE = int(os.environ.get("EMBEDSERVE_FUZZ_SCALE", "1"))
CLIENT_ERRORS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND}
SETTINGS = settings(
    deadline=None,
    derandomize=os.environ.get("EMBEDSERVE_FUZZ_RANDOM") != "1",
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

CONTROL = st.text(alphabet=st.characters(max_codepoint=0x1F), max_size=20)
texts = st.one_of(
    st.text(max_size=40),
    st.text(alphabet=st.characters(blacklist_categories=["Cs"]), min_size=1, max_size=200),
    CONTROL,
    st.just(""),
    st.just(" "),
    st.just("<|endoftext|><|im_start|>yes no</think>"),
    st.sampled_from(["x" * 20_000, "word " * 3_000, "\u0000" * 1_000, "🚀" * 2_000]),
)
enum_values = st.one_of(st.integers(-3, 6), st.integers(-(2**31), 2**31 - 1))
models = st.sampled_from(["", "fuzz-embed", "fuzz-rerank", "missing", "x" * 300, "\u0000"])


class Counter:
    def __init__(self, server: InProcessServer) -> None:
        self.server = server
        self.sent = 0
        self.health = health_pb2_grpc.HealthStub(server.stubs.channel)

    def tick(self) -> None:
        self.sent += 1
        if self.sent % 100 == 0:
            reply = self.health.Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


@pytest.fixture(scope="module")
def fuzz_server(qwen3_embedding_folder: Path, qwen3_reranker_folder: Path) -> Iterator[Counter]:
    with serving(
        model=qwen3_embedding_folder,
        model_name="fuzz-embed",
        reranker=qwen3_reranker_folder,
        reranker_name="fuzz-rerank",
        warmup=False,
        max_inputs=16,
        max_input_tokens=128,
        max_batch_tokens=2048,
    ) as server:
        counter = Counter(server)
        yield counter
        assert counter.sent >= 10_000 * SCALE or os.environ.get("EMBEDSERVE_FUZZ_PARTIAL")


def check(call: Any, *args: Any) -> Any:
    try:
        return call(*args, timeout=60)
    except grpc.RpcError as err:
        code = err.code()
        assert code in CLIENT_ERRORS, f"{code}: {err.details()}"
        return None


@st.composite
def embed_requests(draw: st.DrawFn) -> embed_service_pb2.EmbedRequest:
    request = embed_service_pb2.EmbedRequest(
        model=draw(models), inputs=draw(st.lists(texts, max_size=20))
    )
    if draw(st.booleans()):
        request.instruction = draw(texts)
    for field in ("input_type", "truncation", "encoding", "priority"):
        if draw(st.booleans()):
            setattr(request, field, draw(enum_values))
    if draw(st.booleans()):
        request.dimensions = draw(st.one_of(st.integers(0, 128), st.integers(0, 2**32 - 1)))
    if draw(st.booleans()):
        request.normalize = draw(st.booleans())
    return request


@st.composite
def rerank_requests(draw: st.DrawFn) -> rerank_service_pb2.RerankRequest:
    request = rerank_service_pb2.RerankRequest(
        model=draw(models),
        query=draw(texts),
        documents=draw(st.lists(texts, max_size=20)),
        return_documents=draw(st.booleans()),
    )
    if draw(st.booleans()):
        request.top_n = draw(st.integers(-(2**31), 2**31 - 1))
    if draw(st.booleans()):
        request.instruction = draw(texts)
    for field in ("truncation", "priority"):
        if draw(st.booleans()):
            setattr(request, field, draw(enum_values))
    return request


@settings(SETTINGS, max_examples=5_000 * SCALE)
@given(request=embed_requests())
def test_random_embed_requests(
    fuzz_server: Counter, request: embed_service_pb2.EmbedRequest
) -> None:
    reply = check(fuzz_server.server.stubs.embed.Embed, request)
    fuzz_server.tick()
    if reply is not None:
        assert len(reply.embeddings) == len(request.inputs)
        assert reply.usage.inputs == len(request.inputs)


@settings(SETTINGS, max_examples=3_000 * SCALE)
@given(request=rerank_requests())
def test_random_rerank_requests(
    fuzz_server: Counter, request: rerank_service_pb2.RerankRequest
) -> None:
    reply = check(fuzz_server.server.stubs.rerank.Rerank, request)
    fuzz_server.tick()
    if reply is not None:
        expected = len(request.documents)
        if request.HasField("top_n"):
            expected = min(expected, request.top_n)
        assert len(reply.results) == expected
        assert sorted(r.index for r in reply.results) == sorted(set(r.index for r in reply.results))


@settings(SETTINGS, max_examples=1_500 * SCALE)
@given(
    method=st.sampled_from(
        [
            "/embedserve.v1.EmbedService/Embed",
            "/embedserve.v1.RerankService/Rerank",
            "/embedserve.v1.InfoService/GetServerInfo",
        ]
    ),
    payload=st.binary(max_size=300),
)
def test_garbage_bytes_as_request_messages(
    fuzz_server: Counter, method: str, payload: bytes
) -> None:
    call = fuzz_server.server.stubs.channel.unary_unary(method, None, None)
    check(call, payload)
    fuzz_server.tick()


@settings(SETTINGS, max_examples=500 * SCALE)
@given(
    items=st.lists(
        st.tuples(st.sampled_from(["a", "b", "c", "", "a"]), embed_requests()), max_size=6
    ),
    garbage=st.one_of(st.none(), st.binary(min_size=1, max_size=50)),
)
def test_random_streams(
    fuzz_server: Counter,
    items: list[tuple[str, embed_service_pb2.EmbedRequest]],
    garbage: bytes | None,
) -> None:
    messages = [
        embed_service_pb2.EmbedStreamRequest(id=item_id, request=request).SerializeToString()
        for item_id, request in items
    ]
    if garbage is not None:
        messages.append(garbage)
    call = fuzz_server.server.stubs.channel.stream_stream(
        "/embedserve.v1.EmbedService/EmbedStream", None, None
    )
    try:
        answers = [
            embed_service_pb2.EmbedStreamResponse.FromString(raw)
            for raw in call(iter(messages), timeout=60)
        ]
    except grpc.RpcError as err:
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, f"{err.code()}: {err.details()}"
        answers = None
    fuzz_server.tick()
    if answers is not None:
        # Random bytes can be a valid message (unknown fields are legal in proto3): then
        # they are one more item, answered like the others.
        assert len(answers) == len(items) + (garbage is not None and _parses(garbage))
        for answer in answers:
            if answer.HasField("error"):
                assert answer.error.code in {c.value[0] for c in CLIENT_ERRORS}
    # A stream stands for several requests in the 10,000.
    for _ in range(max(0, len(items) - 1)):
        fuzz_server.tick()


def _parses(data: bytes) -> bool:
    try:
        embed_service_pb2.EmbedStreamRequest.FromString(data)
    except Exception:
        return False
    return True

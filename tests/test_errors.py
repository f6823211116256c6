"""Every bad request gets its precise gRPC code, a message naming the field, and
``google.rpc.Status`` details (ErrorInfo in the "embedserve" domain, BadRequest naming
each offending field). No bad request may surface as INTERNAL or UNKNOWN."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from harness import InProcessServer, serving

from embedserve.v1 import (
    common_pb2,
    embed_service_pb2,
    info_service_pb2,
    rerank_service_pb2,
)

MINILM_MAX_TOKENS = 256
# Far over every served model's limit (MiniLM 256, the tiny cross-encoder 512, the tiny
# Qwen3 models 512) in every tokenizer used here.
TOO_LONG = " ".join(["retrieval"] * 1000)
UNKNOWN_ENUM = 99
SMALL_MAX_INPUTS = 4


@dataclass(frozen=True)
class Failure:
    """What a failed call carried, read from the status and its google.rpc details."""

    code: grpc.StatusCode
    message: str
    fields: list[str]
    reason: str
    domain: str


def failure(call: Callable[[], object]) -> Failure:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    error = caught.value
    code = error.code()
    assert code not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN), error.details()
    assert isinstance(error, grpc.Call)  # the sync stubs raise a call object
    status = rpc_status.from_call(error)
    assert status is not None, "the error carries no google.rpc.Status details"
    assert status.code == code.value[0]
    assert status.message == error.details()
    fields: list[str] = []
    infos: list[tuple[str, str]] = []
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            for violation in bad.field_violations:
                assert violation.description, f"violation of {violation.field} has no description"
                fields.append(str(violation.field))
        elif detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            infos.append((str(info.reason), str(info.domain)))
    assert len(infos) == 1, f"expected exactly one ErrorInfo, got {infos}"
    reason, domain = infos[0]
    return Failure(code, str(status.message), fields, reason, domain)


def invalid(call: Callable[[], object], *fields: str) -> Failure:
    """The call fails with INVALID_ARGUMENT naming exactly ``fields`` (in any order)."""
    result = failure(call)
    assert result.code == grpc.StatusCode.INVALID_ARGUMENT, result
    assert sorted(result.fields) == sorted(fields), result
    assert result.reason == "INVALID_ARGUMENT"
    assert result.domain == "embedserve"
    for field in fields:
        assert field in result.message, f"{field!r} not named in {result.message!r}"
    return result


def not_found(call: Callable[[], object]) -> Failure:
    result = failure(call)
    assert result.code == grpc.StatusCode.NOT_FOUND, result
    assert result.fields == ["model"], result
    assert result.reason == "MODEL_NOT_FOUND"
    assert result.domain == "embedserve"
    assert "model" in result.message
    return result


def embed(server: InProcessServer, request: embed_service_pb2.EmbedRequest) -> Callable[[], object]:
    return lambda: server.stubs.embed.Embed(request, timeout=60)


def rerank(
    server: InProcessServer, request: rerank_service_pb2.RerankRequest
) -> Callable[[], object]:
    return lambda: server.stubs.rerank.Rerank(request, timeout=60)


def model_info(server: InProcessServer, kind: int) -> info_service_pb2.ModelInfo:
    response = server.stubs.info.GetServerInfo(info_service_pb2.GetServerInfoRequest(), timeout=30)
    for model in response.models:
        if model.kind == kind and model.is_default:
            return model
    raise AssertionError(f"no default model of kind {kind}")


def vectors(response: embed_service_pb2.EmbedResponse) -> np.ndarray:
    return np.array([list(e.float32.values) for e in response.embeddings], dtype=np.float32)


@pytest.fixture(scope="module")
def small_limit_server() -> Iterator[InProcessServer]:
    with serving(max_inputs=SMALL_MAX_INPUTS, warmup=False) as server:
        yield server


# -- Embed -------------------------------------------------------------------------


def test_empty_inputs_list(minilm_server: InProcessServer) -> None:
    invalid(embed(minilm_server, embed_service_pb2.EmbedRequest(inputs=[])), "inputs")


def test_empty_input_string_is_named_by_index(minilm_server: InProcessServer) -> None:
    request = embed_service_pb2.EmbedRequest(inputs=["fine", "", "also fine"])
    invalid(embed(minilm_server, request), "inputs[1]")


def test_every_empty_input_is_reported(minilm_server: InProcessServer) -> None:
    request = embed_service_pb2.EmbedRequest(inputs=["", "ok", ""])
    invalid(embed(minilm_server, request), "inputs[0]", "inputs[2]")


def test_too_many_inputs(small_limit_server: InProcessServer) -> None:
    info = model_info(small_limit_server, info_service_pb2.MODEL_KIND_EMBEDDING)
    assert info.batching.max_inputs_per_request == SMALL_MAX_INPUTS
    over = embed_service_pb2.EmbedRequest(inputs=["text"] * (SMALL_MAX_INPUTS + 1))
    result = invalid(embed(small_limit_server, over), "inputs")
    assert str(SMALL_MAX_INPUTS) in result.message
    at_limit = embed_service_pb2.EmbedRequest(inputs=["text"] * SMALL_MAX_INPUTS)
    response = small_limit_server.stubs.embed.Embed(at_limit, timeout=60)
    assert len(response.embeddings) == SMALL_MAX_INPUTS


def test_too_many_documents(small_limit_server: InProcessServer) -> None:
    request = rerank_service_pb2.RerankRequest(
        query="q", documents=["doc"] * (SMALL_MAX_INPUTS + 1)
    )
    invalid(rerank(small_limit_server, request), "documents")


def test_too_many_inputs_in_a_stream_item(small_limit_server: InProcessServer) -> None:
    item = embed_service_pb2.EmbedStreamRequest(
        id="big", request=embed_service_pb2.EmbedRequest(inputs=["t"] * (SMALL_MAX_INPUTS + 1))
    )
    responses = list(small_limit_server.stubs.embed.EmbedStream(iter([item]), timeout=60))
    assert len(responses) == 1
    (response,) = responses
    assert response.id == "big" and response.WhichOneof("outcome") == "error"
    assert response.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    fields: list[str] = []
    for detail in response.error.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            fields.extend(str(v.field) for v in bad.field_violations)
    assert fields == ["request.inputs"]


def test_too_many_inputs_at_the_default_limit(minilm_server: InProcessServer) -> None:
    info = model_info(minilm_server, info_service_pb2.MODEL_KIND_EMBEDDING)
    limit = info.batching.max_inputs_per_request
    assert limit == 512
    request = embed_service_pb2.EmbedRequest(inputs=["x"] * (limit + 1))
    invalid(embed(minilm_server, request), "inputs")


def test_input_over_max_tokens_with_error_policy(minilm_server: InProcessServer) -> None:
    info = model_info(minilm_server, info_service_pb2.MODEL_KIND_EMBEDDING)
    assert info.max_input_tokens == MINILM_MAX_TOKENS
    request = embed_service_pb2.EmbedRequest(
        inputs=["short", "also short", TOO_LONG],
        truncation=common_pb2.TRUNCATION_POLICY_ERROR,
    )
    result = invalid(embed(minilm_server, request), "inputs[2]")
    assert str(MINILM_MAX_TOKENS) in result.message


def test_input_exactly_at_max_tokens_is_accepted(minilm_server: InProcessServer) -> None:
    # [CLS] + 254 single-token words + [SEP] = 256 tokens.
    text = " ".join(["cat"] * (MINILM_MAX_TOKENS - 2))
    request = embed_service_pb2.EmbedRequest(
        inputs=[text], truncation=common_pb2.TRUNCATION_POLICY_ERROR
    )
    response = minilm_server.stubs.embed.Embed(request, timeout=60)
    assert response.usage.input_tokens == MINILM_MAX_TOKENS
    assert response.usage.truncated_inputs == 0
    over = embed_service_pb2.EmbedRequest(
        inputs=[text + " cat"], truncation=common_pb2.TRUNCATION_POLICY_ERROR
    )
    invalid(embed(minilm_server, over), "inputs[0]")


@pytest.mark.parametrize(
    "truncation", [common_pb2.TRUNCATION_POLICY_ERROR, common_pb2.TRUNCATION_POLICY_END]
)
def test_instruction_that_leaves_no_room_is_named(
    minilm_server: InProcessServer, truncation: common_pb2.TruncationPolicy.ValueType
) -> None:
    request = embed_service_pb2.EmbedRequest(
        inputs=["hi"], instruction=TOO_LONG, truncation=truncation
    )
    invalid(embed(minilm_server, request), "instruction")


def test_truncation_end_and_start_keep_the_right_tokens(minilm_server: InProcessServer) -> None:
    # "cat" and "dog" are single MiniLM tokens: 400 words + [CLS] + [SEP] = 402 tokens.
    words = ["cat"] * 200 + ["dog"] * 200
    text = " ".join(words)
    kept = MINILM_MAX_TOKENS - 2
    responses = {}
    for policy in (common_pb2.TRUNCATION_POLICY_END, common_pb2.TRUNCATION_POLICY_START):
        request = embed_service_pb2.EmbedRequest(inputs=["short", text], truncation=policy)
        response = minilm_server.stubs.embed.Embed(request, timeout=60)
        assert response.usage.truncated_inputs == 1
        assert response.usage.inputs == 2
        responses[policy] = vectors(response)
    expected_end, expected_start = vectors(
        minilm_server.stubs.embed.Embed(
            embed_service_pb2.EmbedRequest(
                inputs=[" ".join(words[:kept]), " ".join(words[-kept:])],
                truncation=common_pb2.TRUNCATION_POLICY_ERROR,
            ),
            timeout=60,
        )
    )
    end = responses[common_pb2.TRUNCATION_POLICY_END][1]
    start = responses[common_pb2.TRUNCATION_POLICY_START][1]
    np.testing.assert_allclose(end, expected_end, atol=1e-5)
    np.testing.assert_allclose(start, expected_start, atol=1e-5)
    assert not np.allclose(end, start, atol=1e-3)
    # The untruncated input is unaffected by the policy.
    np.testing.assert_allclose(
        responses[common_pb2.TRUNCATION_POLICY_END][0],
        responses[common_pb2.TRUNCATION_POLICY_START][0],
        atol=1e-5,
    )


@pytest.mark.parametrize("dimensions", [0, 1, 383, 385, 4096])
def test_dimensions_outside_the_model_range(
    minilm_server: InProcessServer, dimensions: int
) -> None:
    info = model_info(minilm_server, info_service_pb2.MODEL_KIND_EMBEDDING)
    assert info.min_dimensions == info.max_dimensions == 384  # not matryoshka-trained
    request = embed_service_pb2.EmbedRequest(inputs=["x"], dimensions=dimensions)
    result = invalid(embed(minilm_server, request), "dimensions")
    assert str(dimensions) in result.message


@pytest.mark.parametrize("dimensions", [0, 31, 65, 1000])
def test_qwen3_dimensions_outside_the_mrl_range(
    qwen3_server: InProcessServer, dimensions: int
) -> None:
    info = model_info(qwen3_server, info_service_pb2.MODEL_KIND_EMBEDDING)
    assert (info.min_dimensions, info.max_dimensions) == (32, 64)
    request = embed_service_pb2.EmbedRequest(inputs=["x"], dimensions=dimensions)
    result = invalid(embed(qwen3_server, request), "dimensions")
    assert "32" in result.message and "64" in result.message


@pytest.mark.parametrize("dimensions", [32, 64])
def test_qwen3_dimensions_at_the_mrl_bounds(qwen3_server: InProcessServer, dimensions: int) -> None:
    request = embed_service_pb2.EmbedRequest(inputs=["x", "y"], dimensions=dimensions)
    response = qwen3_server.stubs.embed.Embed(request, timeout=60)
    assert [len(e.float32.values) for e in response.embeddings] == [dimensions] * 2
    assert [e.dimensions for e in response.embeddings] == [dimensions] * 2


def _with_unknown(field: str) -> embed_service_pb2.EmbedRequest:
    request = embed_service_pb2.EmbedRequest(inputs=["x"])
    setattr(request, field, UNKNOWN_ENUM)
    assert getattr(request, field) == UNKNOWN_ENUM  # proto3 enums are open
    return request


@pytest.mark.parametrize("field", ["encoding", "truncation", "input_type", "priority"])
def test_unknown_enum_values(minilm_server: InProcessServer, field: str) -> None:
    result = invalid(embed(minilm_server, _with_unknown(field)), field)
    assert str(UNKNOWN_ENUM) in result.message


@pytest.mark.parametrize("field", ["truncation", "priority"])
def test_unknown_enum_values_on_rerank(minilm_server: InProcessServer, field: str) -> None:
    request = rerank_service_pb2.RerankRequest(query="q", documents=["d"])
    setattr(request, field, UNKNOWN_ENUM)
    invalid(rerank(minilm_server, request), field)


def test_instruction_with_document_input_type(minilm_server: InProcessServer) -> None:
    request = embed_service_pb2.EmbedRequest(
        inputs=["x"], instruction="query: ", input_type=embed_service_pb2.INPUT_TYPE_DOCUMENT
    )
    invalid(embed(minilm_server, request), "instruction")
    # Either alone is fine.
    for ok in (
        embed_service_pb2.EmbedRequest(inputs=["x"], instruction="query: "),
        embed_service_pb2.EmbedRequest(
            inputs=["x"], input_type=embed_service_pb2.INPUT_TYPE_DOCUMENT
        ),
    ):
        assert len(minilm_server.stubs.embed.Embed(ok, timeout=60).embeddings) == 1


@pytest.mark.parametrize("name", ["no-such-model", "ms-marco-tiny"])
def test_unknown_embedding_model(cross_encoder_server: InProcessServer, name: str) -> None:
    # ms-marco-tiny is served, but as a reranker: not an embedding model.
    result = not_found(
        embed(cross_encoder_server, embed_service_pb2.EmbedRequest(model=name, inputs=["x"]))
    )
    assert name in result.message


def test_several_violations_in_one_error(qwen3_server: InProcessServer) -> None:
    request = embed_service_pb2.EmbedRequest(
        inputs=["ok", ""],
        instruction="task",
        input_type=embed_service_pb2.INPUT_TYPE_DOCUMENT,
        dimensions=7,
        encoding=common_pb2.Encoding.ValueType(UNKNOWN_ENUM),
        truncation=common_pb2.TruncationPolicy.ValueType(UNKNOWN_ENUM),
        priority=common_pb2.Priority.ValueType(UNKNOWN_ENUM),
    )
    invalid(
        embed(qwen3_server, request),
        "inputs[1]",
        "instruction",
        "dimensions",
        "encoding",
        "truncation",
        "priority",
    )


# -- Rerank ------------------------------------------------------------------------


def test_empty_query(minilm_server: InProcessServer) -> None:
    invalid(
        rerank(minilm_server, rerank_service_pb2.RerankRequest(query="", documents=["d"])), "query"
    )


def test_empty_documents_list(minilm_server: InProcessServer) -> None:
    invalid(rerank(minilm_server, rerank_service_pb2.RerankRequest(query="q")), "documents")


def test_empty_document_is_named_by_index(minilm_server: InProcessServer) -> None:
    request = rerank_service_pb2.RerankRequest(query="q", documents=["a", "b", ""])
    invalid(rerank(minilm_server, request), "documents[2]")


@pytest.mark.parametrize("top_n", [-1, 0, -(2**31)])
def test_top_n_must_be_positive(minilm_server: InProcessServer, top_n: int) -> None:
    request = rerank_service_pb2.RerankRequest(query="q", documents=["a", "b"], top_n=top_n)
    result = invalid(rerank(minilm_server, request), "top_n")
    assert str(top_n) in result.message


def test_top_n_larger_than_the_documents_returns_all(minilm_server: InProcessServer) -> None:
    request = rerank_service_pb2.RerankRequest(query="q", documents=["a", "b"], top_n=5)
    response = minilm_server.stubs.rerank.Rerank(request, timeout=60)
    assert sorted(r.index for r in response.results) == [0, 1]


def test_several_rerank_violations_in_one_error(cross_encoder_server: InProcessServer) -> None:
    request = rerank_service_pb2.RerankRequest(
        query="", documents=["", "fine"], top_n=0, instruction="task"
    )
    invalid(rerank(cross_encoder_server, request), "query", "documents[0]", "top_n", "instruction")


def test_cross_encoder_takes_no_instruction(cross_encoder_server: InProcessServer) -> None:
    info = model_info(cross_encoder_server, info_service_pb2.MODEL_KIND_RERANKER)
    assert info.rerank_method == info_service_pb2.RERANK_METHOD_CROSS_ENCODER
    request = rerank_service_pb2.RerankRequest(query="q", documents=["d"], instruction="task")
    invalid(rerank(cross_encoder_server, request), "instruction")
    # An empty instruction is still an instruction (the field is set).
    empty = rerank_service_pb2.RerankRequest(query="q", documents=["d"], instruction="")
    invalid(rerank(cross_encoder_server, empty), "instruction")


@pytest.mark.parametrize("server_name", ["minilm_server", "cross_encoder_server", "qwen3_server"])
def test_overlong_query_and_document_are_told_apart(
    request: pytest.FixtureRequest, server_name: str
) -> None:
    server: InProcessServer = request.getfixturevalue(server_name)
    error = common_pb2.TRUNCATION_POLICY_ERROR
    long_query = rerank_service_pb2.RerankRequest(
        query=TOO_LONG, documents=["a document"], truncation=error
    )
    invalid(rerank(server, long_query), "query")
    long_document = rerank_service_pb2.RerankRequest(
        query="a query", documents=["short", TOO_LONG], truncation=error
    )
    invalid(rerank(server, long_document), "documents[1]")


@pytest.mark.parametrize("server_name", ["minilm_server", "cross_encoder_server", "qwen3_server"])
@pytest.mark.parametrize(
    "truncation", [common_pb2.TRUNCATION_POLICY_END, common_pb2.TRUNCATION_POLICY_START]
)
def test_overlong_document_is_truncated_on_request(
    request: pytest.FixtureRequest,
    server_name: str,
    truncation: common_pb2.TruncationPolicy.ValueType,
) -> None:
    server: InProcessServer = request.getfixturevalue(server_name)
    info = model_info(server, info_service_pb2.MODEL_KIND_RERANKER)
    response = server.stubs.rerank.Rerank(
        rerank_service_pb2.RerankRequest(
            query="a query", documents=["short", TOO_LONG], truncation=truncation
        ),
        timeout=60,
    )
    assert response.usage.truncated_inputs == 1
    assert sorted(r.index for r in response.results) == [0, 1]
    if info.rerank_method != info_service_pb2.RERANK_METHOD_EMBEDDING_SIMILARITY:
        # One sequence a pair: the truncated pair fills the model exactly.
        assert response.usage.input_tokens > info.max_input_tokens
        assert response.usage.input_tokens < 2 * info.max_input_tokens
    if info.rerank_method == info_service_pb2.RERANK_METHOD_EMBEDDING_SIMILARITY:
        return  # the query is embedded on its own, so it is truncated like any input
    # A pair model never cuts the query: one too long for the model is an error.
    invalid(
        rerank(
            server,
            rerank_service_pb2.RerankRequest(
                query=TOO_LONG, documents=["short"], truncation=truncation
            ),
        ),
        "query",
    )


@pytest.mark.parametrize("server_name", ["minilm_server", "cross_encoder_server", "qwen3_server"])
def test_unknown_reranker(request: pytest.FixtureRequest, server_name: str) -> None:
    server: InProcessServer = request.getfixturevalue(server_name)
    result = not_found(
        rerank(server, rerank_service_pb2.RerankRequest(model="nope", query="q", documents=["d"]))
    )
    assert "nope" in result.message


def test_validation_runs_before_any_work(minilm_server: InProcessServer) -> None:
    # A bad request is answered even while the engine is held: it never reaches the queue.
    engine = minilm_server.engines[0]
    minilm_server.call(engine.hold)
    try:
        invalid(embed(minilm_server, embed_service_pb2.EmbedRequest(inputs=[""])), "inputs[0]")
        invalid(
            rerank(minilm_server, rerank_service_pb2.RerankRequest(query="q", documents=[""])),
            "documents[0]",
        )
    finally:
        minilm_server.call(engine.release)


ODD_BUT_VALID = [" ", "\n\t ", "\x00", "\u200b", "🚀", "<|endoftext|>", "[SEP] [CLS] [PAD]"]


@pytest.mark.parametrize("server_name", ["minilm_server", "cross_encoder_server", "qwen3_server"])
def test_odd_but_valid_texts_are_served(request: pytest.FixtureRequest, server_name: str) -> None:
    # Non-empty strings are valid however little the tokenizer makes of them (whitespace,
    # control characters, text spelling special tokens): served, never INTERNAL.
    server: InProcessServer = request.getfixturevalue(server_name)
    embedded = server.stubs.embed.Embed(
        embed_service_pb2.EmbedRequest(
            inputs=ODD_BUT_VALID, input_type=embed_service_pb2.INPUT_TYPE_QUERY
        ),
        timeout=60,
    )
    assert len(embedded.embeddings) == len(ODD_BUT_VALID)
    assert np.isfinite(vectors(embedded)).all()
    for text in ODD_BUT_VALID:
        ranked = server.stubs.rerank.Rerank(
            rerank_service_pb2.RerankRequest(query=text, documents=ODD_BUT_VALID), timeout=60
        )
        assert sorted(r.index for r in ranked.results) == list(range(len(ODD_BUT_VALID)))
        assert all(np.isfinite(r.score) for r in ranked.results)

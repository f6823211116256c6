"""Every output encoding round-trips against the float32 vectors of the same request;
normalization, MRL dimensions and the response metadata (model, usage, timing)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TypeAlias

import numpy as np
import pytest
from harness import InProcessServer
from transformers import AutoTokenizer

from embedserve.v1 import common_pb2, embed_service_pb2, info_service_pb2

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "hi",
    "Embedding services turn text into vectors that retrieval systems can search.",
    "Ünïcödé, emoji 🚀 and CJK 漢字 survive tokenization.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 2024 3.14",
]

Encoding: TypeAlias = common_pb2.Encoding.ValueType


@dataclass(frozen=True)
class Case:
    server: str  # the fixture name
    dimensions: int | None
    normalize: bool | None

    def __str__(self) -> str:
        return f"{self.server}-dims{self.dimensions}-normalize{self.normalize}"


CASES = [
    Case("minilm_server", None, None),
    Case("minilm_server", None, False),
    Case("qwen3_server", None, None),
    Case("qwen3_server", 40, None),  # 40 bits: a partial last byte in the binary form
    Case("qwen3_server", 33, False),
    Case("qwen3_server", 32, True),
]


def get_server(request: pytest.FixtureRequest, name: str) -> InProcessServer:
    server: InProcessServer = request.getfixturevalue(name)
    return server


def call(
    server: InProcessServer,
    encoding: Encoding,
    *,
    texts: list[str] | None = None,
    dimensions: int | None = None,
    normalize: bool | None = None,
    instruction: str | None = None,
    model: str = "",
) -> embed_service_pb2.EmbedResponse:
    request = embed_service_pb2.EmbedRequest(
        model=model, inputs=TEXTS if texts is None else texts, encoding=encoding
    )
    if dimensions is not None:
        request.dimensions = dimensions
    if normalize is not None:
        request.normalize = normalize
    if instruction is not None:
        request.instruction = instruction
    response = server.stubs.embed.Embed(request, timeout=60)
    assert len(response.embeddings) == len(request.inputs)
    return response


def float32_reference(
    server: InProcessServer, case: Case, texts: list[str] | None = None
) -> np.ndarray:
    response = call(
        server,
        common_pb2.ENCODING_FLOAT32,
        texts=texts,
        dimensions=case.dimensions,
        normalize=case.normalize,
    )
    rows = []
    for embedding in response.embeddings:
        assert embedding.WhichOneof("vector") == "float32"
        rows.append(np.array(embedding.float32.values, dtype=np.float32))
    return np.stack(rows)


def full_dimensions(server: InProcessServer) -> int:
    info = server.stubs.info.GetServerInfo(info_service_pb2.GetServerInfoRequest(), timeout=30)
    for model in info.models:
        if model.kind == info_service_pb2.MODEL_KIND_EMBEDDING and model.is_default:
            return int(model.embedding_dimensions)
    raise AssertionError("no default embedding model")


@pytest.mark.parametrize("case", CASES, ids=str)
def test_float32_forms_agree(request: pytest.FixtureRequest, case: Case) -> None:
    server = get_server(request, case.server)
    reference = float32_reference(server, case)
    dims = case.dimensions if case.dimensions is not None else full_dimensions(server)
    assert reference.shape == (len(TEXTS), dims)
    unspecified = call(
        server,
        common_pb2.ENCODING_UNSPECIFIED,
        dimensions=case.dimensions,
        normalize=case.normalize,
    )
    as_bytes = call(
        server,
        common_pb2.ENCODING_FLOAT32_BYTES,
        dimensions=case.dimensions,
        normalize=case.normalize,
    )
    for row, default, packed in zip(
        reference, unspecified.embeddings, as_bytes.embeddings, strict=True
    ):
        assert default.WhichOneof("vector") == "float32"
        assert default.dimensions == dims
        np.testing.assert_array_equal(np.array(default.float32.values, dtype=np.float32), row)
        assert packed.WhichOneof("vector") == "float32_bytes"
        assert packed.dimensions == dims
        assert len(packed.float32_bytes) == 4 * dims
        decoded = np.frombuffer(packed.float32_bytes, dtype="<f4")
        np.testing.assert_array_equal(decoded, row)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_int8_round_trip(request: pytest.FixtureRequest, case: Case) -> None:
    server = get_server(request, case.server)
    reference = float32_reference(server, case)
    dims = reference.shape[1]
    response = call(
        server, common_pb2.ENCODING_INT8, dimensions=case.dimensions, normalize=case.normalize
    )
    for row, embedding in zip(reference, response.embeddings, strict=True):
        assert embedding.WhichOneof("vector") == "int8"
        assert embedding.dimensions == dims
        values = np.frombuffer(embedding.int8.values, dtype=np.int8).astype(np.int32)
        assert values.shape == (dims,)
        assert values.min() >= -127 and values.max() <= 127
        scale = embedding.int8.scale
        # Symmetric quantization: scale = max |v| / 127, so the peak maps to +-127.
        assert scale == pytest.approx(float(np.abs(row).max()) / 127.0, rel=1e-6)
        assert int(np.abs(values).max()) == 127
        error = np.abs(values * np.float64(scale) - row.astype(np.float64))
        assert error.max() <= scale / 2 + 1e-6
        # The sign survives quantization wherever the value is not rounded to zero.
        nonzero = values != 0
        np.testing.assert_array_equal(np.sign(values[nonzero]), np.sign(row[nonzero]))


@pytest.mark.parametrize("case", CASES, ids=str)
def test_binary_round_trip(request: pytest.FixtureRequest, case: Case) -> None:
    server = get_server(request, case.server)
    reference = float32_reference(server, case)
    dims = reference.shape[1]
    response = call(
        server, common_pb2.ENCODING_BINARY, dimensions=case.dimensions, normalize=case.normalize
    )
    for row, embedding in zip(reference, response.embeddings, strict=True):
        assert embedding.WhichOneof("vector") == "binary"
        assert embedding.dimensions == dims
        assert len(embedding.binary) == math.ceil(dims / 8)
        bits = np.unpackbits(np.frombuffer(embedding.binary, dtype=np.uint8))
        np.testing.assert_array_equal(bits[:dims].astype(bool), row > 0)
        assert not bits[dims:].any(), "the padding bits of the last byte must be zero"
        # Most significant bit first: bit i of the vector is bit 7 - i % 8 of byte i // 8.
        first = embedding.binary[0]
        assert bool(first & 0x80) == bool(row[0] > 0)


def test_binary_with_a_partial_last_byte(qwen3_server: InProcessServer) -> None:
    case = Case("qwen3_server", 40 + 3, None)
    reference = float32_reference(qwen3_server, case)
    response = call(qwen3_server, common_pb2.ENCODING_BINARY, dimensions=43)
    for row, embedding in zip(reference, response.embeddings, strict=True):
        assert embedding.dimensions == 43 and len(embedding.binary) == 6
        last = embedding.binary[5]
        expected = sum(1 << (7 - i) for i in range(3) if row[40 + i] > 0)
        assert last == expected


@pytest.mark.parametrize("server_name", ["minilm_server", "qwen3_server"])
@pytest.mark.parametrize("encoding", common_pb2.Encoding.values(), ids=common_pb2.Encoding.Name)
def test_dimensions_field_matches_every_encoding(
    request: pytest.FixtureRequest, server_name: str, encoding: Encoding
) -> None:
    server = get_server(request, server_name)
    full = full_dimensions(server)
    choices: list[int | None] = [None, full]
    if server_name == "qwen3_server":
        choices += [32, 40, 57]
    for dimensions in choices:
        response = call(server, encoding, dimensions=dimensions)
        expected = full if dimensions is None else dimensions
        for embedding in response.embeddings:
            assert embedding.dimensions == expected
            kind = embedding.WhichOneof("vector")
            if kind == "float32":
                assert len(embedding.float32.values) == expected
            elif kind == "float32_bytes":
                assert len(embedding.float32_bytes) == 4 * expected
            elif kind == "int8":
                assert len(embedding.int8.values) == expected
            else:
                assert kind == "binary"
                assert len(embedding.binary) == math.ceil(expected / 8)


# -- normalization -----------------------------------------------------------------


@pytest.mark.parametrize("server_name", ["minilm_server", "qwen3_server"])
def test_normalize_defaults_to_unit_vectors(
    request: pytest.FixtureRequest, server_name: str
) -> None:
    server = get_server(request, server_name)
    unset = float32_reference(server, Case(server_name, None, None))
    explicit = float32_reference(server, Case(server_name, None, True))
    np.testing.assert_allclose(np.linalg.norm(unset, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(unset, explicit)


@pytest.mark.parametrize(
    ("server_name", "dimensions"),
    [("minilm_server", None), ("qwen3_server", None), ("qwen3_server", 40)],
)
def test_normalize_false_returns_the_raw_vectors(
    request: pytest.FixtureRequest, server_name: str, dimensions: int | None
) -> None:
    server = get_server(request, server_name)
    normalized = float32_reference(server, Case(server_name, dimensions, None))
    raw = float32_reference(server, Case(server_name, dimensions, False))
    norms = np.linalg.norm(raw, axis=1, keepdims=True)
    # Pooled model outputs are not unit vectors in general.
    assert np.abs(norms - 1.0).max() > 1e-2
    np.testing.assert_allclose(normalized * norms, raw, rtol=1e-5, atol=1e-5)


def test_mrl_without_normalization_is_a_prefix(qwen3_server: InProcessServer) -> None:
    full = float32_reference(qwen3_server, Case("qwen3_server", None, False))
    for dimensions in (32, 40, 63):
        cut = float32_reference(qwen3_server, Case("qwen3_server", dimensions, False))
        np.testing.assert_allclose(cut, full[:, :dimensions], atol=1e-6)


# -- response metadata -------------------------------------------------------------


def default_embedding_model(server: InProcessServer) -> str:
    info = server.stubs.info.GetServerInfo(info_service_pb2.GetServerInfoRequest(), timeout=30)
    names = [
        m.name
        for m in info.models
        if m.kind == info_service_pb2.MODEL_KIND_EMBEDDING and m.is_default
    ]
    assert len(names) == 1
    return str(names[0])


@pytest.mark.parametrize(
    ("server_name", "name"),
    [("minilm_server", "all-MiniLM-L6-v2"), ("qwen3_server", "qwen3-embedding-tiny")],
)
def test_response_names_the_model(
    request: pytest.FixtureRequest, server_name: str, name: str
) -> None:
    server = get_server(request, server_name)
    assert default_embedding_model(server) == name
    assert call(server, common_pb2.ENCODING_FLOAT32).model == name
    assert call(server, common_pb2.ENCODING_FLOAT32, model=name).model == name


def test_usage_counts_tokens_like_the_tokenizer(
    minilm_server: InProcessServer, minilm_folder: Path
) -> None:
    tokenizer = AutoTokenizer.from_pretrained(str(minilm_folder), local_files_only=True)
    expected = [len(tokenizer(text)["input_ids"]) for text in TEXTS]
    together = call(minilm_server, common_pb2.ENCODING_FLOAT32)
    assert together.usage.inputs == len(TEXTS)
    assert together.usage.truncated_inputs == 0
    assert together.usage.input_tokens == sum(expected) > 0
    separately = [call(minilm_server, common_pb2.ENCODING_FLOAT32, texts=[t]) for t in TEXTS]
    assert [r.usage.input_tokens for r in separately] == expected
    assert all(r.usage.inputs == 1 for r in separately)


def test_usage_counts_the_query_template(
    qwen3_server: InProcessServer, qwen3_embedding_folder: Path
) -> None:
    tokenizer = AutoTokenizer.from_pretrained(str(qwen3_embedding_folder), local_files_only=True)
    task = "Given a question, retrieve passages that answer it"
    documents = call(qwen3_server, common_pb2.ENCODING_BINARY)
    queries = call(qwen3_server, common_pb2.ENCODING_BINARY, instruction=task)
    plain = [len(tokenizer(text)["input_ids"]) for text in TEXTS]
    templated = [len(tokenizer(f"Instruct: {task}\nQuery:{text}")["input_ids"]) for text in TEXTS]
    assert documents.usage.input_tokens == sum(plain) > 0
    assert queries.usage.input_tokens == sum(templated) > documents.usage.input_tokens
    separately = sum(
        call(qwen3_server, common_pb2.ENCODING_INT8, texts=[t], instruction=task).usage.input_tokens
        for t in TEXTS
    )
    assert separately == queries.usage.input_tokens


@pytest.mark.parametrize("server_name", ["minilm_server", "qwen3_server"])
@pytest.mark.parametrize(
    "encoding",
    [common_pb2.ENCODING_FLOAT32, common_pb2.ENCODING_FLOAT32_BYTES],
    ids=common_pb2.Encoding.Name,
)
def test_timing_fields_are_present_and_consistent(
    request: pytest.FixtureRequest, server_name: str, encoding: Encoding
) -> None:
    server = get_server(request, server_name)
    timing = call(server, encoding).timing
    for name in ("tokenization", "queue", "inference", "total"):
        assert timing.HasField(name), f"timing.{name} is missing"
    nanos = {
        "tokenization": timing.tokenization.ToNanoseconds(),
        "queue": timing.queue.ToNanoseconds(),
        "inference": timing.inference.ToNanoseconds(),
        "total": timing.total.ToNanoseconds(),
    }
    assert all(value >= 0 for value in nanos.values()), nanos
    assert nanos["total"] >= nanos["inference"], nanos
    assert nanos["total"] >= nanos["tokenization"], nanos

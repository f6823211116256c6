"""What the client returns: numpy arrays plus the server's usage and timing."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from embedserve.v1 import common_pb2, embed_service_pb2, info_service_pb2, rerank_service_pb2


@dataclass(frozen=True)
class Usage:
    input_tokens: int
    inputs: int
    truncated_inputs: int
    # Inputs the server answered from its embedding cache (0 when it has none).
    cached_inputs: int = 0

    @classmethod
    def from_proto(cls, usage: common_pb2.Usage) -> Usage:
        return cls(usage.input_tokens, usage.inputs, usage.truncated_inputs, usage.cached_inputs)


@dataclass(frozen=True)
class Timing:
    """Server-side seconds."""

    tokenization: float
    queue: float
    inference: float
    total: float

    @classmethod
    def from_proto(cls, timing: common_pb2.Timing) -> Timing:
        return cls(
            timing.tokenization.ToNanoseconds() / 1e9,
            timing.queue.ToNanoseconds() / 1e9,
            timing.inference.ToNanoseconds() / 1e9,
            timing.total.ToNanoseconds() / 1e9,
        )


@dataclass(frozen=True)
class Embeddings:
    """One row an input.

    ``vectors`` is float32 (n, d) for the float encodings; int8 (n, d) for
    ENCODING_INT8 with ``scales`` (n,) so that ``vectors * scales[:, None]`` recovers the
    floats; packed uint8 (n, ceil(d / 8)) for ENCODING_BINARY, most significant bit first.
    """

    vectors: np.ndarray
    dimensions: int
    model: str
    usage: Usage
    timing: Timing
    scales: np.ndarray | None = None


@dataclass(frozen=True)
class RankedDocument:
    index: int
    score: float
    document: str | None


@dataclass(frozen=True)
class Ranking:
    results: list[RankedDocument]
    model: str
    usage: Usage
    timing: Timing


def decode_embeddings(response: embed_service_pb2.EmbedResponse) -> Embeddings:
    items = response.embeddings
    dims = items[0].dimensions if items else 0
    scales: np.ndarray | None = None
    vectors: np.ndarray
    kind = items[0].WhichOneof("vector") if items else "float32_bytes"
    if kind == "float32_bytes":
        blob = b"".join(e.float32_bytes for e in items)
        vectors = np.frombuffer(blob, dtype="<f4").astype(np.float32).reshape(len(items), dims)
    elif kind == "int8":
        blob = b"".join(e.int8.values for e in items)
        vectors = np.frombuffer(blob, dtype=np.int8).reshape(len(items), dims).copy()
        scales = np.array([e.int8.scale for e in items], dtype=np.float32)
    elif kind == "binary":
        blob = b"".join(e.binary for e in items)
        vectors = np.frombuffer(blob, dtype=np.uint8).reshape(len(items), -1).copy()
    else:
        vectors = np.array([list(e.float32.values) for e in items], dtype=np.float32)
        vectors = vectors.reshape(len(items), dims)
    return Embeddings(
        vectors=vectors,
        dimensions=dims,
        model=response.model,
        usage=Usage.from_proto(response.usage),
        timing=Timing.from_proto(response.timing),
        scales=scales,
    )


def decode_ranking(response: rerank_service_pb2.RerankResponse) -> Ranking:
    return Ranking(
        results=[
            RankedDocument(r.index, r.score, r.document if r.HasField("document") else None)
            for r in response.results
        ],
        model=response.model,
        usage=Usage.from_proto(response.usage),
        timing=Timing.from_proto(response.timing),
    )


ServerInfo = info_service_pb2.GetServerInfoResponse

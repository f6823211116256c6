"""Matryoshka truncation, normalization and the per-request output encodings."""

from __future__ import annotations

import numpy as np

from embedserve.v1 import common_pb2

_LITTLE_ENDIAN_F32 = np.dtype("<f4")


def finish_vectors(raw: np.ndarray, dimensions: int | None, normalize: bool) -> np.ndarray:
    """Truncate to the first ``dimensions`` components, THEN L2-normalize (MRL order)."""
    vectors = raw[:, :dimensions] if dimensions is not None else raw
    if normalize:
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        vectors = vectors / np.maximum(norms, 1e-12)
    return np.ascontiguousarray(vectors, dtype=np.float32)


def encode_vectors(vectors: np.ndarray, encoding: int) -> list[common_pb2.Embedding]:
    dims = int(vectors.shape[1])
    if encoding == common_pb2.ENCODING_FLOAT32_BYTES:
        data = vectors.astype(_LITTLE_ENDIAN_F32, copy=False)
        return [common_pb2.Embedding(float32_bytes=row.tobytes(), dimensions=dims) for row in data]
    if encoding == common_pb2.ENCODING_INT8:
        peak = np.abs(vectors).max(axis=1)
        scales = np.where(peak > 0, peak / 127.0, 1.0).astype(np.float32)
        quantized = np.clip(np.rint(vectors / scales[:, None]), -127, 127).astype(np.int8)
        return [
            common_pb2.Embedding(
                int8=common_pb2.Int8Vector(values=q.tobytes(), scale=float(s)), dimensions=dims
            )
            for q, s in zip(quantized, scales, strict=True)
        ]
    if encoding == common_pb2.ENCODING_BINARY:
        packed = np.packbits(vectors > 0, axis=1)
        return [common_pb2.Embedding(binary=row.tobytes(), dimensions=dims) for row in packed]
    return [
        common_pb2.Embedding(float32=common_pb2.FloatVector(values=row.tolist()), dimensions=dims)
        for row in vectors
    ]

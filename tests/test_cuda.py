"""The CUDA path (half precision, SDPA, pinned copies). Skipped cleanly without a GPU."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from harness import serving
from support.qwen3 import reference_qwen3_embed, reference_qwen3_rerank

from embedserve.v1 import common_pb2, embed_service_pb2, info_service_pb2, rerank_service_pb2

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

TEXTS = ["a short text", "a somewhat longer text about retrieval and ranking of passages", "x"]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_on_cuda_matches_float32_reference(
    dtype: str, qwen3_embedding_folder: Path, qwen3_reranker_folder: Path
) -> None:
    with serving(
        model=qwen3_embedding_folder,
        reranker=qwen3_reranker_folder,
        device="cuda",
        dtype=dtype,
    ) as server:
        info = server.stubs.info.GetServerInfo(info_service_pb2.GetServerInfoRequest())
        assert all(m.device.startswith("cuda") and m.dtype == dtype for m in info.models)
        reply = server.stubs.embed.Embed(
            embed_service_pb2.EmbedRequest(inputs=TEXTS, encoding=common_pb2.ENCODING_FLOAT32_BYTES)
        )
        served = np.stack([np.frombuffer(e.float32_bytes, "<f4") for e in reply.embeddings])
        expected = reference_qwen3_embed(qwen3_embedding_folder, TEXTS)
        cosine = np.sum(served * expected, axis=1)
        assert np.all(cosine > 0.99)
        ranked = server.stubs.rerank.Rerank(
            rerank_service_pb2.RerankRequest(query="ranking", documents=TEXTS)
        )
        scores = np.zeros(len(TEXTS))
        for result in ranked.results:
            scores[result.index] = result.score
        np.testing.assert_allclose(
            scores, reference_qwen3_rerank(qwen3_reranker_folder, "ranking", TEXTS), atol=2e-2
        )

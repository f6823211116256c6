"""The CUDA path (half precision, SDPA, pinned copies). Skipped cleanly without a GPU."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from harness import serving
from support.bert import reference_bert_embed, right_padded, tiny_bert
from support.qwen3 import reference_qwen3_embed, reference_qwen3_rerank
from test_model_recipes import embed, rerank_scores

from embedserve.service.models.packed_bert import PackedBertEncoder
from embedserve.v1 import info_service_pb2

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
        served = embed(server, TEXTS)
        expected = reference_qwen3_embed(qwen3_embedding_folder, TEXTS)
        cosine = np.sum(served * expected, axis=1)
        assert np.all(cosine > 0.99)
        scores = rerank_scores(server, "ranking", TEXTS)
        np.testing.assert_allclose(
            scores, reference_qwen3_rerank(qwen3_reranker_folder, "ranking", TEXTS), atol=2e-2
        )


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_padding_free_bert_on_cuda_matches_sentence_transformers(
    dtype: str, bert_embedder_folder: Path
) -> None:
    texts = [*TEXTS, " ".join(["retrieval"] * 300)]  # the last one is truncated to 256
    with serving(model=bert_embedder_folder, device="cuda", dtype=dtype) as server:
        info = server.stubs.info.GetServerInfo(info_service_pb2.GetServerInfoRequest())
        (embedder,) = [m for m in info.models if m.kind == info_service_pb2.MODEL_KIND_EMBEDDING]
        assert embedder.padding_free and embedder.device.startswith("cuda")
        served = embed(server, texts)
    expected = reference_bert_embed(bert_embedder_folder, texts).numpy()
    assert np.all(np.sum(served * expected, axis=1) > 0.99)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_packed_bert_encoder_on_cuda_matches_the_padded_model(dtype: torch.dtype) -> None:
    model = tiny_bert(seed=0, vocab_size=500, hidden_size=128, max_position_embeddings=128)
    model = model.to("cuda", dtype)
    ids, mask = right_padded([3, 100, 17, 1, 64], model.config.vocab_size, seed=0)
    ids, mask = ids.cuda(), mask.cuda()
    with torch.inference_mode():
        padded = model(input_ids=ids, attention_mask=mask).last_hidden_state[mask.bool()]
        packed = PackedBertEncoder(model)(ids, mask).hidden
    assert packed.dtype == dtype and torch.isfinite(packed).all()
    error = (packed.float() - padded.float()).norm() / padded.float().norm()
    assert error < 2e-2


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_a_batch_of_unequal_lengths_on_cuda_equals_each_text_alone(
    dtype: str, qwen3_embedding_folder: Path
) -> None:
    """Padding in half precision (SDPA masks, the last-token gather): a short text batched
    beside long ones must embed as it does alone."""
    texts = [" ".join(["ranking"] * n) for n in (1, 2, 5, 40, 3, 200, 7, 90)]
    with serving(model=qwen3_embedding_folder, device="cuda", dtype=dtype) as server:
        together = embed(server, texts)
        alone = np.concatenate([embed(server, [text]) for text in texts])
    assert np.all(np.isfinite(together))
    assert np.all(np.sum(together * alone, axis=1) > 0.995)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_cuda_graphs_serve_what_the_eager_forward_serves(
    dtype: str, qwen3_embedding_folder: Path, qwen3_reranker_folder: Path
) -> None:
    texts = [" ".join(["ranking"] * n) for n in (1, 2, 5, 40, 3, 200, 7, 90)]
    served: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for tokens in (0, 8192):
        with serving(
            model=qwen3_embedding_folder,
            reranker=qwen3_reranker_folder,
            device="cuda",
            dtype=dtype,
            cuda_graph_tokens=tokens,
        ) as server:
            # One call of every text, then each text alone: two shapes of batch.
            calls = [texts, *([text] for text in texts)]
            vectors = np.concatenate([embed(server, inputs) for inputs in calls])
            scores = rerank_scores(server, "ranking", texts)
            replays = sum(engine.cuda_graph_replays for engine in server.registry.engines())
            assert (replays > 0) == bool(tokens)
            served[tokens] = (vectors, scores)
    eager, graphed = served[0], served[8192]
    assert np.all(np.isfinite(graphed[0]))
    assert np.all(np.sum(eager[0] * graphed[0], axis=1) > 0.999)
    np.testing.assert_allclose(graphed[1], eager[1], atol=1e-2)
    expected = reference_qwen3_embed(qwen3_embedding_folder, texts)
    assert np.all(np.sum(graphed[0][: len(texts)] * expected, axis=1) > 0.99)

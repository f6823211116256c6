"""Served vectors and scores equal the reference computations of each model's recipe."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from harness import InProcessServer, bytes_vectors, serving
from support.qwen3 import (
    DEFAULT_INSTRUCTION,
    reference_cross_encoder,
    reference_qwen3_embed,
    reference_qwen3_rerank,
)

from embedserve.v1 import common_pb2, embed_service_pb2, rerank_service_pb2

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "hi",
    "Embedding services turn text into vectors that retrieval systems can search quickly, "
    "and rerankers order the candidates a first stage found.",
    "Ünïcödé, emoji 🚀 and CJK 漢字 survive tokenization.",
]
DOCUMENTS = [
    "A passage about search engines and how they answer a query.",
    "yes",
    "Cooking pasta takes about ten minutes in boiling salted water.",
    "Document retrieval ranks passages by relevance to the query.",
    "no",
]


def embed(server: InProcessServer, texts: list[str], **options: Any) -> np.ndarray:
    request = embed_service_pb2.EmbedRequest(
        inputs=texts, encoding=common_pb2.ENCODING_FLOAT32_BYTES, **options
    )
    response = server.stubs.embed.Embed(request, timeout=60)
    assert len(response.embeddings) == len(texts)
    return bytes_vectors(response)


def rerank_scores(
    server: InProcessServer, query: str, docs: list[str], **options: Any
) -> np.ndarray:
    response = server.stubs.rerank.Rerank(
        rerank_service_pb2.RerankRequest(query=query, documents=docs, **options), timeout=60
    )
    scores = np.zeros(len(docs), dtype=np.float32)
    for result in response.results:
        scores[result.index] = result.score
    return scores


def test_minilm_matches_sentence_transformers(
    minilm_server: InProcessServer, minilm_folder: Path
) -> None:
    from sentence_transformers import SentenceTransformer

    reference = SentenceTransformer(str(minilm_folder), device="cpu")
    long_text = " ".join(["retrieval"] * 400)  # over the 256-token limit: truncated at the end
    texts = [*TEXTS, long_text]
    expected = reference.encode(texts, convert_to_numpy=True, normalize_embeddings=True)
    served = embed(minilm_server, texts)
    np.testing.assert_allclose(served, expected, atol=1e-5)


def test_bfloat16_on_the_cpu_serves_the_same_directions(minilm_server: InProcessServer) -> None:
    # The measured CPU lever (--dtype bfloat16, faster with AMX): vectors stay unit length
    # and within a cosine of 0.999 of float32's, and the server says which precision it runs.
    from embedserve.v1 import info_service_pb2

    with serving(dtype="bfloat16") as bf16_server:
        info = bf16_server.stubs.info.GetServerInfo(info_service_pb2.GetServerInfoRequest())
        halved = embed(bf16_server, TEXTS)
    assert {model.dtype for model in info.models} == {"bfloat16"}
    exact = embed(minilm_server, TEXTS)
    np.testing.assert_allclose(np.linalg.norm(halved, axis=1), 1.0, atol=1e-5)
    cosines = (halved * exact).sum(axis=1)
    print("bfloat16 vs float32 cosines:", cosines)
    assert cosines.min() > 0.999
    assert not np.array_equal(halved, exact)  # it did run in the other precision


def test_minilm_instruction_is_a_prompt_prefix(
    minilm_server: InProcessServer, minilm_folder: Path
) -> None:
    from sentence_transformers import SentenceTransformer

    reference = SentenceTransformer(str(minilm_folder), device="cpu")
    prompt = "query: "
    expected = reference.encode(TEXTS[:2], prompt=prompt, normalize_embeddings=True)
    np.testing.assert_allclose(
        embed(minilm_server, TEXTS[:2], instruction=prompt), expected, atol=1e-5
    )


def test_qwen3_embedding_matches_official_recipe(
    qwen3_server: InProcessServer, qwen3_embedding_folder: Path
) -> None:
    documents = embed(qwen3_server, TEXTS)
    np.testing.assert_allclose(
        documents, reference_qwen3_embed(qwen3_embedding_folder, TEXTS), atol=1e-5
    )
    task = "Given a question, retrieve passages that answer it"
    queries = embed(qwen3_server, TEXTS, instruction=task)
    np.testing.assert_allclose(
        queries, reference_qwen3_embed(qwen3_embedding_folder, TEXTS, instruction=task), atol=1e-5
    )
    assert not np.allclose(queries, documents, atol=1e-3)


def test_qwen3_query_input_type_uses_the_default_instruction(
    qwen3_server: InProcessServer, qwen3_embedding_folder: Path
) -> None:
    served = embed(qwen3_server, TEXTS[:2], input_type=embed_service_pb2.INPUT_TYPE_QUERY)
    expected = reference_qwen3_embed(
        qwen3_embedding_folder, TEXTS[:2], instruction=DEFAULT_INSTRUCTION
    )
    np.testing.assert_allclose(served, expected, atol=1e-5)


def test_qwen3_embedding_is_batch_invariant(qwen3_server: InProcessServer) -> None:
    batch = embed(qwen3_server, TEXTS)
    for index, text in enumerate(TEXTS):
        alone = embed(qwen3_server, [text])
        np.testing.assert_allclose(alone[0], batch[index], atol=1e-5)


def test_qwen3_reranker_matches_official_recipe(
    qwen3_server: InProcessServer, qwen3_reranker_folder: Path
) -> None:
    query = "how do search engines rank passages"
    served = rerank_scores(qwen3_server, query, DOCUMENTS)
    expected = reference_qwen3_rerank(qwen3_reranker_folder, query, DOCUMENTS)
    np.testing.assert_allclose(served, expected, atol=1e-5)
    assert np.ptp(served) > 0.01  # a bug reading one logit twice would make all scores 0.5
    task = "Find recipes"
    np.testing.assert_allclose(
        rerank_scores(qwen3_server, query, DOCUMENTS, instruction=task),
        reference_qwen3_rerank(qwen3_reranker_folder, query, DOCUMENTS, instruction=task),
        atol=1e-5,
    )


def test_qwen3_reranker_is_batch_invariant(qwen3_server: InProcessServer) -> None:
    query = "passages about retrieval"
    together = rerank_scores(qwen3_server, query, DOCUMENTS)
    for index, document in enumerate(DOCUMENTS):
        alone = rerank_scores(qwen3_server, query, [document])
        np.testing.assert_allclose(alone[0], together[index], atol=1e-5)


def test_rerank_results_are_sorted_with_original_indices(qwen3_server: InProcessServer) -> None:
    query = "search"
    response = qwen3_server.stubs.rerank.Rerank(
        rerank_service_pb2.RerankRequest(query=query, documents=DOCUMENTS, return_documents=True)
    )
    scores = [r.score for r in response.results]
    assert scores == sorted(scores, reverse=True)
    assert sorted(r.index for r in response.results) == list(range(len(DOCUMENTS)))
    assert all(r.document == DOCUMENTS[r.index] for r in response.results)
    top = qwen3_server.stubs.rerank.Rerank(
        rerank_service_pb2.RerankRequest(query=query, documents=DOCUMENTS, top_n=2)
    )
    assert [r.index for r in top.results] == [r.index for r in response.results[:2]]
    assert all(not r.HasField("document") for r in top.results)
    assert response.model == "qwen3-reranker-tiny"
    assert response.usage.inputs == len(DOCUMENTS) and response.usage.input_tokens > 0


def test_cross_encoder_matches_transformers(
    cross_encoder_server: InProcessServer, cross_encoder_folder: Path
) -> None:
    query = "what is retrieval"
    served = rerank_scores(cross_encoder_server, query, DOCUMENTS)
    logits = reference_cross_encoder(cross_encoder_folder, query, DOCUMENTS)
    np.testing.assert_allclose(served, 1 / (1 + np.exp(-logits)), atol=1e-5)


def test_similarity_rerank_without_a_reranker(minilm_server: InProcessServer) -> None:
    query = "Which animal is a small feline?"
    docs = [
        "Stock markets fell sharply today.",
        "A cat is a small domesticated feline.",
        "It rained.",
    ]
    query_vector = embed(minilm_server, [query], instruction="")
    doc_vectors = embed(minilm_server, docs)
    served = rerank_scores(minilm_server, query, docs)
    np.testing.assert_allclose(served, doc_vectors @ query_vector[0], atol=1e-5)
    assert int(np.argmax(served)) == 1


@pytest.mark.parametrize("dimensions", [32, 48, 64])
def test_mrl_truncates_then_normalizes(qwen3_server: InProcessServer, dimensions: int) -> None:
    raw = embed(qwen3_server, TEXTS, normalize=False)
    served = embed(qwen3_server, TEXTS, dimensions=dimensions)
    assert served.shape == (len(TEXTS), dimensions)
    np.testing.assert_allclose(np.linalg.norm(served, axis=1), 1.0, atol=1e-5)
    truncated = raw[:, :dimensions]
    expected = truncated / np.linalg.norm(truncated, axis=1, keepdims=True)
    np.testing.assert_allclose(served, expected, atol=1e-5)

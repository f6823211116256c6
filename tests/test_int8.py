"""--dtype int8 on the CPU: int8 linear layers, a scale per input row, end to end."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from harness import InProcessServer, serving
from support.qwen3 import reference_qwen3_embed, reference_qwen3_rerank
from test_model_recipes import embed, rerank_scores
from torch import nn

from embedserve.service.models.base import ModelLoadError
from embedserve.service.models.loading import resolve_device
from embedserve.service.models.quantization import Int8Linear, quantize_linears
from embedserve.v1 import info_service_pb2

TEXTS = [
    "a short text",
    "a somewhat longer text about retrieval and the ranking of passages for a query",
    "x",
]


def test_an_int8_linear_is_near_float_and_each_row_is_its_own() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(96, 40)
    quantized = Int8Linear(linear)
    rows = torch.randn(7, 96)
    rows[3] *= 50  # an outlier row must not coarsen the others
    with torch.inference_mode():
        expected = linear(rows)
        together = quantized(rows)
        alone = torch.cat([quantized(row[None]) for row in rows])
        batched_3d = quantized(rows.reshape(7, 1, 96)).reshape(7, 40)
    cosine = nn.functional.cosine_similarity(together, expected, dim=1)
    assert cosine.min() > 0.999
    # The integer product is exact and the rescaling per element: no row depends on another.
    assert torch.equal(alone, together) and torch.equal(batched_3d, together)
    assert quantized.weight_t.dtype == torch.int8 and quantized.weight_t.shape == (96, 40)


def test_a_layer_shared_by_two_parents_is_converted_once() -> None:
    shared = nn.Linear(8, 8)
    first, second = nn.Sequential(shared, nn.ReLU()), nn.Sequential(nn.Linear(8, 4), shared)
    assert quantize_linears(first, second) == 2
    assert isinstance(first[0], Int8Linear) and first[0] is second[1]
    assert isinstance(second[0], Int8Linear) and isinstance(first[1], nn.ReLU)


def test_int8_is_for_the_cpu_only(monkeypatch: pytest.MonkeyPatch) -> None:
    device = resolve_device("cpu", "int8")
    assert device.int8_linears and device.dtype == torch.float32 and device.dtype_name == "int8"
    assert not resolve_device("cpu", "float32").int8_linears
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(ModelLoadError, match="int8 runs on the CPU only"):
        resolve_device("cuda", "int8")


@pytest.fixture(scope="module")
def minilm_int8() -> Iterator[InProcessServer]:
    with serving(dtype="int8") as server:
        yield server


def test_minilm_in_int8_serves_vectors_near_float32(
    minilm_int8: InProcessServer, minilm_server: InProcessServer
) -> None:
    info = minilm_int8.stubs.info.GetServerInfo(info_service_pb2.GetServerInfoRequest())
    assert [m.dtype for m in info.models] == ["int8"] * len(info.models)
    served = embed(minilm_int8, TEXTS)
    exact = embed(minilm_server, TEXTS)
    cosine = np.sum(served * exact, axis=1)
    assert np.all(cosine > 0.98) and not np.array_equal(served, exact)
    # A text's vector does not depend on the texts batched with it.
    alone = np.concatenate([embed(minilm_int8, [text]) for text in TEXTS])
    np.testing.assert_array_equal(alone, served)


def test_qwen3_in_int8_stays_near_the_float_reference(
    qwen3_embedding_folder: Path, qwen3_reranker_folder: Path
) -> None:
    with serving(
        model=qwen3_embedding_folder,
        reranker=qwen3_reranker_folder,
        dtype="int8",
        warmup=False,
    ) as server:
        cosine = np.sum(
            embed(server, TEXTS) * reference_qwen3_embed(qwen3_embedding_folder, TEXTS), axis=1
        )
        assert np.all(cosine > 0.98)
        documents = [*TEXTS, "ranking documents for a query", "the weather", "a b c d e f"]
        served = rerank_scores(server, "ranking", documents)
    expected = reference_qwen3_rerank(qwen3_reranker_folder, "ranking", documents)
    # A random tiny reranker's yes/no logit moves by up to about 0.2 in int8; the order holds.
    np.testing.assert_allclose(served, expected, atol=0.1)
    assert list(np.argsort(-served)) == list(np.argsort(-expected))


def test_a_cross_encoder_in_int8_scores_near_float32(
    cross_encoder_folder: Path, cross_encoder_server: InProcessServer
) -> None:
    with serving(reranker=cross_encoder_folder, dtype="int8", warmup=False) as server:
        served = rerank_scores(server, "ranking", TEXTS)
    np.testing.assert_allclose(
        served, rerank_scores(cross_encoder_server, "ranking", TEXTS), atol=2e-2
    )

"""CUDA graphs' shapes and padding, on the CPU; the capture itself is in test_cuda.py."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace
from typing import cast

import numpy as np
import pytest
import torch

from embedserve.service.config import ServerConfig
from embedserve.service.engine.cuda_graphs import (
    DEFAULT_MAX_TOKENS,
    SMALL_TOKENS,
    Shape,
    pad_to,
    shape_for,
    shapes_for,
)
from embedserve.service.engine.runner import BatchRunner
from embedserve.service.models.base import DeviceSpec, ModelAdapter
from embedserve.service.models.options import ModelOptions
from embedserve.service.models.qwen3 import Qwen3Embedder
from embedserve.service.models.tokenization import Truncation
from embedserve.service.server import _cuda_graph_tokens

CPU = DeviceSpec(torch.device("cpu"), torch.float32)


def test_shapes_stay_within_the_limits_largest_first() -> None:
    shapes = shapes_for(max_rows=64, max_tokens=DEFAULT_MAX_TOKENS, max_width=256)
    assert shapes and all(
        s.rows <= 64 and s.width <= 256 and s.tokens <= DEFAULT_MAX_TOKENS for s in shapes
    )
    assert [s.tokens for s in shapes] == sorted((s.tokens for s in shapes), reverse=True)
    assert Shape(1, 16) in shapes and Shape(64, 128) in shapes
    assert Shape(64, 192) not in shapes  # 12,288 tokens


def test_a_batch_takes_the_smallest_shape_it_fits_while_the_padding_pays() -> None:
    shapes = shapes_for(max_rows=256, max_tokens=DEFAULT_MAX_TOKENS, max_width=512)
    assert shape_for(1, 8, shapes) == Shape(1, 16)
    assert shape_for(3, 40, shapes) == Shape(4, 48)
    assert shape_for(64, 64, shapes) == Shape(64, 64)
    assert shape_for(45, 120, shapes) == Shape(48, 128)
    # 33 x 100 fits 48 x 128 too, but that is 1.9x its tokens, past both allowances.
    assert max(SMALL_TOKENS, 1.5 * 33 * 100) < 48 * 128
    assert shape_for(33, 100, shapes) is None
    assert shape_for(1, 600, shapes) is None  # wider than any shape
    assert shape_for(300, 16, shapes) is None  # more rows than any shape


def test_padding_a_batch_to_a_shape_leaves_its_rows_unchanged(
    qwen3_embedding_folder: Path,
) -> None:
    adapter = Qwen3Embedder(ModelOptions(folder=qwen3_embedding_folder, name="q"), CPU)
    texts = ["a short text", "a somewhat longer text about retrieval and ranking", "x"]
    encoded = [t.ids for t in adapter.tokenize(texts, "", Truncation.END)]
    width = max(len(ids) for ids in encoded)
    ids = np.full((len(encoded), width), adapter.pad_token_id, dtype=np.int64)
    mask = np.zeros_like(ids)
    for row, seq in enumerate(encoded):
        ids[row, : len(seq)] = seq
        mask[row, : len(seq)] = 1
    shape = shape_for(*ids.shape, shapes_for(256, DEFAULT_MAX_TOKENS, 512))
    assert shape is not None and shape.rows > len(texts) and shape.width > width
    grown_ids, grown_mask = pad_to(ids, mask, shape, adapter.pad_token_id)
    assert grown_ids.shape == grown_mask.shape == (shape.rows, shape.width)
    # Every extra row attends to one token: none is all masked (NaN under SDPA).
    assert grown_mask.sum(axis=1).min() >= 1
    with torch.inference_mode():
        plain = adapter.forward(torch.from_numpy(ids), torch.from_numpy(mask))
        grown = adapter.forward(torch.from_numpy(grown_ids), torch.from_numpy(grown_mask))
    assert torch.isfinite(grown).all()
    torch.testing.assert_close(grown[: len(texts)], plain, atol=1e-5, rtol=1e-5)


def test_capturing_graphs_needs_a_cuda_device(qwen3_embedding_folder: Path) -> None:
    adapter = Qwen3Embedder(ModelOptions(folder=qwen3_embedding_folder, name="q"), CPU)
    with pytest.raises(ValueError, match="CUDA"):
        BatchRunner(adapter).capture_graphs(8, 1024)


@pytest.mark.parametrize(
    ("device", "capturable", "expected", "warning"),
    [
        ("cpu", True, 0, "applies on CUDA only"),
        ("cuda", False, 0, "not verified to run from CUDA graphs"),
        ("cuda", True, 4096, None),
    ],
)
def test_graphs_apply_on_cuda_to_models_verified_to_capture(
    device: str,
    capturable: bool,
    expected: int,
    warning: str | None,
    caplog: pytest.LogCaptureFixture,
) -> None:
    adapter = SimpleNamespace(
        name="m",
        family="bert",
        cuda_graphs=capturable,
        device=DeviceSpec(torch.device(device), torch.float16),
    )
    config = ServerConfig(cuda_graph_tokens=4096)
    with caplog.at_level(logging.WARNING):
        assert _cuda_graph_tokens(cast(ModelAdapter, adapter), config) == expected
    assert (warning is None) == (not caplog.records)
    if warning is not None:
        assert warning in caplog.records[0].getMessage()
    assert _cuda_graph_tokens(cast(ModelAdapter, adapter), ServerConfig()) == 0

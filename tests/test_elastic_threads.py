"""A batch on the parallel worker reads its thread count again before each layer, in every
model family's forward, padded or padding-free (engine/runner.py, engine/workers.py)."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from embedserve.service.engine.runner import BatchRunner
from embedserve.service.models.base import DeviceSpec, ModelAdapter, RerankerAdapter
from embedserve.service.models.cross_encoder import CrossEncoderReranker
from embedserve.service.models.options import ModelOptions
from embedserve.service.models.qwen3 import Qwen3Embedder, Qwen3Reranker
from embedserve.service.models.sentence_transformer import SentenceTransformerEmbedder
from embedserve.service.models.tokenization import Truncation

CPU = DeviceSpec(torch.device("cpu"), torch.float32)
TEXTS = ["hi", "a short text", "a somewhat longer text about retrieval"]
FAMILIES = {
    "minilm": (SentenceTransformerEmbedder, "minilm_folder"),
    "qwen3-embedding": (Qwen3Embedder, "qwen3_embedding_folder"),
    "qwen3-reranker": (Qwen3Reranker, "qwen3_reranker_folder"),
    "cross-encoder": (CrossEncoderReranker, "cross_encoder_folder"),
}


def token_ids(adapter: ModelAdapter) -> list[list[int]]:
    if isinstance(adapter, RerankerAdapter):
        return [t.ids for t in adapter.tokenize_pairs("query", TEXTS, "", Truncation.END)]
    return [t.ids for t in adapter.tokenize(TEXTS, "", Truncation.END)]  # type: ignore[attr-defined]


@pytest.mark.parametrize("padding_free", [True, False], ids=["padding-free", "padded"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_running_batch_follows_its_thread_count_layer_by_layer(
    family: str, padding_free: bool, request: pytest.FixtureRequest
) -> None:
    adapter_type, fixture = FAMILIES[family]
    folder: Path = request.getfixturevalue(fixture)
    adapter = adapter_type(ModelOptions(folder=folder, name=family, padding_free=padding_free), CPU)
    if family != "cross-encoder":  # it has no padding-free forward
        assert adapter.padding_free is padding_free
    layers = json.loads((folder / "config.json").read_text())["num_hidden_layers"]
    runner = BatchRunner(adapter)
    reads: list[int] = []

    def wanted() -> int:
        # What torch runs on when read; then one thread and two in turn.
        reads.append(torch.get_num_threads())
        return 1 if len(reads) % 2 else 2

    # On a thread of its own, as a forward worker: the count is per thread.
    with ThreadPoolExecutor(1) as worker:
        rows = worker.submit(runner.run, token_ids(adapter), wanted).result()
    assert len(rows) == len(TEXTS)
    assert len(reads) == 1 + layers  # when the batch starts, then before each layer
    assert reads[1:] == [1 if read % 2 else 2 for read in range(1, len(reads))]

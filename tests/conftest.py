from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))

from harness import InProcessServer, RedisServer, model_folder_default, redis_binary, serving
from support.bert import build_bert_embedder
from support.qwen3 import (
    build_qwen3_embedding,
    build_qwen3_reranker,
    build_tiny_cross_encoder,
)


@pytest.fixture(scope="session")
def minilm_folder() -> Path:
    return model_folder_default()


@pytest.fixture(scope="session")
def bert_embedder_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """all-MiniLM-L6-v2's shape with random weights and a tokenizer trained offline."""
    return build_bert_embedder(tmp_path_factory.mktemp("bert-embedder"), seed=4)


@pytest.fixture(scope="session")
def qwen3_embedding_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_qwen3_embedding(tmp_path_factory.mktemp("qwen3-embedding"), seed=1)


@pytest.fixture(scope="session")
def qwen3_reranker_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_qwen3_reranker(tmp_path_factory.mktemp("qwen3-reranker"), seed=2)


@pytest.fixture(scope="session")
def cross_encoder_folder(tmp_path_factory: pytest.TempPathFactory, minilm_folder: Path) -> Path:
    return build_tiny_cross_encoder(tmp_path_factory.mktemp("cross-encoder"), minilm_folder, seed=3)


@pytest.fixture(scope="session")
def minilm_server() -> Iterator[InProcessServer]:
    """The embedded default: the real all-MiniLM-L6-v2, similarity reranking."""
    with serving() as server:
        yield server


@pytest.fixture(scope="session")
def qwen3_server(
    qwen3_embedding_folder: Path, qwen3_reranker_folder: Path
) -> Iterator[InProcessServer]:
    with serving(
        model=qwen3_embedding_folder,
        model_name="qwen3-embedding-tiny",
        reranker=qwen3_reranker_folder,
        reranker_name="qwen3-reranker-tiny",
    ) as server:
        yield server


@pytest.fixture(scope="session")
def cross_encoder_server(cross_encoder_folder: Path) -> Iterator[InProcessServer]:
    with serving(
        reranker=cross_encoder_folder, reranker_name="ms-marco-tiny", warmup=False
    ) as server:
        yield server


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One real redis-server for the session (skipped without one, except under CI)."""
    server = RedisServer(redis_binary())
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The session's Redis, emptied for this test."""
    redis_server.client.flushall()
    return redis_server.url

"""The exact-match embedding cache: the byte-bounded LRU, its keys, and real servers with
the memory tier and with a real redis-server shared by two replicas."""

from __future__ import annotations

import argparse
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from harness import (
    InProcessServer,
    RedisServer,
    bytes_vectors,
    free_port,
    redis_binary,
    serving,
    wait_until,
)
from test_errors import invalid
from test_lifecycle import failed_start, start_error
from test_telemetry import scrape, value

from embedserve.service.api.encoding import finish_vectors
from embedserve.service.cache.keys import KeyBuilder, model_fingerprint
from embedserve.service.cache.memory import CachedVector, MemoryLRU, entry_bytes
from embedserve.service.cache.redis_backend import decode_entry, encode_entry
from embedserve.service.config import add_arguments, from_namespace
from embedserve.service.models.tokenization import Truncation
from embedserve.v1 import common_pb2, embed_service_pb2, rerank_service_pb2

BYTES = common_pb2.ENCODING_FLOAT32_BYTES
MODEL = "all-MiniLM-L6-v2"


def vector(seed: int, dims: int = 8) -> CachedVector:
    return CachedVector.of(np.random.default_rng(seed).standard_normal(dims), seed, False)


def key(n: int) -> bytes:
    return n.to_bytes(32, "little")


# -- the in-process tier -----------------------------------------------------------------------


def test_lru_holds_at_most_its_bytes_and_evicts_the_oldest() -> None:
    size = entry_bytes(key(0), vector(0))
    lru = MemoryLRU(3 * size)
    for n in range(5):
        assert lru.put(key(n), vector(n))
        assert lru.bytes <= lru.capacity
    assert lru.keys() == [key(2), key(3), key(4)]
    assert (len(lru), lru.bytes, lru.evictions) == (3, 3 * size, 2)
    assert lru.get(key(0)) is None and lru.get(key(1)) is None


def test_lru_use_refreshes_an_entry() -> None:
    size = entry_bytes(key(0), vector(0))
    lru = MemoryLRU(3 * size)
    for n in range(3):
        lru.put(key(n), vector(n))
    hit = lru.get(key(0))
    assert hit is not None and hit.tokens == 0
    lru.put(key(3), vector(3))
    assert lru.keys() == [key(2), key(0), key(3)]  # key 1 was the least recently used
    assert lru.get(key(1)) is None


def test_an_entry_larger_than_the_bound_is_not_stored() -> None:
    small = vector(1, dims=8)
    lru = MemoryLRU(entry_bytes(key(1), small) + 100)
    assert lru.put(key(1), small)
    assert not lru.put(key(2), vector(2, dims=1024))
    assert lru.keys() == [key(1)]  # nothing was evicted for it
    assert (lru.bytes, lru.evictions) == (entry_bytes(key(1), small), 0)


def test_lru_bytes_follow_replacements_and_sizes() -> None:
    lru = MemoryLRU(1 << 20)
    lru.put(key(1), vector(1, dims=8))
    lru.put(key(2), vector(2, dims=16))
    lru.put(key(1), vector(3, dims=32))  # replaced, not added
    expected = entry_bytes(key(1), vector(3, dims=32)) + entry_bytes(key(2), vector(2, dims=16))
    assert (len(lru), lru.bytes) == (2, expected)
    assert entry_bytes(key(1), vector(3, dims=32)) > 32 * 4 + 32  # overhead counted


def test_cached_vectors_are_private_read_only_copies() -> None:
    batch = np.ones((2, 4), dtype=np.float32)
    entry = CachedVector.of(batch[0], 3, True)
    batch[0] = 7
    assert entry.vector.tolist() == [1, 1, 1, 1]
    with pytest.raises(ValueError):
        entry.vector[0] = 2


# -- keys and the Redis value format -----------------------------------------------------------


def test_keys_change_with_everything_that_changes_the_vector() -> None:
    base = KeyBuilder("m", "f" * 64, 256)
    (reference,) = base.keys("", Truncation.END, ["text"])
    assert len(reference) == 32
    assert base.keys("", Truncation.END, ["text"]) == [reference]
    others = [
        base.keys("", Truncation.END, ["text "])[0],
        base.keys("query: ", Truncation.END, ["text"])[0],
        base.keys("", Truncation.START, ["text"])[0],
        base.keys("", Truncation.ERROR, ["text"])[0],
        KeyBuilder("m2", "f" * 64, 256).keys("", Truncation.END, ["text"])[0],
        KeyBuilder("m", "e" * 64, 256).keys("", Truncation.END, ["text"])[0],
        KeyBuilder("m", "f" * 64, 128).keys("", Truncation.END, ["text"])[0],
        # Field boundaries are unambiguous: prefix "a" + text "b" is not prefix "" + "ab".
        base.keys("a", Truncation.END, ["b"])[0],
        base.keys("", Truncation.END, ["ab"])[0],
    ]
    assert len({reference, *others}) == len(others) + 1


def test_fingerprint_sees_configs_and_weights_of_the_same_size(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text('{"hidden_size": 8}')
    weights = bytearray(8 * 1024 * 1024)
    (folder / "model.safetensors").write_bytes(weights)
    first = model_fingerprint(folder, ["mean", "float32"])
    assert model_fingerprint(folder, ["mean", "float32"]) == first
    assert model_fingerprint(folder, ["mean", "bfloat16"]) != first
    weights[-1] = 1  # a fine-tune: same size, other bytes
    (folder / "model.safetensors").write_bytes(weights)
    tuned = model_fingerprint(folder, ["mean", "float32"])
    assert tuned != first
    (folder / "config.json").write_text('{"hidden_size": 9}')
    assert model_fingerprint(folder, ["mean", "float32"]) not in {first, tuned}


def test_redis_values_round_trip_and_foreign_ones_are_refused() -> None:
    entry = CachedVector.of(np.array([0.5, -1.25, 3.0], dtype=np.float32), 17, True)
    data = encode_entry(entry)
    back = decode_entry(data, 3)
    assert back is not None
    assert back.vector.tobytes() == entry.vector.tobytes()
    assert (back.tokens, back.truncated) == (17, True)
    assert decode_entry(data, 4) is None
    assert decode_entry(data[:-1], 3) is None
    assert decode_entry(b"\x02" + data[1:], 3) is None


def test_cache_flags_parse() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser, {"EMBEDSERVE_CACHE_BYTES": "256MiB"})
    config = from_namespace(parser.parse_args([]))
    assert config.cache_bytes == 256 * 1024 * 1024
    assert (config.cache_redis_url, config.cache_redis_ttl_s) == (None, 86400)
    assert from_namespace(parser.parse_args(["--cache-bytes", "1000"])).cache_bytes == 1000
    assert from_namespace(parser.parse_args(["--cache-bytes", "2GB"])).cache_bytes == 2 * 10**9
    with pytest.raises(SystemExit):
        parser.parse_args(["--cache-bytes", "lots"])


# -- through a real server with the memory tier -----------------------------------------------


@pytest.fixture(scope="module")
def cached() -> Iterator[InProcessServer]:
    with serving(cache_bytes=4 << 20, warmup=False, metrics_port=0, min_dimensions=32) as s:
        yield s


def counters(server: InProcessServer) -> dict[str, float]:
    assert server.server.metrics_port is not None
    series = scrape(server.server.metrics_port)
    return {
        "memory": value(series, "embedserve_cache_hits_total", model=MODEL, tier="memory"),
        "redis": value(series, "embedserve_cache_hits_total", model=MODEL, tier="redis"),
        "misses": value(series, "embedserve_cache_misses_total", model=MODEL),
        "bytes": value(series, "embedserve_cache_bytes", model=MODEL),
        "entries": value(series, "embedserve_cache_entries", model=MODEL),
        "errors": value(series, "embedserve_cache_errors_total", model=MODEL, backend="redis"),
        "sequences": value(series, "embedserve_sequences_total", model=MODEL),
    }


def embed(
    server: InProcessServer, texts: list[str], **options: Any
) -> embed_service_pb2.EmbedResponse:
    options.setdefault("encoding", BYTES)
    response: embed_service_pb2.EmbedResponse = server.stubs.embed.Embed(
        embed_service_pb2.EmbedRequest(inputs=texts, **options), timeout=30
    )
    return response


def test_a_repeat_is_served_from_memory_for_every_dimension_and_encoding(
    cached: InProcessServer,
) -> None:
    texts = ["the cache keeps this one", "and this one too"]
    before = counters(cached)
    first = embed(cached, texts, normalize=False)
    after_first = counters(cached)
    assert first.usage.cached_inputs == 0
    assert after_first["misses"] - before["misses"] == 2
    assert after_first["sequences"] - before["sequences"] == 2
    assert after_first["entries"] - before["entries"] == 2
    assert after_first["bytes"] > before["bytes"]

    again = embed(cached, texts, normalize=False)
    assert again.usage.cached_inputs == 2
    assert bytes_vectors(again).tobytes() == bytes_vectors(first).tobytes()  # bit for bit
    assert again.usage.input_tokens == first.usage.input_tokens
    assert (again.usage.inputs, again.usage.truncated_inputs) == (2, 0)
    # Each input's own share, on its embedding.
    assert [e.cached for e in first.embeddings] == [False, False]
    assert [e.cached for e in again.embeddings] == [True, True]
    tokens_each = [e.input_tokens for e in first.embeddings]
    assert [e.input_tokens for e in again.embeddings] == tokens_each
    assert sum(tokens_each) == first.usage.input_tokens and tokens_each[0] != tokens_each[1]
    for part in (again.timing.tokenization, again.timing.queue, again.timing.inference):
        assert part.ToNanoseconds() == 0

    vectors = bytes_vectors(first)
    short = embed(cached, texts, dimensions=64, encoding=common_pb2.ENCODING_FLOAT32)
    assert short.usage.cached_inputs == 2
    floats = np.array([list(e.float32.values) for e in short.embeddings], dtype=np.float32)
    assert np.array_equal(floats, finish_vectors(vectors, 64, True))
    binary = embed(cached, texts, encoding=common_pb2.ENCODING_BINARY)
    assert [e.binary for e in binary.embeddings] == [
        row.tobytes() for row in np.packbits(vectors > 0, axis=1)
    ]
    int8 = embed(cached, texts, encoding=common_pb2.ENCODING_INT8)
    assert int8.usage.cached_inputs == 2 and len(int8.embeddings[0].int8.values) == 384

    now = counters(cached)
    assert now["misses"] == after_first["misses"], "one entry serves every dimension/encoding"
    assert now["sequences"] == after_first["sequences"], "cached requests reached the engine"
    assert now["memory"] - after_first["memory"] == 2 * 4


def test_instruction_and_truncation_are_part_of_the_key(cached: InProcessServer) -> None:
    text = " ".join(f"w{i}" for i in range(400))  # longer than MiniLM's 256 tokens
    end = embed(cached, [text])
    assert (end.usage.cached_inputs, end.usage.truncated_inputs) == (0, 1)
    assert end.embeddings[0].truncated and end.embeddings[0].input_tokens == 256
    start = embed(cached, [text], truncation=common_pb2.TRUNCATION_POLICY_START)
    assert start.usage.cached_inputs == 0
    query = embed(cached, [text], instruction="query: ")
    assert query.usage.cached_inputs == 0
    assert len({bytes_vectors(r).tobytes() for r in (end, start, query)}) == 3
    # Each of them is now cached under its own key, with its own usage.
    for response, options in (
        (end, {}),
        (start, {"truncation": common_pb2.TRUNCATION_POLICY_START}),
        (query, {"instruction": "query: "}),
    ):
        repeat = embed(cached, [text], **options)
        assert repeat.usage.cached_inputs == 1
        assert bytes_vectors(repeat).tobytes() == bytes_vectors(response).tobytes()
        assert repeat.usage.truncated_inputs == 1
        assert repeat.usage.input_tokens == response.usage.input_tokens == 256
        first = repeat.embeddings[0]
        assert (first.cached, first.truncated, first.input_tokens) == (True, True, 256)


def test_mixed_requests_keep_input_order(
    cached: InProcessServer, minilm_server: InProcessServer
) -> None:
    known = ["ordered one is known", "ordered two is known"]
    embed(cached, known)
    texts = ["fresh alpha about rivers", known[1], "fresh beta about mountains", known[0]]
    before = counters(cached)
    mixed = embed(cached, texts)
    assert mixed.usage.cached_inputs == 2
    assert counters(cached)["misses"] - before["misses"] == 2
    reference = embed(minilm_server, texts)  # the same model without a cache
    assert mixed.usage.input_tokens == reference.usage.input_tokens
    assert np.allclose(bytes_vectors(mixed), bytes_vectors(reference), atol=1e-5)
    # The four vectors differ from each other, so a swap could not pass the check above.
    assert (
        np.abs(bytes_vectors(reference)[:, None] - bytes_vectors(reference)[None])
        .max(axis=2)[~np.eye(4, dtype=bool)]
        .min()
        > 1e-3
    )


def test_duplicates_in_one_request_are_computed_once(
    cached: InProcessServer, minilm_server: InProcessServer
) -> None:
    texts = ["twice and thrice", "only once", "twice and thrice", "twice and thrice"]
    before = counters(cached)
    response = embed(cached, texts)
    after = counters(cached)
    assert after["sequences"] - before["sequences"] == 2
    assert after["misses"] - before["misses"] == 2
    assert response.usage.cached_inputs == 0  # computed here, not found in the cache
    vectors = bytes_vectors(response)
    assert vectors[0].tobytes() == vectors[2].tobytes() == vectors[3].tobytes()
    assert response.usage.input_tokens == embed(minilm_server, texts).usage.input_tokens


def test_a_fully_cached_request_never_enters_the_engine(cached: InProcessServer) -> None:
    texts = ["served while the engine is held"]
    first = embed(cached, texts)
    engine = cached.engines[0]
    cached.call(engine.hold)  # no batch can run: only the cache can answer
    try:
        repeat = embed(cached, texts)
        assert repeat.usage.cached_inputs == 1
        assert bytes_vectors(repeat).tobytes() == bytes_vectors(first).tobytes()
        assert engine.outstanding == 0
    finally:
        cached.call(engine.release)


def test_too_long_inputs_are_named_by_their_request_index(cached: InProcessServer) -> None:
    embed(cached, ["known before the error"])
    invalid(
        lambda: embed(
            cached,
            ["known before the error", "word " * 400],
            truncation=common_pb2.TRUNCATION_POLICY_ERROR,
        ),
        "inputs[1]",
    )


def test_stream_items_and_similarity_rerank_use_the_cache(cached: InProcessServer) -> None:
    request = embed_service_pb2.EmbedRequest(inputs=["streamed twice", "also"], encoding=BYTES)
    items = [embed_service_pb2.EmbedStreamRequest(id=str(i), request=request) for i in range(2)]
    first = {r.id: r for r in cached.stubs.embed.EmbedStream(iter(items[:1]), timeout=30)}
    second = {r.id: r for r in cached.stubs.embed.EmbedStream(iter(items[1:]), timeout=30)}
    assert first["0"].result.usage.cached_inputs == 0
    assert second["1"].result.usage.cached_inputs == 2
    assert bytes_vectors(second["1"].result).tobytes() == bytes_vectors(first["0"].result).tobytes()

    rerank = rerank_service_pb2.RerankRequest(
        query="which one is cached", documents=["doc one cached", "doc two cached"]
    )
    cold = cached.stubs.rerank.Rerank(rerank, timeout=30)
    warm = cached.stubs.rerank.Rerank(rerank, timeout=30)
    assert (cold.usage.cached_inputs, warm.usage.cached_inputs) == (0, 2)
    assert [(r.index, r.score) for r in warm.results] == [(r.index, r.score) for r in cold.results]
    assert warm.usage.input_tokens == cold.usage.input_tokens


def test_without_a_cache_usage_says_nothing_was_cached(minilm_server: InProcessServer) -> None:
    texts = ["no cache here"]
    assert [embed(minilm_server, texts).usage.cached_inputs for _ in range(2)] == [0, 0]
    assert minilm_server.registry.embedders[MODEL].cache is None


# -- Redis ---------------------------------------------------------------------------------------


def test_replicas_share_vectors_through_redis(redis_url: str, redis_server: RedisServer) -> None:
    texts = ["shared between replicas", "computed once by A"]
    with (
        serving(cache_bytes=1 << 20, cache_redis_url=redis_url, warmup=False, metrics_port=0) as a,
        # B runs Redis-only: every lookup goes to Redis.
        serving(cache_redis_url=redis_url, warmup=False, metrics_port=0) as b,
    ):
        computed = embed(a, texts)
        assert computed.usage.cached_inputs == 0
        # The writes are sent in the background, after the response.
        wait_until(lambda: redis_server.client.dbsize() == 2, what="A's entries in Redis")
        assert all(
            k.startswith(f"embedserve:v1:{MODEL}:".encode())
            for k in redis_server.client.scan_iter()
        )
        assert all(0 < redis_server.client.ttl(k) <= 86400 for k in redis_server.client.scan_iter())

        shared = embed(b, texts)
        assert shared.usage.cached_inputs == 2
        assert bytes_vectors(shared).tobytes() == bytes_vectors(computed).tobytes()
        assert shared.usage.input_tokens == computed.usage.input_tokens
        b_counts = counters(b)
        assert (b_counts["redis"], b_counts["misses"], b_counts["sequences"]) == (2, 0, 0)
        assert (b_counts["entries"], b_counts["errors"]) == (0, 0)  # no memory tier

        # A's memory tier answers it without asking Redis; a fresh text that B computes
        # reaches A through Redis and then sits in A's memory too.
        embed(b, ["computed by B"])
        wait_until(lambda: redis_server.client.dbsize() == 3, what="B's entry in Redis")
        assert embed(a, ["computed by B"]).usage.cached_inputs == 1
        assert embed(a, ["computed by B", *texts]).usage.cached_inputs == 3
        a_counts = counters(a)
        assert (a_counts["redis"], a_counts["memory"], a_counts["misses"]) == (1, 3, 2)


def test_a_dead_redis_never_fails_a_request() -> None:
    redis_server = RedisServer(redis_binary())
    try:
        with serving(cache_redis_url=redis_server.url, warmup=False, metrics_port=0) as server:
            first = embed(server, ["before redis died"])
            wait_until(lambda: redis_server.client.dbsize() == 1, what="the entry in Redis")
            assert embed(server, ["before redis died"]).usage.cached_inputs == 1
            redis_server.stop()
            for texts in (["before redis died"], ["after redis died"], ["after redis died"]):
                response = embed(server, texts)  # answered by computing
                assert response.usage.cached_inputs == 0
                assert len(response.embeddings) == 1
            assert np.allclose(
                bytes_vectors(embed(server, ["before redis died"])), bytes_vectors(first), atol=1e-5
            )
            assert counters(server)["errors"] >= 1
    finally:
        redis_server.stop()


def test_an_unreachable_redis_at_boot_is_a_warning() -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    with serving(cache_bytes=1 << 20, cache_redis_url=url, warmup=False, metrics_port=0) as server:
        texts = ["redis never answered"]
        assert embed(server, texts).usage.cached_inputs == 0
        assert embed(server, texts).usage.cached_inputs == 1  # the memory tier still works
        assert counters(server)["errors"] >= 1


def test_an_invalid_redis_url_fails_the_start() -> None:
    process = failed_start("--cache-redis-url", "http://127.0.0.1:6379", "--warmup", "false")
    message = start_error(process)
    assert "--cache-redis-url" in message and "redis://" in message


def test_redis_tests_fail_rather_than_skip_under_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception):
        redis_binary()
    monkeypatch.setenv("CI", "")
    with pytest.raises(pytest.skip.Exception):
        redis_binary()

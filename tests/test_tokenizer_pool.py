"""The tokenizer thread, and the small jobs that run on the event loop instead."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from harness import serving

from embedserve.service.engine.tokenizer_pool import INLINE_MAX_CHARS, TokenizerPool
from embedserve.v1 import embed_service_pb2


def _thread_name() -> str:
    return threading.current_thread().name


async def _with_pool(body: Callable[[TokenizerPool], Awaitable[None]]) -> None:
    pool = TokenizerPool("test")
    try:
        await body(pool)
    finally:
        pool.close()


def test_a_small_job_runs_on_the_event_loop_while_the_thread_is_idle() -> None:
    async def body(pool: TokenizerPool) -> None:
        loop_thread = _thread_name()
        name, seconds = await pool.run(_thread_name, chars=INLINE_MAX_CHARS)
        assert name == loop_thread
        assert seconds >= 0
        assert pool.inline_jobs == 1

    asyncio.run(_with_pool(body))


@pytest.mark.parametrize("chars", [None, INLINE_MAX_CHARS + 1])
def test_a_large_or_uncounted_job_runs_on_the_tokenizer_thread(chars: int | None) -> None:
    async def body(pool: TokenizerPool) -> None:
        name, _ = await pool.run(_thread_name, chars=chars)
        assert name.startswith("tokenize-test")
        assert pool.inline_jobs == 0

    asyncio.run(_with_pool(body))


def test_small_jobs_wait_for_a_busy_thread_and_go_over_together() -> None:
    # While the thread works, a small job must not run beside it (the tokenizer is used by
    # one thread at a time), and the jobs that queued meanwhile go over in one hop.
    release = threading.Event()
    batches: list[list[str]] = []

    def blocking() -> str:
        release.wait(30)
        return _thread_name()

    def recorded(label: str) -> str:
        batches[-1].append(label)
        return _thread_name()

    def first() -> str:
        batches.append([])
        return recorded("first")

    async def body(pool: TokenizerPool) -> None:
        busy = asyncio.ensure_future(pool.run(blocking, chars=None))
        await asyncio.sleep(0)  # the blocking job is handed to the thread
        small = [
            asyncio.ensure_future(pool.run(first, chars=1)),
            asyncio.ensure_future(pool.run(lambda: recorded("second"), chars=1)),
        ]
        await asyncio.sleep(0.05)
        assert not any(job.done() for job in small)
        release.set()
        names = [name for name, _ in await asyncio.gather(busy, *small)]
        assert all(name.startswith("tokenize-test") for name in names)
        assert batches == [["first", "second"]]
        assert pool.inline_jobs == 0

    asyncio.run(_with_pool(body))


def _broken() -> str:
    raise ValueError("bad input")


def test_a_failing_small_job_fails_its_caller_and_the_next_one_still_runs() -> None:
    async def body(pool: TokenizerPool) -> None:
        with pytest.raises(ValueError, match="bad input"):
            await pool.run(_broken, chars=1)
        name, _ = await pool.run(_thread_name, chars=1)
        assert name == _thread_name()
        assert pool.inline_jobs == 2

    asyncio.run(_with_pool(body))


def test_a_failing_job_on_the_thread_fails_its_own_caller_only() -> None:
    release = threading.Event()

    async def body(pool: TokenizerPool) -> None:
        busy = asyncio.ensure_future(pool.run(lambda: release.wait(30), chars=None))
        await asyncio.sleep(0)
        failing = asyncio.ensure_future(pool.run(_broken, chars=None))
        fine = asyncio.ensure_future(pool.run(_thread_name, chars=None))
        await asyncio.sleep(0)
        release.set()
        assert (await busy)[0] is True
        with pytest.raises(ValueError, match="bad input"):
            await failing
        assert (await fine)[0].startswith("tokenize-test")

    asyncio.run(_with_pool(body))


def test_the_server_tokenizes_a_short_query_on_the_loop_and_a_list_on_the_thread(
    qwen3_embedding_folder: Path,
) -> None:
    with serving(model=qwen3_embedding_folder, warmup=False) as server:
        (engine,) = server.engines
        embed = server.stubs.embed.Embed
        query = embed_service_pb2.EmbedRequest(inputs=["a short query"], instruction="Find it")
        assert len(embed(query, timeout=60).embeddings) == 1
        assert server.call(lambda: engine.inline_tokenizations) == 1
        many = embed_service_pb2.EmbedRequest(inputs=[f"text {n}" for n in range(8)])
        assert len(embed(many, timeout=60).embeddings) == 8
        long = embed_service_pb2.EmbedRequest(inputs=["word " * INLINE_MAX_CHARS])
        assert len(embed(long, timeout=60).embeddings) == 1
        assert server.call(lambda: engine.inline_tokenizations) == 1

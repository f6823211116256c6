"""Giving freed host memory back: the trimmer's interval, where it runs, and its effect."""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from harness import serving
from test_telemetry import scrape, value

from embedserve.service.config import add_arguments, from_namespace
from embedserve.service.engine import host_memory
from embedserve.service.engine.host_memory import MALLOC_TRIM, HostMemoryTrimmer
from embedserve.service.engine.workers import ForwardWorkers, SharedThreads
from embedserve.v1 import embed_service_pb2


class CountingTrim:
    def __init__(self, hold: threading.Event | None = None) -> None:
        self.calls: list[int] = []
        self.threads: list[int] = []
        self.hold = hold
        self.entered = threading.Event()

    def __call__(self, pad: int) -> int:
        self.entered.set()
        if self.hold is not None:
            assert self.hold.wait(10)
        self.calls.append(pad)
        self.threads.append(threading.get_native_id())
        return 1


def test_once_the_headroom_is_known_it_trims_only_past_it() -> None:
    fake = CountingTrim()
    rss = [500]
    trimmer = HostMemoryTrimmer(0.0001, fake, rss=lambda: rss[0])
    trimmer.learn_headroom(before=400, peak=600)
    trimmer.learn_headroom(before=400, peak=450)  # a smaller engine's batch: keeps the larger
    assert trimmer.headroom == 200
    assert trimmer.trim() and trimmer.floor == 500
    rss[0] = 650
    time.sleep(0.001)
    assert not trimmer.due()  # within the headroom: no trim, no pages to fault back in
    rss[0] = 701
    assert trimmer.due()
    rss[0] = 520
    assert trimmer.trim() and trimmer.floor == 520  # the floor follows live memory
    rss[0] = 700
    time.sleep(0.001)
    assert not trimmer.due()


def test_the_allowance_follows_the_batches_running_lately(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    rss = [500]
    trimmer = HostMemoryTrimmer(0.0001, CountingTrim(), rss=lambda: rss[0])
    assert trimmer.allowance is None
    trimmer.learn_headroom(before=400, peak=600, tokens=8192)  # a full batch needs 200
    assert trimmer.allowance == 200  # no batch yet: the whole headroom
    assert trimmer.trim() and trimmer.floor == 500
    clock[0] += 1
    # Short texts, 1,024 tokens on the workers: 1/8 of a full batch, so the floor's 40%.
    trimmer.batch_started(1024)
    assert trimmer.allowance == int(200 * host_memory.MIN_ALLOWANCE_SHARE)
    rss[0] = 500 + 81
    assert trimmer.due()  # past 80 of growth, where the whole headroom would wait for 200
    # A batch of 6,144 tokens beside 2,048 more: the full batch's size, the whole headroom.
    trimmer.batch_started(8192)
    assert trimmer.allowance == 200
    assert not trimmer.due()
    # Two full batches side by side need twice the headroom: no trim after each of them.
    trimmer.batch_started(16384)
    assert trimmer.allowance == 400
    # The large batches are remembered for the next window, then forgotten.
    clock[0] += host_memory.RECENT_BATCHES_S
    trimmer.batch_started(1024)
    assert trimmer.allowance == 400
    clock[0] += host_memory.RECENT_BATCHES_S
    trimmer.batch_started(1024)
    assert trimmer.allowance == 80
    # After an idle spell longer than both windows, only the batches since count.
    clock[0] += 3 * host_memory.RECENT_BATCHES_S
    trimmer.batch_started(4096)
    assert trimmer.allowance == 100


def test_without_the_full_batch_s_size_the_allowance_is_the_headroom() -> None:
    trimmer = HostMemoryTrimmer(0.0001, CountingTrim(), rss=lambda: 500)
    trimmer.learn_headroom(before=400, peak=600)  # tokens unknown
    trimmer.batch_started(16)
    assert trimmer.allowance == 200


def test_the_event_loop_side_reads_only_the_clock_and_the_worker_side_the_resident_set() -> None:
    fake = CountingTrim()
    reads: list[int] = []
    rss = [500]

    def read_rss() -> int:
        reads.append(rss[0])
        return rss[0]

    trimmer = HostMemoryTrimmer(0.0001, fake, rss=read_rss)
    trimmer.learn_headroom(before=400, peak=600)
    assert trimmer.interval_elapsed()
    assert reads == []  # a system call on the loop waits for the GIL behind the workers
    assert trimmer.trim_if_due() and fake.calls == [0]
    rss[0] = trimmer.floor + 150
    time.sleep(0.001)
    assert trimmer.interval_elapsed()
    reads.clear()
    assert not trimmer.trim_if_due()  # within the headroom
    assert reads == [rss[0]] and fake.calls == [0]
    rss[0] = trimmer.floor + 201
    assert trimmer.trim_if_due() and fake.calls == [0, 0]


def test_an_unknown_or_empty_measurement_leaves_the_interval_alone() -> None:
    trimmer = HostMemoryTrimmer(3600, CountingTrim(), rss=lambda: 10**9)
    trimmer.learn_headroom(before=None, peak=600)
    trimmer.learn_headroom(before=600, peak=600)
    assert trimmer.headroom is None
    assert trimmer.due()  # by the interval alone until a warm-up measured the headroom


def test_trims_at_most_once_an_interval() -> None:
    fake = CountingTrim()
    trimmer = HostMemoryTrimmer(3600, fake)
    assert trimmer.enabled and trimmer.due()
    assert trimmer.trim()
    assert fake.calls == [0]  # 0: keep no padding at the top of the heap
    assert not trimmer.due()
    assert not trimmer.trim()
    assert fake.calls == [0]
    assert trimmer.trims == 1
    assert trimmer.seconds >= 0


def test_an_interval_of_zero_never_trims() -> None:
    fake = CountingTrim()
    trimmer = HostMemoryTrimmer(0, fake)
    assert not trimmer.enabled and not trimmer.due() and not trimmer.trim()
    assert fake.calls == []


def test_no_malloc_trim_in_the_c_library_means_never() -> None:
    trimmer = HostMemoryTrimmer(1.0, None)
    assert not trimmer.enabled and not trimmer.trim()


def test_a_negative_interval_is_refused() -> None:
    with pytest.raises(ValueError, match="0 or more seconds"):
        HostMemoryTrimmer(-1)


def test_two_workers_due_at_once_trim_once() -> None:
    hold = threading.Event()
    fake = CountingTrim(hold)
    trimmer = HostMemoryTrimmer(3600, fake)
    first = threading.Thread(target=trimmer.trim)
    first.start()
    assert fake.entered.wait(10)
    assert not trimmer.trim()  # the other worker goes on with its next batch
    hold.set()
    first.join(10)
    assert fake.calls == [0]


def test_the_trim_runs_on_the_worker_after_the_batch_not_before_its_result() -> None:
    asyncio.run(_trim_after_a_batch())


async def _trim_after_a_batch() -> None:
    hold = threading.Event()
    fake = CountingTrim(hold)
    read_on: list[int] = []

    def read_rss() -> int:
        read_on.append(threading.get_native_id())
        return 10**9

    trimmer = HostMemoryTrimmer(3600, fake, rss=read_rss)
    trimmer.learn_headroom(before=1, peak=2)
    workers = ForwardWorkers("t", 1, SharedThreads(1), host_memory=trimmer)
    try:
        (placement,) = workers.place(1)
        batch_thread = await workers.run(placement, threading.get_native_id)
        # The batch's result is in while the trim queued behind it is still held.
        assert fake.entered.wait(10)
        assert fake.calls == []
        hold.set()
        workers.release(placement)
        (placement,) = workers.place(1)
        await workers.run(placement, lambda: None)  # runs after the trim, on the same thread
        assert fake.threads == [batch_thread]
        assert read_on and set(read_on) == {batch_thread}  # never on the event loop
        workers.release(placement)
    finally:
        hold.set()
        workers.shutdown()


@pytest.mark.skipif(MALLOC_TRIM is None, reason="no glibc malloc_trim here")
def test_malloc_trim_returns_the_pages_a_thread_freed_between_live_blocks() -> None:
    # In a child process, so that what this one holds cannot blur the figures. Blocks of
    # 64 KiB are under glibc's mmap threshold: they come from the thread's arena, and with
    # one block in ten kept, the freed ones lie between live ones, out of reach of the top
    # of heap trim that free() does by itself.
    script = textwrap.dedent(
        """
        import threading
        from embedserve.service.engine.host_memory import HostMemoryTrimmer, resident_bytes

        def rss_mib():
            return resident_bytes() / 2**20

        kept = []
        def churn():
            blocks = [bytearray(64 * 1024) for _ in range(4000)]
            kept.extend(blocks[::10])
        worker = threading.Thread(target=churn)
        worker.start(); worker.join()
        before = rss_mib()
        assert HostMemoryTrimmer(1.0).trim()
        print(before, rss_mib())
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    before, after = (float(x) for x in done.stdout.split())
    # About 225 MiB of the 250 MiB allocated is free; most of it must go back.
    assert before - after > 150, (before, after)


def test_the_warm_up_measures_the_headroom(qwen3_embedding_folder: Path) -> None:
    with serving(model=qwen3_embedding_folder, warmup=True, metrics_port=0) as server:
        (trimmer,) = {engine.workers.host_memory for engine in server.engines}
        assert trimmer is not None and trimmer.headroom is not None
        assert trimmer.headroom > 0
        (engine,) = server.engines
        assert trimmer.headroom_tokens == sum(len(s) for s in engine._warmup_batch())
        # Every batch since tells the trimmer what runs: one short text, the floor's share.
        request = embed_service_pb2.EmbedRequest(inputs=["a text"])
        assert len(server.stubs.embed.Embed(request, timeout=60).embeddings) == 1
        assert trimmer.allowance == int(trimmer.headroom * host_memory.MIN_ALLOWANCE_SHARE)
        assert server.server.metrics_port is not None
        series = scrape(server.server.metrics_port)
        assert value(series, "embedserve_host_memory_trim_allowance_bytes") == trimmer.allowance


def test_the_flag_and_its_default() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser, {})
    assert from_namespace(parser.parse_args([])).memory_trim_interval_ms == 200
    flag = ["--memory-trim-interval-ms", "0"]
    assert from_namespace(parser.parse_args(flag)).memory_trim_interval_ms == 0
    with pytest.raises(SystemExit):
        parser.parse_args(["--memory-trim-interval-ms", "-5"])


def test_a_cpu_server_trims_and_counts_it(qwen3_embedding_folder: Path) -> None:
    with serving(
        model=qwen3_embedding_folder, warmup=False, metrics_port=0, memory_trim_interval_ms=1
    ) as server:
        request = embed_service_pb2.EmbedRequest(inputs=["a text", "another"])
        for _ in range(3):
            assert len(server.stubs.embed.Embed(request, timeout=60).embeddings) == 2
        assert server.server.metrics_port is not None
        series = scrape(server.server.metrics_port)
        # No warm-up, so no headroom: trims follow the 1 ms interval.
        assert value(series, "embedserve_host_memory_trims_total") >= 1
        assert value(series, "embedserve_host_memory_trim_seconds_total") > 0

    with serving(
        model=qwen3_embedding_folder, warmup=False, metrics_port=0, memory_trim_interval_ms=0
    ) as server:
        assert len(server.stubs.embed.Embed(request, timeout=60).embeddings) == 2
        assert server.server.metrics_port is not None
        assert "embedserve_host_memory_trims_total" not in scrape(server.server.metrics_port)

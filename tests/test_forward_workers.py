"""Forward workers: batches that run side by side, sharing the CPU threads.

The engine is held while a test fills the queue, and the runner is wrapped so that a test
sees each batch (its size and threads) and can keep it running; what starts when is then
decided by the code under test, not by how fast this machine is.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from harness import TEST_CONFIG, InProcessServer, serving, wait_until

from embedserve.service.config import ServerConfig
from embedserve.service.engine.engine import ComputeResult, Engine
from embedserve.service.engine.limits import BatchLimits
from embedserve.service.engine.runner import ThreadCount
from embedserve.service.engine.work import Lane
from embedserve.service.engine.workers import ForwardWorkers, Placement, SharedThreads
from embedserve.service.models.base import DeviceSpec
from embedserve.service.models.loading import load_embedder
from embedserve.service.models.options import ModelOptions
from embedserve.service.registry import ModelRegistry
from embedserve.service.server import _engine, build_registry, forward_workers
from embedserve.service.telemetry.metrics import ServerMetrics
from embedserve.service.telemetry.setup import DISABLED

CPU = DeviceSpec(torch.device("cpu"), torch.float32)
MAX_BATCH_SIZE = 32  # a quarter of a full batch: 8 sequences
SEQUENCE = [5, 6, 7, 8]


@contextmanager
def built_registry(config: ServerConfig) -> Iterator[ModelRegistry]:
    """``build_registry`` in this thread; its engines stopped and this thread's torch thread
    count put back afterwards (the build sets it to one)."""
    threads_before = torch.get_num_threads()
    try:
        registry = build_registry(config)
        try:
            yield registry
        finally:
            for engine in registry.engines():
                asyncio.run(engine.stop())
    finally:
        torch.set_num_threads(threads_before)


# -- the thread budget ------------------------------------------------------------------


def test_a_batch_alone_gets_every_thread() -> None:
    workers = ForwardWorkers("t", 2, SharedThreads(4))
    try:
        (alone,) = workers.place(1)
        assert alone.threads == 4
        workers.release(alone)
        assert workers.free == 2
    finally:
        workers.shutdown()


def test_batches_starting_together_leave_worker_0_what_the_others_do_not_take() -> None:
    workers = ForwardWorkers("t", 3, SharedThreads(5))
    try:
        placements = workers.place(3)
        assert placements == [Placement(0, 3), Placement(1, 1), Placement(2, 1)]
        assert workers.free == 0
        with pytest.raises(ValueError, match="cannot place 1 batches on 0 free workers"):
            workers.place(1)
    finally:
        workers.shutdown()


def test_a_batch_beside_a_running_one_gets_what_is_left_and_at_least_one() -> None:
    workers = ForwardWorkers("t", 2, SharedThreads(2))
    try:
        (first,) = workers.place(1)
        threads_of_first = workers.thread_count(first)
        assert (first.threads, threads_of_first()) == (2, 2)
        (second,) = workers.place(1)
        assert second.threads == 1
        assert threads_of_first() == 1  # from its next layer on: no oversubscription
        workers.release(first)
        (third,) = workers.place(1)
        assert third.threads == 1  # the second batch still holds one
        workers.release(second)
        assert workers.thread_count(third)() == 2  # the rest of it runs on both
        workers.release(third)
        assert workers.place(2) == [Placement(third.worker, 1), Placement(second.worker, 1)]
    finally:
        workers.shutdown()


def test_only_worker_0_runs_a_batch_on_more_than_one_thread() -> None:
    """One OpenMP team in the process (engine/workers.py): worker 0's."""
    workers = ForwardWorkers("t", 2, SharedThreads(4))
    try:
        first, second = workers.place(2)
        assert (first, second) == (Placement(0, 3), Placement(1, 1))
        workers.release(first)
        workers.release(second)  # released last, yet a lone batch still goes to worker 0
        (alone,) = workers.place(1)
        assert alone == Placement(0, 4)
        (beside,) = workers.place(1)
        assert beside == Placement(1, 1)
        workers.release(alone)
        (again,) = workers.place(1)
        assert again == Placement(0, 3)  # what the batch on worker 1 leaves
    finally:
        workers.shutdown()


def test_engines_share_the_parallel_worker_and_the_threads() -> None:
    """One OpenMP team in the process, whichever model's batch runs on it; every engine keeps
    workers of its own, so that neither waits for the other's batches."""
    shared = SharedThreads(2)
    embedder = ForwardWorkers("embedder", 2, shared)
    reranker = ForwardWorkers("reranker", 2, shared)
    try:
        (rerank,) = reranker.place(1)
        assert rerank == Placement(0, 2)  # an idle embedder leaves the reranker every thread
        threads_of_rerank = reranker.thread_count(rerank)
        embeds = embedder.place(2)
        assert embeds == [Placement(1, 1), Placement(2, 1)]
        assert threads_of_rerank() == 1  # never fewer than one
        assert (embedder.free, reranker.free) == (0, 1)
        assert reranker.place(1) == [Placement(1, 1)]
        for embed in embeds:
            embedder.release(embed)
        assert threads_of_rerank() == 1  # the reranker's other batch holds one
        reranker.release(rerank)
        (embed,) = embedder.place(1)
        assert embed == Placement(0, 1)  # free again: whoever places next takes it
    finally:
        embedder.shutdown()
        reranker.shutdown()


def test_the_parallel_worker_stops_with_the_last_engine_that_shares_it() -> None:
    shared = SharedThreads(2)
    first = ForwardWorkers("first", 1, shared)
    second = ForwardWorkers("second", 1, shared)
    first_ids = first.native_ids()
    first.shutdown()
    assert second.native_ids()[0] == first_ids[0]  # the same thread, still running
    second.shutdown()
    with pytest.raises(RuntimeError, match="shutdown"):
        shared.parallel.submit(threading.get_native_id)


def test_a_reranker_beside_the_embedder_runs_on_every_thread_when_the_embedder_is_idle(
    cross_encoder_folder: Path,
) -> None:
    config = dataclasses.replace(TEST_CONFIG, reranker=cross_encoder_folder, warmup=False)
    with built_registry(config) as registry:
        embedder = registry.embedders[registry.default_embedder].engine
        reranker = registry.rerankers[registry.default_reranker].engine
        assert embedder.workers.threads is reranker.workers.threads
        (rerank,) = reranker.workers.place(1)
        assert rerank == Placement(0, 2)
        assert embedder.workers.place(1) == [Placement(1, 1)]
        reranker.workers.release(rerank)
        assert embedder.workers.place(1) == [Placement(0, 1)]  # one is still held


def test_off_the_cpu_each_engine_has_a_worker_of_its_own(qwen3_embedding_folder: Path) -> None:
    """No OpenMP team to share: an engine built without the CPU's SharedThreads (as on a GPU)
    runs its batches on its own thread, whatever another engine runs."""
    adapter = load_embedder(ModelOptions(folder=qwen3_embedding_folder, name="e"), CPU)
    limits = BatchLimits(max_batch_tokens=2048, max_batch_size=8)
    first, second = (_engine(adapter, limits, DISABLED, TEST_CONFIG, None, None) for _ in range(2))
    try:
        assert first.workers.threads is not second.workers.threads
        assert first.workers.place(1) == [Placement(0, 0)]
        assert second.workers.place(1) == [Placement(0, 0)]  # not held by the first
    finally:
        asyncio.run(first.stop())
        asyncio.run(second.stop())


def test_off_the_cpu_threads_are_left_alone() -> None:
    workers = ForwardWorkers("t", 1, SharedThreads(0))
    try:
        assert workers.place(1) == [Placement(0, 0)]
    finally:
        workers.shutdown()


def test_default_worker_count_follows_the_threads() -> None:
    assert forward_workers(ServerConfig(), cpu_threads=2) == 2
    assert forward_workers(ServerConfig(), cpu_threads=16) == 2
    assert forward_workers(ServerConfig(), cpu_threads=1) == 1
    assert forward_workers(ServerConfig(), cpu_threads=0) == 1  # a GPU
    assert forward_workers(ServerConfig(forward_workers=3), cpu_threads=2) == 3


def test_more_workers_than_threads_is_allowed_and_warned(
    qwen3_embedding_folder: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = dataclasses.replace(
        TEST_CONFIG, model=qwen3_embedding_folder, threads=1, forward_workers=3, warmup=False
    )
    with (
        caplog.at_level(logging.WARNING, logger="embedserve.service.server"),
        built_registry(config) as registry,
    ):
        (engine,) = registry.engines()
        assert (engine.workers.count, engine.workers.cpu_threads) == (3, 1)
        assert [p.threads for p in engine.workers.place(3)] == [1, 1, 1]
    assert "more forward workers than torch threads" in caplog.text
    assert "up to 3 threads may compete for 1" in caplog.text


def test_start_up_on_the_cpu_names_the_bfloat16_option_where_the_cpu_has_it(
    qwen3_embedding_folder: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CPU checks at start-up all run: the bfloat16 hint beside the thread and worker
    counts, naming the flag that makes bfloat16 fast."""
    config = dataclasses.replace(TEST_CONFIG, model=qwen3_embedding_folder, warmup=False)
    for flag in ("avx512_bf16", "amx_bf16", None):
        monkeypatch.setattr("embedserve.service.server.bf16_matmul_flag", lambda flag=flag: flag)
        caplog.clear()
        with (
            caplog.at_level(logging.INFO, logger="embedserve.service.server"),
            built_registry(config),
        ):
            pass
        assert "torch threads" in caplog.text
        hinted = f"this CPU multiplies bfloat16 in hardware ({flag})" in caplog.text
        assert hinted is (flag is not None)
        assert ("--dtype bfloat16 is faster" in caplog.text) is (flag is not None)
    # Serving int8 on such a CPU, the hint says what bfloat16 would keep instead.
    monkeypatch.setattr("embedserve.service.server.bf16_matmul_flag", lambda: "amx_bf16")
    caplog.clear()
    with (
        caplog.at_level(logging.INFO, logger="embedserve.service.server"),
        built_registry(dataclasses.replace(config, dtype="int8")),
    ):
        pass
    assert "(amx_bf16): --dtype bfloat16 served about as many calls as int8" in caplog.text
    assert "--dtype bfloat16 is faster" not in caplog.text


# -- the engine with two workers ----------------------------------------------------------


@dataclass
class Recorder:
    """Wraps the runner: records each batch and can keep batches running until let go."""

    batches: list[tuple[int, int, int]] = field(default_factory=list)  # size, threads, torch's
    started: list[tuple[int, int]] = field(default_factory=list)  # size, worker thread
    thread_counts: list[ThreadCount] = field(default_factory=list)  # what each batch reads
    gate: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    running: int = 0
    most_at_once: int = 0

    def wrap(self, engine: Engine) -> None:
        real_run = engine._runner.run

        def run(batch: Sequence[Sequence[int]], threads: ThreadCount = 0) -> np.ndarray:
            with self.lock:
                self.started.append((len(batch), threading.get_native_id()))
                self.running += 1
                self.most_at_once = max(self.most_at_once, self.running)
            try:
                rows = real_run(batch, threads)
                # Read on the worker, after the runner set it: what torch really used.
                asked = threads() if callable(threads) else threads
                self.thread_counts.append(threads)
                self.batches.append((len(batch), asked, torch.get_num_threads()))
                assert self.gate.wait(30), "the test never let the batch finish"
                return rows
            finally:
                with self.lock:
                    self.running -= 1

        engine._runner.run = run  # type: ignore[method-assign]


@pytest.fixture(scope="module")
def server(qwen3_embedding_folder: Path) -> Iterator[InProcessServer]:
    with serving(
        model=qwen3_embedding_folder,
        warmup=False,
        threads=2,
        max_batch_size=MAX_BATCH_SIZE,
        max_queue_delay_ms=0,
    ) as running:
        yield running


@pytest.fixture
def recorder(server: InProcessServer) -> Iterator[Recorder]:
    (engine,) = server.engines
    real_run = engine._runner.run
    recorder = Recorder()
    recorder.wrap(engine)
    try:
        yield recorder
    finally:
        recorder.gate.set()
        wait_until(lambda: server.call(lambda: engine.outstanding) == 0, what="idle engine")
        engine._runner.run = real_run  # type: ignore[method-assign]


def submit(
    server: InProcessServer,
    count: int,
    sequence: list[int] = SEQUENCE,
    lane: Lane = Lane.INTERACTIVE,
) -> Future[ComputeResult]:
    """Queue one request of ``count`` sequences on the server's loop; its future."""
    (engine,) = server.engines

    async def compute() -> ComputeResult:
        return await engine.compute([sequence] * count, lane, None)

    return asyncio.run_coroutine_threadsafe(compute(), server._loop)


def computed(server: InProcessServer) -> int:
    (engine,) = server.engines
    return server.call(lambda: engine.stats.sequences_computed)


def queued(server: InProcessServer, lane: Lane = Lane.INTERACTIVE) -> int:
    (engine,) = server.engines
    return server.call(lambda: engine.queued_sequences(lane))


def next_batches(server: InProcessServer) -> tuple[int, int]:
    """Batches queued on a busy worker so far, and those of them recalled."""
    (engine,) = server.engines
    stats = server.call(lambda: dataclasses.replace(engine.stats))
    return stats.next_batches_queued, stats.next_batches_recalled


def test_two_workers_by_default_for_two_threads(server: InProcessServer) -> None:
    (engine,) = server.engines
    assert engine.workers.count == 2 and engine.workers.cpu_threads == 2


def test_a_lone_request_runs_on_every_thread(server: InProcessServer, recorder: Recorder) -> None:
    recorder.gate.set()
    before = computed(server)
    submit(server, 3)
    wait_until(lambda: computed(server) == before + 3, what="the request to be computed")
    assert recorder.batches == [(3, 2, 2)]


def test_the_thread_that_loads_the_models_never_runs_torch_in_parallel(
    qwen3_embedding_folder: Path,
) -> None:
    """Its OpenMP team would be a second one beside worker 0's (engine/workers.py)."""
    config = dataclasses.replace(TEST_CONFIG, model=qwen3_embedding_folder, warmup=False)
    with built_registry(config) as registry:
        assert torch.get_num_threads() == 1
        assert [engine.workers.cpu_threads for engine in registry.engines()] == [2]


def test_a_queue_is_split_between_free_workers_that_run_at_once(
    server: InProcessServer, recorder: Recorder
) -> None:
    (engine,) = server.engines
    before = computed(server)
    server.call(engine.hold)
    submit(server, 20)
    wait_until(lambda: queued(server) == 20, what="the sequences to be queued")
    server.call(engine.release)
    # Both batches are inside the runner at once, and neither can end before the gate.
    wait_until(lambda: len(recorder.batches) == 2, what="two batches running at once")
    assert recorder.running == 2
    assert sorted(recorder.batches) == [(10, 1, 1), (10, 1, 1)]
    recorder.gate.set()
    wait_until(lambda: computed(server) == before + 20, what="the split request to finish")
    assert recorder.most_at_once == 2


def test_batches_side_by_side_count_as_a_share_of_the_drain_rate(
    server: InProcessServer, recorder: Recorder
) -> None:
    """The queue drained at the sum of the two batches: each counts half its own time."""
    (engine,) = server.engines
    observed: list[tuple[int, float]] = []
    real_observe = engine.drain_rate.observe

    def observe(tokens: int, padded_tokens: int, size: int, seconds: float) -> None:
        observed.append((size, seconds))
        real_observe(tokens, padded_tokens, size, seconds)

    engine.drain_rate.observe = observe  # type: ignore[method-assign]
    try:
        forward_before = server.call(lambda: engine.stats.forward_seconds)
        server.call(engine.hold)
        submit(server, 20)
        wait_until(lambda: queued(server) == 20, what="the sequences to be queued")
        server.call(engine.release)
        wait_until(lambda: len(recorder.batches) == 2, what="two batches running at once")
        recorder.gate.set()
        wait_until(lambda: len(observed) == 2, what="both batches to finish")
        forward = server.call(lambda: engine.stats.forward_seconds) - forward_before
    finally:
        engine.drain_rate.observe = real_observe  # type: ignore[method-assign]
    assert [size for size, _ in observed] == [10, 10]
    assert sum(seconds for _, seconds in observed) == pytest.approx(forward / 2)


def test_a_small_queue_waits_for_the_running_batch_and_a_large_one_does_not(
    server: InProcessServer, recorder: Recorder
) -> None:
    before = computed(server)
    submit(server, 1)
    wait_until(lambda: len(recorder.batches) == 1, what="the first batch to start")
    # Fewer than a quarter of a full batch (8): not worth the idle worker.
    submit(server, 7)
    wait_until(lambda: queued(server) == 7, what="the small request to be queued")
    assert recorder.running == 1 and len(recorder.batches) == 1
    # A quarter of a full batch: the idle worker takes the queue beside the running batch.
    submit(server, 1)
    wait_until(lambda: len(recorder.batches) == 2, what="a second batch beside the first")
    assert recorder.running == 2
    assert recorder.batches[0] == (1, 2, 2)
    assert recorder.batches[1] == (8, 1, 1)  # beside a 2-thread batch: the one left over
    # From its next layer on, the first batch gives that thread back (engine/runner.py).
    first, second = (count() if callable(count) else count for count in recorder.thread_counts)
    assert (first, second) == (1, 1)
    recorder.gate.set()
    wait_until(lambda: computed(server) == before + 9, what="every request to finish")
    assert queued(server) == 0


def test_a_failed_batch_fails_only_its_callers_while_the_other_worker_runs(
    server: InProcessServer, recorder: Recorder
) -> None:
    (engine,) = server.engines
    recorded_run = engine._runner.run
    poison = [9, 9, 9]

    def run(batch: Sequence[Sequence[int]], threads: ThreadCount = 0) -> np.ndarray:
        if list(batch[0]) == poison:
            raise RuntimeError("simulated device failure")
        return recorded_run(batch, threads)

    engine._runner.run = run  # type: ignore[method-assign]
    failures = server.call(lambda: engine.stats.forward_failures)
    long_running = submit(server, 10)
    wait_until(lambda: len(recorder.batches) == 1, what="the first batch to start")
    failed = submit(server, 8, poison)  # a quarter of a full batch: on the other worker
    wait_until(
        lambda: server.call(lambda: engine.stats.forward_failures) == failures + 1,
        what="the failed batch",
    )
    with pytest.raises(Exception, match="forward pass failed"):
        failed.result(30)
    assert recorder.running == 1 and not long_running.done()
    recorder.gate.set()
    assert len(long_running.result(30).outputs) == 10
    # Both workers are free again: a request that fills both still runs.
    assert len(submit(server, 20).result(30).outputs) == 20


# -- a next batch queued on a busy worker --------------------------------------------------


def start_three_full_batches(server: InProcessServer, recorder: Recorder, lane: Lane) -> None:
    """Two full batches running, one on each worker, and a third queued behind one of them."""
    (engine,) = server.engines
    queued_before, _ = next_batches(server)
    server.call(engine.hold)
    submit(server, 3 * MAX_BATCH_SIZE, lane=lane)
    wait_until(lambda: queued(server, lane) == 3 * MAX_BATCH_SIZE, what="the request to queue")
    server.call(engine.release)
    wait_until(lambda: len(recorder.started) == 2, what="a batch on each worker")
    wait_until(lambda: next_batches(server)[0] == queued_before + 1, what="a batch queued ahead")
    assert queued(server, lane) == 0  # nothing left for a second one
    assert [size for size, _ in recorder.started] == [MAX_BATCH_SIZE, MAX_BATCH_SIZE]


def test_a_full_batch_left_waits_on_a_busy_worker_which_starts_it_without_the_event_loop(
    server: InProcessServer, recorder: Recorder
) -> None:
    before = computed(server)
    start_three_full_batches(server, recorder, Lane.INTERACTIVE)
    # The event loop stops; the worker still goes on to the batch queued on it.
    loop_free = threading.Event()
    server.schedule(lambda: loop_free.wait(30))
    try:
        recorder.gate.set()
        wait_until(lambda: len(recorder.started) == 3, what="the queued batch, the loop stopped")
    finally:
        loop_free.set()
    size, thread = recorder.started[2]
    assert size == MAX_BATCH_SIZE
    assert thread in {worker for _, worker in recorder.started[:2]}
    wait_until(lambda: computed(server) == before + 3 * MAX_BATCH_SIZE, what="every batch")
    assert recorder.most_at_once == 2


def test_an_interactive_call_takes_back_the_bulk_batch_queued_on_a_worker(
    server: InProcessServer, recorder: Recorder
) -> None:
    before = computed(server)
    start_three_full_batches(server, recorder, Lane.BULK)
    _, recalled = next_batches(server)
    interactive = submit(server, 1)
    wait_until(lambda: next_batches(server)[1] == recalled + 1, what="the bulk batch recalled")
    # A lone interactive call is not queued on a busy worker: it waits in the queue for
    # whichever worker ends first. (The bulk batch may be queued ahead again, if its lane's
    # aging gives it the turn on a slow machine.)
    assert queued(server) == 1
    recorder.gate.set()
    assert len(interactive.result(30).outputs) == 1
    wait_until(lambda: computed(server) == before + 3 * MAX_BATCH_SIZE + 1, what="every batch")
    assert sorted(size for size, _ in recorder.started[2:]) == [1, MAX_BATCH_SIZE]
    queued_ahead, recalled_now = next_batches(server)
    # Both counts are series for operators.
    (engine,) = server.engines
    metrics = ServerMetrics("test")
    metrics.watch(engine)
    labels = {"model": engine.adapter.name}
    read = metrics.registry.get_sample_value
    assert read("embedserve_batches_queued_ahead_total", labels) == queued_ahead
    assert read("embedserve_batches_recalled_total", labels) == recalled_now
    assert recalled_now >= recalled + 1


def test_holding_the_engine_takes_back_a_batch_queued_on_a_worker(
    server: InProcessServer, recorder: Recorder
) -> None:
    (engine,) = server.engines
    before = computed(server)
    start_three_full_batches(server, recorder, Lane.INTERACTIVE)
    _, recalled = next_batches(server)
    server.call(engine.hold)
    assert next_batches(server)[1] == recalled + 1
    assert queued(server) == MAX_BATCH_SIZE
    recorder.gate.set()
    wait_until(lambda: computed(server) == before + 2 * MAX_BATCH_SIZE, what="the running two")
    assert len(recorder.started) == 2 and queued(server) == MAX_BATCH_SIZE  # held
    server.call(engine.release)
    wait_until(lambda: computed(server) == before + 3 * MAX_BATCH_SIZE, what="the third batch")

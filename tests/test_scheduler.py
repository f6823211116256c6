"""The scheduler alone: budget, length grouping, lanes, aging, deadlines and cancellation.

Requests are built by hand; time is a plain number handed to ``next_batch`` (the
scheduler never reads a clock), so nothing here depends on how fast the machine is.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from embedserve.service.engine.limits import BatchLimits
from embedserve.service.engine.scheduler import Scheduler
from embedserve.service.engine.throughput import DrainRate
from embedserve.service.engine.work import Lane, Outcome, QueuedSequence, WorkRequest


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    event_loop = asyncio.new_event_loop()
    try:
        yield event_loop
    finally:
        event_loop.close()


@dataclass
class Bench:
    """A Scheduler wired like the engine wires it: expiry marks the request and forgets it."""

    loop: asyncio.AbstractEventLoop
    limits: BatchLimits
    scheduler: Scheduler = field(init=False)
    expired: list[WorkRequest] = field(default_factory=list)
    # (lane, [(request, index, length)]) for every batch handed out, in order.
    batches: list[tuple[Lane, list[QueuedSequence]]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.scheduler = Scheduler(self.limits, self._expire)

    def _expire(self, request: WorkRequest) -> None:
        # What Engine._drop does, minus the future and the counters.
        if not request.live:
            return
        self.expired.append(request)
        request.outcome = Outcome.EXPIRED
        self.scheduler.forget(request)

    def add(
        self,
        lengths: list[int],
        *,
        lane: Lane = Lane.INTERACTIVE,
        at: float = 0.0,
        deadline: float | None = None,
    ) -> WorkRequest:
        # Token ids do not matter to the scheduler, only lengths; encode the position
        # so that a test can tell sequences apart.
        sequences = [[i] * n for i, n in enumerate(lengths)]
        request = WorkRequest(sequences, lane, deadline, at, self.loop.create_future())
        self.scheduler.enqueue(request)
        return request

    def cancel(self, request: WorkRequest) -> int:
        request.outcome = Outcome.CANCELLED
        return self.scheduler.forget(request)

    def next(self, now: float = 0.0, share: int = 1) -> list[QueuedSequence]:
        batch = self.scheduler.next_batch(now, share)
        if batch:
            lanes = {seq.request.lane for seq in batch}
            assert len(lanes) == 1, f"a batch mixes lanes: {lanes}"
            self.batches.append((lanes.pop(), batch))
            for seq in batch:
                assert seq.request.live, "a dead request's sequence was scheduled"
        return batch

    def drain(self, now: float = 0.0, limit: int = 100_000) -> list[list[QueuedSequence]]:
        out: list[list[QueuedSequence]] = []
        for _ in range(limit):
            batch = self.next(now)
            if not batch:
                return out
            out.append(batch)
        raise AssertionError("the scheduler never ran dry")


def make_bench(loop: asyncio.AbstractEventLoop, **limits: int | float) -> Bench:
    return Bench(loop, BatchLimits(**limits))  # type: ignore[arg-type]


def padded_cost(batch: list[QueuedSequence]) -> int:
    return len(batch) * max(seq.length for seq in batch)


def assert_within_limits(batch: list[QueuedSequence], limits: BatchLimits) -> None:
    assert 1 <= len(batch) <= limits.max_batch_size
    assert padded_cost(batch) <= limits.max_batch_tokens, [s.length for s in batch]


def fifo_padded_cost(lengths: list[int], limits: BatchLimits) -> int:
    """What batching in arrival order within the same budget would cost, padding included."""
    total = 0
    batch: list[int] = []
    for length in lengths:
        candidate = [*batch, length]
        fits = (
            len(candidate) <= limits.max_batch_size
            and len(candidate) * max(candidate) <= limits.max_batch_tokens
        )
        if not fits:
            total += len(batch) * max(batch)
            batch = [length]
        else:
            batch = candidate
    if batch:
        total += len(batch) * max(batch)
    return total


def keys(batch: list[QueuedSequence]) -> set[tuple[int, int]]:
    return {(id(seq.request), seq.index) for seq in batch}


# -- budget -------------------------------------------------------------------------


def test_batches_respect_token_budget_counting_padding(loop: asyncio.AbstractEventLoop) -> None:
    bench = make_bench(loop, max_batch_tokens=1000, max_batch_size=64)
    # 9 x 100 = 900 fits, but one 300-long sequence with them would pad all to 300.
    bench.add([100] * 9 + [300] + [100] * 9)
    batches = bench.drain()
    for batch in batches:
        assert_within_limits(batch, bench.limits)
    lengths = sorted(seq.length for batch in batches for seq in batch)
    assert lengths == sorted([100] * 18 + [300])
    # The raw token sum of the first batch would allow the 300 to ride along; padding forbids it.
    assert all(not (300 in {s.length for s in b} and len(b) > 3) for b in batches)


def test_batches_respect_max_batch_size(loop: asyncio.AbstractEventLoop) -> None:
    bench = make_bench(loop, max_batch_tokens=100_000, max_batch_size=7)
    bench.add([5] * 50)
    batches = bench.drain()
    assert [len(b) for b in batches] == [7] * 7 + [1]


def test_a_share_takes_its_part_of_the_lane_rounded_up_and_within_the_size(
    loop: asyncio.AbstractEventLoop,
) -> None:
    bench = make_bench(loop, max_batch_tokens=100_000, max_batch_size=16)
    bench.add([5] * 21)
    # Three batches starting together: 7 each (21 / 3), then what is left.
    assert [len(bench.next(share=3)), len(bench.next(share=2)), len(bench.next())] == [7, 7, 7]
    bench.add([5] * 5)
    assert len(bench.next(share=2)) == 3  # 5 / 2, rounded up: no sequence is left over
    bench.add([5] * 100)
    assert len(bench.next(share=2)) == 16  # never more than a full batch
    assert bench.scheduler.queued_sequences(Lane.INTERACTIVE) == 2 + 100 - 16


def test_long_request_is_split_across_batches_as_sequences(
    loop: asyncio.AbstractEventLoop,
) -> None:
    limits = {"max_batch_tokens": 512, "max_batch_size": 16}
    bench = make_bench(loop, **limits)
    rng = random.Random(7)
    request = bench.add([rng.randint(10, 60) for _ in range(100)])
    assert bench.scheduler.queued_sequences(Lane.INTERACTIVE) == 100
    batches = bench.drain()
    assert len(batches) > 1
    indices = sorted(seq.index for batch in batches for seq in batch)
    assert indices == list(range(100))
    for batch in batches:
        assert_within_limits(batch, bench.limits)
        assert all(seq.request is request for seq in batch)
    assert request.queued_count == 0 and request.queued_tokens == 0


def test_a_sequence_alone_may_fill_the_whole_budget(loop: asyncio.AbstractEventLoop) -> None:
    bench = make_bench(loop, max_batch_tokens=256, max_batch_size=8)
    bench.add([256, 1, 256])
    batches = bench.drain()
    assert [sorted(s.length for s in b) for b in batches] == [[256], [1], [256]]


# -- length grouping and progress -------------------------------------------------------


def test_length_grouping_pads_far_less_than_fifo(loop: asyncio.AbstractEventLoop) -> None:
    bench = make_bench(loop, max_batch_tokens=2048, max_batch_size=64)
    rng = random.Random(11)
    lengths = [rng.randint(8, 16) if i % 2 == 0 else rng.randint(200, 256) for i in range(400)]
    # Many small requests in arrival order, as the transport would enqueue them.
    for start in range(0, len(lengths), 4):
        bench.add(lengths[start : start + 4], at=float(start))
    batches = bench.drain(now=1000.0)
    for batch in batches:
        assert_within_limits(batch, bench.limits)
    grouped = sum(padded_cost(b) for b in batches)
    fifo = fifo_padded_cost(lengths, bench.limits)
    real = sum(lengths)
    # FIFO pads every short sequence to a long one; grouping keeps padding small.
    assert grouped < 0.7 * fifo, (grouped, fifo, real)
    assert grouped < 1.25 * real, (grouped, real)
    # Most batches hold sequences of one kind: short with short, long with long.
    pure = sum(1 for b in batches if max(s.length for s in b) - min(s.length for s in b) < 100)
    assert pure >= len(batches) - 2


def test_oldest_sequence_is_always_in_the_next_batch(loop: asyncio.AbstractEventLoop) -> None:
    bench = make_bench(loop, max_batch_tokens=1024, max_batch_size=32, grouping_window=64)
    rng = random.Random(3)
    order: list[tuple[int, int]] = []
    for r in range(60):
        request = bench.add([rng.choice([4, 8, 200, 500, 1000]) for _ in range(5)], at=float(r))
        order.extend((id(request), i) for i in range(5))
    done: set[tuple[int, int]] = set()
    while True:
        batch = bench.next(now=100.0)
        if not batch:
            break
        oldest = next(key for key in order if key not in done)
        assert oldest in keys(batch), "the oldest queued sequence was passed over"
        done |= keys(batch)
    assert done == set(order)


def test_oldest_across_lanes_is_in_the_next_batch(loop: asyncio.AbstractEventLoop) -> None:
    # Bulk's aged time is the later of its arrival and the bulk lane's last batch, plus the
    # aging delay; interactive's is its arrival. The next batch holds the smallest.
    aging = 5.0
    bench = make_bench(loop, max_batch_tokens=256, max_batch_size=4, bulk_aging_s=aging)
    rng = random.Random(5)
    arrival: dict[tuple[int, int], tuple[Lane, float]] = {}
    for r in range(40):
        lane = Lane.BULK if r % 3 else Lane.INTERACTIVE
        at = r * 0.5 + 0.01 * (lane is Lane.BULK)  # no ties between lanes after aging
        request = bench.add([rng.randint(1, 64) for _ in range(3)], lane=lane, at=at)
        for i in range(3):
            arrival[(id(request), i)] = (lane, at)
    bulk_served = float("-inf")

    def aged(key: tuple[int, int]) -> float:
        lane, at = arrival[key]
        return at if lane is Lane.INTERACTIVE else max(at, bulk_served) + aging

    now = 0.0
    while True:
        now += 0.7  # bulk's last batch moves its clock; time moves on between batches
        batch = bench.next(now=now)
        if not batch:
            break
        oldest = min(arrival, key=aged)
        assert oldest in keys(batch)
        if batch[0].request.lane is Lane.BULK:
            bulk_served = now
        for key in keys(batch):
            del arrival[key]
    assert not arrival


def test_a_bulk_backlog_does_not_delay_new_interactive_calls(
    loop: asyncio.AbstractEventLoop,
) -> None:
    # A stream keeps a backlog far older than the aging delay; once the bulk lane has had a
    # batch, a new interactive call goes next, not behind the backlog.
    bench = make_bench(loop, max_batch_tokens=40, max_batch_size=4, bulk_aging_s=1.0)
    for _ in range(20):
        bench.add([10] * 4, lane=Lane.BULK, at=0.0)
    assert bench.next(now=10.0)[0].request.lane is Lane.BULK  # aged long ago: goes first
    interactive = bench.add([10], lane=Lane.INTERACTIVE, at=10.05)
    assert {s.request for s in bench.next(now=10.1)} == {interactive}
    # With no interactive work left, bulk carries on at once.
    assert bench.next(now=10.2)[0].request.lane is Lane.BULK
    # And once bulk has waited its delay since its last batch, it goes before newer calls.
    late = bench.add([10], lane=Lane.INTERACTIVE, at=11.5)
    assert bench.next(now=11.6)[0].request.lane is Lane.BULK
    assert {s.request for s in bench.next(now=11.7)} == {late}


# -- lanes and aging ----------------------------------------------------------------------


def test_interactive_goes_before_bulk(loop: asyncio.AbstractEventLoop) -> None:
    bench = make_bench(loop, max_batch_tokens=64, max_batch_size=2, bulk_aging_s=1.0)
    bulk = bench.add([10] * 4, lane=Lane.BULK, at=0.0)
    interactive = bench.add([10] * 4, lane=Lane.INTERACTIVE, at=0.5)
    batches = bench.drain(now=0.6)
    owners = [b[0].request for b in batches]
    assert owners == [interactive, interactive, bulk, bulk]


def test_aged_bulk_goes_before_newer_interactive(loop: asyncio.AbstractEventLoop) -> None:
    bench = make_bench(loop, max_batch_tokens=64, max_batch_size=2, bulk_aging_s=1.0)
    bulk = bench.add([10] * 2, lane=Lane.BULK, at=0.0)
    # Arrives after bulk's aged time (0.0 + 1.0): bulk has waited long enough.
    late = bench.add([10] * 2, lane=Lane.INTERACTIVE, at=1.5)
    first = bench.next(now=1.6)
    assert {s.request for s in first} == {bulk}
    assert {s.request for s in bench.next(now=1.6)} == {late}


def test_bulk_is_not_starved_by_a_steady_interactive_stream(
    loop: asyncio.AbstractEventLoop,
) -> None:
    bench = make_bench(loop, max_batch_tokens=40, max_batch_size=4, bulk_aging_s=1.0)
    bulk = bench.add([10], lane=Lane.BULK, at=0.0)
    served_at: float | None = None
    for step in range(100):
        now = step * 0.1
        bench.add([10] * 4, lane=Lane.INTERACTIVE, at=now)  # always more interactive work
        batch = bench.next(now)
        if any(s.request is bulk for s in batch):
            served_at = now
            break
    assert served_at is not None, "bulk work starved behind interactive work"
    assert served_at <= 1.0 + 4 * 0.1  # served once its aged time comes up, not never


def test_batches_are_lane_pure(loop: asyncio.AbstractEventLoop) -> None:
    bench = make_bench(loop, max_batch_tokens=10_000, max_batch_size=64, bulk_aging_s=0.0)
    for r in range(20):
        lane = Lane.BULK if r % 2 else Lane.INTERACTIVE
        bench.add([12] * 3, lane=lane, at=float(r))
    bench.drain(now=100.0)  # Bench.next asserts purity on every batch
    assert {lane for lane, _ in bench.batches} == {Lane.BULK, Lane.INTERACTIVE}
    for lane, batch in bench.batches:
        assert all(s.request.lane is lane for s in batch)


# -- deadlines and cancellation -----------------------------------------------------------


def test_expired_requests_are_dropped_before_batching(loop: asyncio.AbstractEventLoop) -> None:
    bench = make_bench(loop, max_batch_tokens=10_000, max_batch_size=64)
    stale = bench.add([10] * 5, at=0.0, deadline=1.0)
    exact = bench.add([10] * 2, at=0.1, deadline=2.0)  # deadline == now counts as expired
    fresh = bench.add([10] * 3, at=0.2, deadline=10.0)
    forever = bench.add([10] * 4, at=0.3)
    batch = bench.next(now=2.0)
    assert {s.request for s in batch} == {fresh, forever}
    assert len(batch) == 7
    assert bench.expired == [stale, exact]
    assert stale.outcome is Outcome.EXPIRED and exact.outcome is Outcome.EXPIRED
    assert bench.scheduler.queued_tokens(Lane.INTERACTIVE) == 0
    assert bench.scheduler.queued_sequences(Lane.INTERACTIVE) == 0
    assert bench.scheduler.empty
    assert not bench.next(now=2.0)


def test_expired_behind_a_live_head_is_dropped_too(loop: asyncio.AbstractEventLoop) -> None:
    bench = make_bench(loop, max_batch_tokens=10_000, max_batch_size=64)
    head = bench.add([10] * 2, at=0.0)
    stale = bench.add([10] * 3, at=0.1, deadline=1.0)
    tail = bench.add([10], at=0.2)
    batch = bench.next(now=1.0)
    assert {s.request for s in batch} == {head, tail}
    assert bench.expired == [stale]
    assert bench.scheduler.empty


def test_expiry_in_the_other_lane_is_noticed(loop: asyncio.AbstractEventLoop) -> None:
    bench = make_bench(loop, max_batch_tokens=10_000, max_batch_size=64, bulk_aging_s=100.0)
    stale_bulk = bench.add([10] * 3, lane=Lane.BULK, at=0.0, deadline=1.0)
    interactive = bench.add([10], at=0.5)
    batch = bench.next(now=5.0)
    assert {s.request for s in batch} == {interactive}
    assert bench.expired == [stale_bulk]
    assert bench.scheduler.queued_tokens(Lane.BULK) == 0
    assert bench.scheduler.empty


def test_the_grouping_window_fills_past_dead_sequences(loop: asyncio.AbstractEventLoop) -> None:
    # The window holds 2 sequences; the 6 of a cancelled request ahead do not take its room.
    bench = make_bench(loop, max_batch_tokens=1_000, max_batch_size=2, grouping_window=2)
    gone = bench.add([5] * 6, at=0.0)
    stale = bench.add([5] * 2, at=0.1, deadline=1.0)
    live = bench.add([20, 5, 5], at=0.2)
    bench.cancel(gone)
    batch = bench.next(now=1.0)
    assert [(s.request, s.index) for s in batch] == [(live, 0), (live, 1)]
    assert bench.expired == [stale]
    assert [(s.request, s.index) for s in bench.next(now=1.0)] == [(live, 2)]
    assert bench.scheduler.empty


def test_expiry_after_some_sequences_ran(loop: asyncio.AbstractEventLoop) -> None:
    bench = make_bench(loop, max_batch_tokens=20, max_batch_size=2)
    request = bench.add([10] * 6, deadline=5.0)
    assert len(bench.next(now=1.0)) == 2
    assert bench.scheduler.queued_sequences(Lane.INTERACTIVE) == 4
    assert not bench.next(now=5.0)
    assert bench.expired == [request]
    assert bench.scheduler.queued_sequences(Lane.INTERACTIVE) == 0
    assert bench.scheduler.queued_tokens(Lane.INTERACTIVE) == 0


def test_forget_subtracts_and_cancelled_sequences_never_run(
    loop: asyncio.AbstractEventLoop,
) -> None:
    bench = make_bench(loop, max_batch_tokens=100, max_batch_size=4)
    keep = bench.add([10, 20, 30], at=0.0)
    gone = bench.add([5] * 10, at=0.1)
    also = bench.add([7, 7], at=0.2)
    scheduler = bench.scheduler
    assert scheduler.queued_tokens(Lane.INTERACTIVE) == 60 + 50 + 14
    assert scheduler.queued_sequences(Lane.INTERACTIVE) == 15
    assert bench.cancel(gone) == 10
    assert scheduler.queued_tokens(Lane.INTERACTIVE) == 74
    assert scheduler.queued_sequences(Lane.INTERACTIVE) == 5
    assert bench.cancel(gone) == 0  # forgetting twice changes nothing
    assert scheduler.queued_sequences(Lane.INTERACTIVE) == 5
    batches = bench.drain()
    scheduled = [s for b in batches for s in b]
    assert all(s.request is not gone for s in scheduled)
    assert sorted((s.request is keep, s.length) for s in scheduled) == sorted(
        [(True, 10), (True, 20), (True, 30), (False, 7), (False, 7)]
    )
    assert also.queued_count == 0
    assert scheduler.queued_tokens(Lane.INTERACTIVE) == 0
    assert scheduler.queued_sequences(Lane.INTERACTIVE) == 0


def test_cancel_midway_drops_only_the_unscheduled_rest(loop: asyncio.AbstractEventLoop) -> None:
    bench = make_bench(loop, max_batch_tokens=40, max_batch_size=4)
    request = bench.add([10] * 10)
    first = bench.next()
    assert len(first) == 4
    assert bench.cancel(request) == 6
    assert bench.scheduler.queued_tokens(Lane.INTERACTIVE) == 0
    assert not bench.next()
    assert bench.scheduler.empty


def test_a_requeued_batch_comes_back_first_and_whole(loop: asyncio.AbstractEventLoop) -> None:
    """A batch queued on a worker and taken back before it ran (engine.py,
    ``_recall_next_batches``) is the next batch again, with the counts as before."""
    bench = make_bench(loop, max_batch_tokens=100, max_batch_size=4)
    bench.add([10] * 6, at=0.0)
    bench.add([10] * 2, at=0.1)
    scheduler = bench.scheduler
    first = bench.next()
    assert len(first) == 4
    assert scheduler.queued_sequences(Lane.INTERACTIVE) == 4
    scheduler.requeue(first)
    assert scheduler.queued_sequences(Lane.INTERACTIVE) == 8
    assert scheduler.queued_tokens(Lane.INTERACTIVE) == 80
    assert keys(bench.next()) == keys(first)
    assert sum(len(b) for b in bench.drain()) == 4
    assert scheduler.empty and scheduler.queued_tokens(Lane.INTERACTIVE) == 0


def test_a_requeued_batch_leaves_out_requests_that_ended_meanwhile(
    loop: asyncio.AbstractEventLoop,
) -> None:
    bench = make_bench(loop, max_batch_tokens=100, max_batch_size=4)
    ended = bench.add([10, 10], at=0.0)
    kept = bench.add([20, 20], at=0.1)
    bench.add([30], at=0.2, lane=Lane.BULK)
    batch = bench.next()
    assert {seq.request for seq in batch} == {ended, kept}
    bench.cancel(ended)  # nothing of it is queued: forgetting takes nothing off
    bench.scheduler.requeue(batch)
    assert bench.scheduler.queued_sequences(Lane.INTERACTIVE) == 2
    assert bench.scheduler.queued_tokens(Lane.INTERACTIVE) == 40
    assert (kept.queued_count, kept.queued_tokens, ended.queued_count) == (2, 40, 0)
    assert bench.scheduler.next_lane(0.0) is Lane.INTERACTIVE
    assert [seq.request for seq in bench.next()] == [kept, kept]
    assert bench.scheduler.next_lane(0.0) is Lane.BULK
    bench.next()
    assert bench.scheduler.next_lane(0.0) is None


def test_queued_tokens_per_lane_return_to_zero(loop: asyncio.AbstractEventLoop) -> None:
    bench = make_bench(loop, max_batch_tokens=512, max_batch_size=8, bulk_aging_s=0.5)
    interactive = [bench.add([9, 17, 33], at=float(i)) for i in range(5)]
    bulk = [bench.add([40] * 6, lane=Lane.BULK, at=float(i) + 0.25) for i in range(5)]
    scheduler = bench.scheduler
    assert scheduler.queued_tokens(Lane.INTERACTIVE) == 5 * 59
    assert scheduler.queued_tokens(Lane.BULK) == 5 * 240
    assert scheduler.queued_sequences(Lane.BULK) == 30
    assert not scheduler.empty
    while batch := bench.next(now=50.0):
        lane = batch[0].request.lane
        requests = interactive if lane is Lane.INTERACTIVE else bulk
        assert scheduler.queued_tokens(lane) == sum(r.queued_tokens for r in requests)
        assert scheduler.queued_sequences(lane) == sum(r.queued_count for r in requests)
    for lane in Lane:
        assert scheduler.queued_tokens(lane) == 0
        assert scheduler.queued_sequences(lane) == 0
    assert scheduler.empty


# -- property -------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(12))
def test_random_workloads_schedule_every_live_sequence_once(
    loop: asyncio.AbstractEventLoop, seed: int
) -> None:
    rng = random.Random(seed)
    limits = BatchLimits(
        max_batch_tokens=rng.choice([64, 128, 512, 2048]),
        max_batch_size=rng.choice([1, 2, 5, 16, 64]),
        bulk_aging_s=rng.choice([0.0, 0.3, 2.0]),
        grouping_window=rng.choice([1, 8, 64, 512]),
    )
    bench = Bench(loop, limits)
    scheduler = bench.scheduler
    requests: list[WorkRequest] = []
    scheduled: dict[tuple[int, int], int] = {}
    dropped_at: dict[int, int] = {}  # request id -> number of batches before its drop
    now = 0.0

    def check_accounting() -> None:
        for lane in Lane:
            mine = [r for r in requests if r.lane is lane and r.live]
            assert scheduler.queued_tokens(lane) == sum(r.queued_tokens for r in mine)
            assert scheduler.queued_sequences(lane) == sum(r.queued_count for r in mine)
            for r in requests:
                if not r.live:
                    assert r.queued_count == 0 and r.queued_tokens == 0

    for _ in range(300):
        now += rng.uniform(0.0, 0.2)
        action = rng.random()
        if action < 0.45:
            count = rng.choice([1, 1, 2, 3, 8, 30])
            lengths = [rng.randint(1, limits.max_batch_tokens) for _ in range(count)]
            if rng.random() < 0.7:
                lengths = [max(1, n // rng.choice([1, 4, 16])) for n in lengths]
            deadline = now + rng.uniform(0.0, 3.0) if rng.random() < 0.3 else None
            lane = rng.choice(list(Lane))
            requests.append(bench.add(lengths, lane=lane, at=now, deadline=deadline))
        elif action < 0.55 and requests:
            victim = rng.choice(requests)
            if victim.live:
                expected = victim.queued_count
                assert bench.cancel(victim) == expected
                dropped_at[id(victim)] = len(bench.batches)
        else:
            before = len(bench.expired)
            batch = bench.next(now)
            for request in bench.expired[before:]:
                dropped_at[id(request)] = len(bench.batches) - (1 if batch else 0)
                assert request.deadline is not None and request.deadline <= now
            if batch:
                assert_within_limits(batch, limits)
                for seq in batch:
                    key = (id(seq.request), seq.index)
                    scheduled[key] = scheduled.get(key, 0) + 1
                    if seq.request.deadline is not None:
                        assert seq.request.deadline > now
        check_accounting()

    # Drain later on: whatever has a deadline by then expires, the rest runs.
    now += 1.5
    while True:
        before = len(bench.expired)
        batch = bench.next(now)
        for request in bench.expired[before:]:
            dropped_at[id(request)] = len(bench.batches) - (1 if batch else 0)
        if not batch:
            break
        assert_within_limits(batch, limits)
        for seq in batch:
            key = (id(seq.request), seq.index)
            scheduled[key] = scheduled.get(key, 0) + 1
    check_accounting()
    for lane in Lane:
        assert scheduler.queued_tokens(lane) == 0
        assert scheduler.queued_sequences(lane) == 0
    assert scheduler.empty

    assert all(n == 1 for n in scheduled.values()), "a sequence was scheduled twice"
    for request in requests:
        ran = {i for i in range(len(request.sequences)) if (id(request), i) in scheduled}
        if request.live:
            assert ran == set(range(len(request.sequences))), "a live sequence never ran"
        else:
            assert id(request) in dropped_at
    # Nothing of a dropped request ran after its drop.
    for index, (_, batch) in enumerate(bench.batches):
        for seq in batch:
            drop = dropped_at.get(id(seq.request))
            assert drop is None or index < drop
    assert len(requests) > 50 and scheduled


# -- the drain rate behind admission by expected wait ---------------------------------------


def test_drain_rate_counts_only_full_batches() -> None:
    rate = DrainRate(max_batch_tokens=1000, max_batch_size=10, weight=0.5)
    assert rate.seconds_for(100) is None  # nothing measured: no estimate
    rate.observe(tokens=10, padded_tokens=10, size=1, seconds=1.0)  # an idle server's batch
    assert rate.seconds_for(100) is None
    rate.observe(tokens=900, padded_tokens=1000, size=10, seconds=0.5)  # 1800 tokens/s
    assert rate.seconds_for(900) == pytest.approx(0.5)
    rate.observe(tokens=600, padded_tokens=600, size=6, seconds=1.0)  # 600/s, smoothed
    assert rate.tokens_per_s == pytest.approx(1200.0)
    rate.observe(tokens=0, padded_tokens=0, size=0, seconds=0.0)  # nothing to learn from
    assert rate.tokens_per_s == pytest.approx(1200.0)

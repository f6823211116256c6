"""What runs next: lanes, aging, deadlines, token budget and length grouping.

Pure bookkeeping with no I/O and no threads: the engine calls it from the event loop
between forward passes, so it is the one owner of the queue state.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from embedserve.service.engine.limits import BatchLimits
from embedserve.service.engine.work import Lane, QueuedSequence, WorkRequest


class _LaneQueue:
    """Sequences of one lane in arrival order. Dead entries are skipped lazily."""

    def __init__(self, lane: Lane, delay_s: float) -> None:
        self.lane = lane
        # Bulk work competes as if it had arrived this much later (aging).
        self.delay_s = delay_s
        self.items: deque[QueuedSequence] = deque()
        self.tokens = 0
        self.count = 0
        # When this lane last got a batch. A delayed lane's aging clock starts at the later
        # of its head's arrival and this: otherwise a backlog older than the delay (a bulk
        # stream keeps one) would outrank every new interactive call, and interactive
        # latency would become the backlog's length instead of one batch.
        self.last_served = float("-inf")

    def aged_time(self, head: QueuedSequence) -> float:
        if self.delay_s == 0.0:
            return head.request.enqueued_at
        return max(head.request.enqueued_at, self.last_served) + self.delay_s

    def head(self, expire: Callable[[WorkRequest], None], now: float) -> QueuedSequence | None:
        while self.items:
            seq = self.items[0]
            request = seq.request
            if request.live and request.deadline is not None and request.deadline <= now:
                expire(request)
            if request.live:
                return seq
            self.items.popleft()
        return None


class Scheduler:
    def __init__(self, limits: BatchLimits, expire: Callable[[WorkRequest], None]) -> None:
        self.limits = limits
        self._expire = expire
        self._lanes = {
            Lane.INTERACTIVE: _LaneQueue(Lane.INTERACTIVE, 0.0),
            Lane.BULK: _LaneQueue(Lane.BULK, limits.bulk_aging_s),
        }

    def queued_tokens(self, lane: Lane) -> int:
        return self._lanes[lane].tokens

    def queued_sequences(self, lane: Lane) -> int:
        return self._lanes[lane].count

    @property
    def empty(self) -> bool:
        return all(q.count == 0 for q in self._lanes.values())

    def enqueue(self, request: WorkRequest) -> None:
        queue = self._lanes[request.lane]
        queue.items.extend(
            QueuedSequence(request, i, len(ids)) for i, ids in enumerate(request.sequences)
        )
        queue.tokens += request.queued_tokens
        queue.count += request.queued_count

    def forget(self, request: WorkRequest) -> int:
        """Account for a request that will not run (expired, cancelled); its entries die lazily.

        Returns how many of its sequences were never computed.
        """
        queue = self._lanes[request.lane]
        dropped = request.queued_count
        queue.tokens -= request.queued_tokens
        queue.count -= dropped
        request.queued_tokens = request.queued_count = 0
        return dropped

    def requeue(self, batch: list[QueuedSequence]) -> None:
        """Put back a batch from ``next_batch`` that never ran, at the head of its lane and
        in its order: it was the oldest work there. Sequences of requests that ended since
        (expired, cancelled) are left out, as ``forget`` already took them off the counts."""
        if not batch:
            return
        queue = self._lanes[batch[0].request.lane]
        back = [seq for seq in batch if seq.request.live]
        queue.items.extendleft(reversed(back))
        for seq in back:
            request = seq.request
            request.queued_count += 1
            request.queued_tokens += seq.length
            queue.count += 1
            queue.tokens += seq.length

    def next_batch(self, now: float, share: int = 1) -> list[QueuedSequence]:
        """The next forward pass: the oldest live sequence (by aged time) and the queued
        sequences of its lane closest to it in length, within the budget.

        Interactive work goes first; bulk work gets a batch once it has waited
        ``bulk_aging_s`` since it arrived or since the bulk lane's last batch, whichever is
        later. So bulk is served at least once every ``bulk_aging_s`` under any interactive
        load, and an interactive call waits at most for the batch already running.

        ``share``: how many batches are starting now (one a free forward worker). The batch
        takes at most its share of the lane, so that a queue smaller than that many full
        batches is split among the workers instead of leaving all but one idle."""
        queue = self._pick_lane(now)
        if queue is None:
            return []
        size = min(self.limits.max_batch_size, -(-queue.count // max(1, share)))
        pool = self._take_window(queue, now)
        chosen, rest = self._group_by_length(pool, size)
        queue.items.extendleft(reversed(rest))
        queue.last_served = now
        for seq in chosen:
            request = seq.request
            request.queued_count -= 1
            request.queued_tokens -= seq.length
            queue.count -= 1
            queue.tokens -= seq.length
        return chosen

    def next_lane(self, now: float) -> Lane | None:
        """The lane ``next_batch`` takes from now, or None when nothing is queued."""
        queue = self._pick_lane(now)
        return None if queue is None else queue.lane

    def _pick_lane(self, now: float) -> _LaneQueue | None:
        best: _LaneQueue | None = None
        best_time = 0.0
        for queue in self._lanes.values():
            head = queue.head(self._expire, now)
            if head is None:
                continue
            aged = queue.aged_time(head)
            if best is None or aged < best_time:
                best, best_time = queue, aged
        return best

    def _take_window(self, queue: _LaneQueue, now: float) -> list[QueuedSequence]:
        # On the event loop between forward passes, and a forward worker waits for the GIL
        # while it runs: a request's sequences lie together, so each is checked once.
        pool: list[QueuedSequence] = []
        window = max(self.limits.grouping_window, self.limits.max_batch_size)
        items = queue.items
        checked: WorkRequest | None = None
        taken = True
        while items and len(pool) < window:
            popleft = items.popleft
            for seq in [popleft() for _ in range(min(len(items), window - len(pool)))]:
                request = seq.request
                if request is not checked:
                    checked = request
                    if request.live and request.deadline is not None and request.deadline <= now:
                        self._expire(request)
                    taken = request.live
                if taken:
                    pool.append(seq)
        return pool

    def _group_by_length(
        self, pool: list[QueuedSequence], max_size: int
    ) -> tuple[list[QueuedSequence], list[QueuedSequence]]:
        """Grow a batch around the oldest sequence, adding the neighbours in length order
        that are closest to it, while count x longest stays within the token budget."""
        budget = self.limits.max_batch_tokens
        by_position = [seq.length for seq in pool]
        # A stable sort: equal lengths stay in arrival order.
        order = sorted(range(len(pool)), key=by_position.__getitem__)
        lengths = [by_position[i] for i in order]
        seed = order.index(0)
        lo = hi = seed
        target = lengths[seed]
        while hi - lo + 1 < max_size:
            count = hi - lo + 2
            fits_lo = lo > 0 and count * lengths[hi] <= budget
            fits_hi = hi + 1 < len(order) and count * lengths[hi + 1] <= budget
            if fits_lo and fits_hi:
                if target - lengths[lo - 1] <= lengths[hi + 1] - target:
                    lo -= 1
                else:
                    hi += 1
            elif fits_lo:
                lo -= 1
            elif fits_hi:
                hi += 1
            else:
                break
        picked = sorted(order[lo : hi + 1])
        chosen = [pool[i] for i in picked]
        left = [True] * len(pool)
        for i in picked:
            left[i] = False
        rest = [seq for seq, keep in zip(pool, left, strict=True) if keep]
        return chosen, rest

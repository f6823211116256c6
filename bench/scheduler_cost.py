"""What one ``Scheduler.next_batch`` costs on the event loop (docs/benchmarks.md, "The
nineteenth session").

    python -m bench.scheduler_cost [--items 16] [--texts 64] [--repeats 300]

A bulk stream keeps ``--items`` requests of ``--texts`` sequences queued (the server's
default stream window of 16 items of 64 texts, 1,024 sequences), so each batch scans the
grouping window (512 sequences by default) and length-groups it. A forward worker that
needs the GIL waits while this runs. Prints the median microseconds of one call, taken on
a fresh queue each repeat.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time

from embedserve.service.engine.limits import BatchLimits
from embedserve.service.engine.scheduler import Scheduler
from embedserve.service.engine.work import Lane, WorkRequest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.scheduler_cost", description=__doc__)
    parser.add_argument("--items", type=int, default=16)
    parser.add_argument("--texts", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=300)
    args = parser.parse_args(argv)
    rng = random.Random(0)
    loop = asyncio.new_event_loop()
    timings = []
    try:
        for _ in range(args.repeats):
            scheduler = Scheduler(BatchLimits(), lambda request: None)
            for _ in range(args.items):
                sequences = [[0] * rng.randint(8, 40) for _ in range(args.texts)]
                request = WorkRequest(sequences, Lane.BULK, None, 0.0, loop.create_future())
                scheduler.enqueue(request)
            started = time.perf_counter()
            scheduler.next_batch(100.0, share=2)
            timings.append(time.perf_counter() - started)
    finally:
        loop.close()
    queued = args.items * args.texts
    print(
        json.dumps({"queued_sequences": queued, "next_batch_us": 1e6 * statistics.median(timings)})
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

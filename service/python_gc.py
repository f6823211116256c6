"""Keeping Python's cycle collector from pausing the server for the objects it started with.

After the model is loaded and warmed up, the process holds about 400,000 Python objects
(torch, transformers, the tokenizer, gRPC), nearly all of them for its whole life. A full
collection of the cycle collector walks all of them, and took 185-196 ms here: the event
loop stops for that long, which showed as the p99 of calls refused in about 5 ms at p50
(docs/benchmarks.md, ninth session). ``gc.freeze()`` moves every object alive at that point
into a generation the collector never scans, so a full collection walks only what serving
created since. What is frozen is never freed by the cycle collector, hence the collection
just before it, and the freeze only once the server is warm.
"""

from __future__ import annotations

import gc
import logging
import time

log = logging.getLogger(__name__)


def freeze_startup_objects() -> int:
    """Collect, then freeze what is left; returns how many objects were frozen."""
    began = time.perf_counter()
    gc.collect()
    gc.freeze()
    collected_in = time.perf_counter() - began
    frozen = gc.get_freeze_count()
    began = time.perf_counter()
    gc.collect()
    log.info(
        "startup objects frozen",
        extra={
            "objects": frozen,
            "full_collection_ms_before": round(collected_in * 1000, 1),
            "full_collection_ms_after": round((time.perf_counter() - began) * 1000, 1),
        },
    )
    return frozen

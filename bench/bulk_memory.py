"""Host memory of a bulk stream, server configurations interleaved.

    python -m bench.bulk_memory [--texts 60000] [--rounds 2] [--out FILE]
        [--config NAME=ARGS ...] [--python NAME=INTERPRETER ...]

Each configuration gets a fresh ``embedserve serve`` per round (its ``ARGS`` appended), in
turn, round after round, and one ``EmbedStream`` of ``--texts`` bulk-corpus texts. The
server's VmRSS is sampled every 0.5 s. Growth shows as the largest VmRSS from 80 s on
(where the 200k-text runs had levelled off) against the largest within the first 35 s
(what a 20k-text run lasts here). ``busy_workers`` is the growth of
``embedserve_forward_duration_seconds_sum`` over the stream against its wall clock: how many
forward workers were inside a batch on average (2.0: both, all the time; what is missing is
time between batches).
The default configurations compare the host memory trim on and off
(``--memory-trim-interval-ms``).
``--python NAME=INTERPRETER`` runs configuration NAME on another interpreter, so that another
checkout's ``embedserve`` can be measured against this one.
Prints one JSON document (also written to --out). Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

from bench import procs
from bench.loadgen import BulkSpec, bulk_result, start_bulk

EARLY_S = 35.0
LATE_S = 80.0
DEFAULT_CONFIGS = ("trim-default=", "trim-off=--memory-trim-interval-ms 0")


def one_run(
    name: str, args: list[str], texts: int, threads: int, log_dir: Path, python: str
) -> dict[str, Any]:
    metrics_port = procs.free_port()
    server = procs.wait_serving_log(
        procs.start_embedserve(
            name, log_dir, threads, [*args, "--metrics-port", str(metrics_port)], python=python
        )
    )
    try:
        before = server.memory()
        forward_before = forward_seconds(metrics_port)
        with server.sampling_memory() as samples:
            result = bulk_result(start_bulk(BulkSpec(target=server.address, count=texts)))
        forward = forward_seconds(metrics_port) - forward_before
        after = server.memory()
    finally:
        server.stop(30)
    early = max((rss for t, rss, _ in samples if t <= EARLY_S), default=0.0)
    late = max((rss for t, rss, _ in samples if t >= LATE_S), default=0.0)
    return {
        "tokens_per_s": result["tokens_per_s"],
        "elapsed_s": result["elapsed_s"],
        "busy_workers": forward / result["elapsed_s"],
        "rss_before_mib": before.get("VmRSS"),
        "peak_rss_mib": after.get("VmHWM"),
        "max_rss_first_35s_mib": early,
        "max_rss_from_80s_mib": late,
        "growth": late / early - 1 if early and late else None,  # None: too short a run
        "rss_samples": samples,
    }


def forward_seconds(metrics_port: int) -> float:
    """The server's forward passes so far, in seconds (summed over its workers)."""
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in procs.metrics_text(metrics_port).splitlines()
        if line.startswith("embedserve_forward_duration_seconds_sum")
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=60_000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--config",
        action="append",
        help="NAME=ARGS: server flags of one configuration (repeatable)",
    )
    parser.add_argument(
        "--python",
        action="append",
        default=[],
        help="NAME=INTERPRETER: run configuration NAME on another interpreter (repeatable)",
    )
    parser.add_argument("--out", type=Path)
    options = parser.parse_args()
    interpreters = dict(text.split("=", 1) for text in options.python)
    configs = [procs.named_flags(c) for c in (options.config or DEFAULT_CONFIGS)]
    log_dir = Path(options.out or "bench/results/bulk-memory").with_suffix("") / "logs"
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name, _ in configs}
    for round_index in range(options.rounds):
        for name, args in configs:
            python = interpreters.get(name, sys.executable)
            run = one_run(
                f"{name}-{round_index}", args, options.texts, options.threads, log_dir, python
            )
            runs[name].append(run)
            summary = {k: v for k, v in run.items() if k != "rss_samples"}
            print(json.dumps({"config": name, "round": round_index, **summary}), flush=True)
    report = {
        "texts": options.texts,
        "rounds": options.rounds,
        "configs": dict(configs),
        "interpreters": interpreters,
        "median": {
            name: {
                key: statistics.median(values)
                if (values := [r[key] for r in rs if r[key] is not None])
                else None
                for key in ("tokens_per_s", "busy_workers", "peak_rss_mib", "growth")
            }
            for name, rs in runs.items()
        },
        "runs": runs,
    }
    text = json.dumps(report, indent=2)
    if options.out is not None:
        options.out.parent.mkdir(parents=True, exist_ok=True)
        options.out.write_text(text)
    print(json.dumps(report["median"], indent=2))


if __name__ == "__main__":
    main()

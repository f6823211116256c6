"""Servers side by side: where one call's time goes at concurrency 1, and unary loads.

    python -m bench.server_ab [--calls 400] [--loads 1,8,64] [--rounds 3]
                              [--workload short|mixed|rerank] [--documents 20]
                              [--server NAME=FLAGS]... [--python NAME=INTERPRETER]...

Each server is an ``embedserve serve`` process (the packaged MiniLM, 2 torch threads).
First, one synchronous client sends one short sentence a call, one call at a time, and each
answer's ``Timing`` splits the round trip:

- ``forward``: the model's forward pass on the worker (``Timing.inference``);
- ``server_other``: the rest of the server's own time (``Timing.total`` less the forward),
  of which ``tokenization`` and ``queue`` are in ``Timing`` too, and ``rest`` is the hops
  between threads, the handler's own work and the encoding of the answer;
- ``transport``: the round trip less ``Timing.total``: gRPC on both sides and the client.

``--server NAME=FLAGS`` names a server and its extra ``serve`` flags; ``--python
NAME=INTERPRETER`` runs that server on another interpreter, so that another checkout's
``.venv/bin/python`` (with its own ``embedserve``) can be measured against this one.

``--workload rerank`` measures Rerank calls instead, of one query and ``--documents``
documents (20 to 60 words each), for the servers' ``--reranker`` (name it in their flags).
``--beside-reranks N`` keeps N callers of such Rerank calls busy in the background while a
server is measured: the embedder's latency beside a reranker that shares its CPU, and the
reranks' own calls/s and p50 over that time (``beside_rerank_*``).

Then the load generator (``bench.loadgen``, closed loop, one text a call of ``--workload``:
``short`` sentences, or ``mixed`` lengths of 16 to 512 tokens; or the rerank call above)
runs each of ``--loads``
callers for ``--duration`` seconds: requests/s, tokens/s, p50 and p99. Rounds are
interleaved: each round runs every server once, in turn. The figures of each round, and
the median of the rounds, are printed and written to ``--out`` as JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

from bench import procs
from bench import texts as corpus
from bench.loadgen import LoadSpec, run_load
from bench.stats import percentile
from embedserve.v1 import (
    embed_service_pb2,
    embed_service_pb2_grpc,
    rerank_service_pb2,
    rerank_service_pb2_grpc,
)


def _seconds(duration: Any) -> float:
    return float(duration.seconds) + float(duration.nanos) / 1e9


def rerank_request(documents: int) -> rerank_service_pb2.RerankRequest:
    """One query and ``documents`` documents of 20 to 60 words (``bench.texts``)."""
    query, texts = corpus.rerank_documents(documents)
    return rerank_service_pb2.RerankRequest(query=query, documents=texts)


class BackgroundReranks:
    """``callers`` threads calling Rerank (one query, ``documents`` documents) in a loop, from
    entering the block to leaving it; the seconds each finished call took."""

    def __init__(self, address: str, documents: int, callers: int) -> None:
        self._request = rerank_request(documents)
        self._channel = grpc.insecure_channel(address)
        self._rerank = rerank_service_pb2_grpc.RerankServiceStub(self._channel).Rerank
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._loop) for _ in range(callers)]
        self.seconds: list[float] = []
        self.elapsed = 0.0

    def __enter__(self) -> BackgroundReranks:
        self._started = time.perf_counter()
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()
        self.elapsed = time.perf_counter() - self._started
        self._channel.close()

    def _loop(self) -> None:
        while not self._stop.is_set():
            started = time.perf_counter()
            self._rerank(self._request, timeout=120)
            if not self._stop.is_set():  # a call cut short by the end is not counted
                self.seconds.append(time.perf_counter() - started)

    def figures(self) -> dict[str, float]:
        return {
            "beside_rerank_calls_per_s": round(len(self.seconds) / self.elapsed, 3),
            "beside_rerank_p50_ms": round(statistics.median(self.seconds or [0.0]) * 1e3, 1),
        }


def measure(
    address: str, texts: list[str], calls: int, rerank_documents: int = 0
) -> dict[str, float]:
    """Medians (ms) of ``calls`` calls after a warm-up of ``min(50, calls)``: an Embed of one
    text each, or with ``rerank_documents``, a Rerank of that many documents for one query."""
    channel = grpc.insecure_channel(address)
    warmup = min(50, calls)
    call: Callable[[int], Any]
    if rerank_documents:
        rerank = rerank_service_pb2_grpc.RerankServiceStub(channel).Rerank
        ranked = rerank_request(rerank_documents)

        def call(n: int) -> Any:
            return rerank(ranked, timeout=60)
    else:
        embed = embed_service_pb2_grpc.EmbedServiceStub(channel).Embed

        def call(n: int) -> Any:
            request = embed_service_pb2.EmbedRequest(inputs=[texts[n % len(texts)]])
            return embed(request, timeout=30)

    rows: list[tuple[float, float, float, float, float]] = []
    try:
        for n in range(calls + warmup):
            started = time.perf_counter()
            reply = call(n)
            round_trip = time.perf_counter() - started
            if n >= warmup:
                timing = reply.timing
                rows.append(
                    (
                        round_trip,
                        _seconds(timing.total),
                        _seconds(timing.inference),
                        _seconds(timing.tokenization),
                        _seconds(timing.queue),
                    )
                )
    finally:
        channel.close()

    def median(values: list[float]) -> float:
        return round(statistics.median(values) * 1e3, 3)

    return {
        "round_trip_ms": median([r[0] for r in rows]),
        "round_trip_p99_ms": round(percentile([r[0] for r in rows], 99) * 1e3, 3),
        "server_total_ms": median([r[1] for r in rows]),
        "forward_ms": median([r[2] for r in rows]),
        "server_other_ms": median([r[1] - r[2] for r in rows]),
        "tokenization_ms": median([r[3] for r in rows]),
        "queue_ms": median([r[4] for r in rows]),
        # Neither tokenizing, queued nor computing: the hops between threads, the
        # handler's own work and the encoding of the answer.
        "rest_ms": median([r[1] - r[2] - r[3] - r[4] for r in rows]),
        "transport_ms": median([r[0] - r[1] for r in rows]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--loads", default="1,8,64", help="callers of each closed loop; '' for none"
    )
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--workload", choices=("short", "mixed", "rerank"), default="short")
    parser.add_argument(
        "--documents", type=int, default=20, help="rerank: documents a call, for one query"
    )
    parser.add_argument(
        "--beside-reranks",
        type=int,
        default=0,
        help="callers of Rerank calls kept busy in the background while a server is measured",
    )
    parser.add_argument(
        "--server",
        action="append",
        default=[],
        help="NAME=FLAGS: a server and its extra flags (repeatable); default one, 'this='",
    )
    parser.add_argument(
        "--python",
        action="append",
        default=[],
        help="NAME=INTERPRETER: run server NAME on another interpreter (repeatable)",
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results/server-ab"))
    args = parser.parse_args()
    interpreters = dict(text.split("=", 1) for text in args.python)
    servers = [procs.named_flags(text) for text in args.server or ["this="]]
    texts = corpus.short_sentences(500)
    loads = [int(n) for n in args.loads.split(",") if n]
    results: dict[str, list[dict[str, float]]] = {name: [] for name, _ in servers}
    args.out.mkdir(parents=True, exist_ok=True)
    for round_index in range(args.rounds):
        for name, flags in servers:
            python = interpreters.get(name, sys.executable)
            server = procs.wait_serving_log(
                procs.start_embedserve(
                    f"{name}-{round_index}", args.out / "logs", args.threads, flags, python=python
                )
            )
            try:
                assert server.address is not None
                rerank = args.documents if args.workload == "rerank" else 0
                background = BackgroundReranks(server.address, args.documents, args.beside_reranks)
                with background:
                    row = measure(server.address, texts, args.calls, rerank)
                    _run_loads(server.address, loads, args, rerank, row)
                if args.beside_reranks:
                    row.update(background.figures())
            finally:
                server.stop()
            results[name].append(row)
            print(name, round_index, row, flush=True)
    summary = {
        name: {key: statistics.median(r[key] for r in rows) for key in rows[0]}
        for name, rows in results.items()
    }
    for name, row in summary.items():
        print("median of rounds", name, row)
    (args.out / "server-ab.json").write_text(
        json.dumps({"rounds": results, "median": summary}, indent=1) + "\n"
    )


def _run_loads(
    address: str, loads: list[int], args: argparse.Namespace, rerank: int, row: dict[str, float]
) -> None:
    for callers in loads:
        spec = LoadSpec(
            address,
            concurrency=callers,
            duration=args.duration,
            workload=args.workload,
            inputs=rerank or 1,
        )
        load = run_load(spec, procs=1 if callers < 8 else 2)
        row[f"c{callers}_rps"] = round(load["rps"], 1)
        row[f"c{callers}_tokens_per_s"] = round(load["tokens_per_s"])
        row[f"c{callers}_p50_ms"] = round(load["latency_ms"]["p50"], 2)
        row[f"c{callers}_p99_ms"] = round(load["latency_ms"]["p99"], 2)


if __name__ == "__main__":
    main()

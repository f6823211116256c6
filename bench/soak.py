"""Soak: a bounded run at 4x capacity with mixed unary, rerank and stream calls.

    python -m bench.soak [--seconds 180] [--factor 4] [--model FOLDER] [--out FILE]

1. Starts ``embedserve serve`` (its own process, metrics on) and measures idle latency.
2. Measures capacity: closed-loop unary throughput at 32 callers.
3. Offers ``factor`` x capacity for ``seconds`` (Poisson arrivals): 70% Embed of 1-4
   texts, 20% Rerank of 1 query x 10 documents, and 4 bulk streams running throughout.
   Every 5 s it samples the server's RSS, threads, open files and asyncio tasks.
4. Stops the load, lets the server settle, and measures idle latency again.

It prints one JSON document (also written to --out): the samples, the outcome counts
by gRPC code, and whether RSS, threads and tasks stayed bounded and latency returned to
its idle value. Not part of the test suite: it takes minutes by design.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc

from bench import procs
from embedserve.v1 import (
    embed_service_pb2,
    embed_service_pb2_grpc,
    rerank_service_pb2,
    rerank_service_pb2_grpc,
)

WORDS = [
    "retrieval",
    "systems",
    "rank",
    "passages",
    "by",
    "relevance",
    "to",
    "a",
    "query",
    "using",
    "embeddings",
    "and",
    "rerankers",
]


def text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


def start_server(model: str | None) -> tuple[subprocess.Popen[str], int, int]:
    command = [
        sys.executable,
        "-m",
        "embedserve.service",
        "serve",
        "--port",
        "0",
        "--metrics-port",
        "0",
    ]
    if model:
        command += ["--model", model]
    process = subprocess.Popen(
        command,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        preexec_fn=_die_with_parent,  # no server left behind if this script is killed
    )
    assert process.stderr is not None
    port = metrics = 0
    for line in process.stderr:
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if entry.get("message") == "metrics":
            metrics = int(entry["port"])
        if entry.get("message") == "serving":
            port = int(entry["port"])
            break
    if not port:
        raise SystemExit("the server did not start")
    # Keep draining its log so that a full pipe never blocks it.
    threading.Thread(target=_drain, args=(process.stderr,), daemon=True).start()
    return process, port, metrics


def _die_with_parent() -> None:
    import ctypes
    import signal

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG


def progress(message: str) -> None:
    print(f"[soak {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _drain(stream: Any) -> None:
    for _ in stream:
        pass


def sample(pid: int, metrics_port: int) -> dict[str, float]:
    status = Path(f"/proc/{pid}/status").read_text()
    fields = dict(re.findall(r"^(\w+):\s+(\d+)", status, re.MULTILINE))
    scrape = procs.metrics_text(metrics_port, timeout=5)
    tasks = re.search(r"^embedserve_event_loop_tasks\{[^}]*\} (\S+)$", scrape, re.MULTILINE)
    return {
        "t": time.monotonic(),
        "rss_mib": int(fields["VmRSS"]) / 1024,
        "threads": int(fields["Threads"]),
        "open_files": len(os.listdir(f"/proc/{pid}/fd")),
        "tasks": float(tasks.group(1)) if tasks else -1.0,
    }


async def idle_latency(
    stub: embed_service_pb2_grpc.EmbedServiceStub, calls: int = 60
) -> dict[str, float]:
    latencies = []
    for i in range(calls):
        started = time.perf_counter()
        await stub.Embed(embed_service_pb2.EmbedRequest(inputs=[f"idle probe {i}"]), timeout=30)
        latencies.append(time.perf_counter() - started)
    latencies.sort()
    return {
        "p50_ms": 1000 * statistics.median(latencies),
        "p95_ms": 1000 * latencies[int(0.95 * len(latencies))],
    }


async def capacity(stub: embed_service_pb2_grpc.EmbedServiceStub, seconds: float = 10) -> float:
    done = 0
    end = time.monotonic() + seconds

    async def caller(n: int) -> None:
        nonlocal done
        while time.monotonic() < end:
            await stub.Embed(
                embed_service_pb2.EmbedRequest(inputs=[f"capacity {n} {done}"]), timeout=30
            )
            done += 1

    await asyncio.gather(*(caller(n) for n in range(32)))
    return done / seconds


async def soak(args: argparse.Namespace) -> dict[str, Any]:
    process, port, metrics_port = start_server(args.model)
    rng = random.Random(7)
    outcomes: Counter[str] = Counter()
    samples: list[dict[str, float]] = []
    try:
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        embed = embed_service_pb2_grpc.EmbedServiceStub(channel)
        rerank = rerank_service_pb2_grpc.RerankServiceStub(channel)
        progress("measuring idle latency")
        idle_before = await idle_latency(embed)
        progress("measuring capacity")
        rate = await capacity(embed)
        progress(f"capacity {rate:.0f} calls/s; offering {args.factor}x for {args.seconds:.0f} s")
        offered = args.factor * rate
        samples.append(sample(process.pid, metrics_port))
        end = time.monotonic() + args.seconds
        pending: set[asyncio.Task[None]] = set()

        async def one_call() -> None:
            try:
                if rng.random() < 0.78:
                    await embed.Embed(
                        embed_service_pb2.EmbedRequest(
                            inputs=[text(rng, rng.randint(3, 30)) for _ in range(rng.randint(1, 4))]
                        ),
                        timeout=10,
                    )
                else:
                    await rerank.Rerank(
                        rerank_service_pb2.RerankRequest(
                            query=text(rng, 6), documents=[text(rng, 20) for _ in range(10)]
                        ),
                        timeout=10,
                    )
                outcomes["OK"] += 1
            except grpc.aio.AioRpcError as exc:
                outcomes[exc.code().name] += 1

        async def stream_items(
            stream_no: int,
        ) -> AsyncIterator[embed_service_pb2.EmbedStreamRequest]:
            n = 0
            while time.monotonic() < end:
                n += 1
                yield embed_service_pb2.EmbedStreamRequest(
                    id=f"{stream_no}-{n}",
                    request=embed_service_pb2.EmbedRequest(
                        inputs=[text(rng, 15) for _ in range(8)]
                    ),
                )

        async def bulk(stream_no: int) -> None:
            try:
                stream = embed.EmbedStream(stream_items(stream_no), timeout=args.seconds + 60)
                async for response in stream:
                    outcomes[
                        "stream_item_ok" if response.HasField("result") else "stream_item_error"
                    ] += 1
            except grpc.aio.AioRpcError as exc:
                outcomes[f"stream_{exc.code().name}"] += 1

        streams = [asyncio.ensure_future(bulk(i)) for i in range(4)]
        next_sample = time.monotonic() + 5
        while time.monotonic() < end:
            await asyncio.sleep(rng.expovariate(offered))
            task = asyncio.ensure_future(one_call())
            pending.add(task)
            task.add_done_callback(pending.discard)
            if time.monotonic() >= next_sample:
                samples.append(sample(process.pid, metrics_port))
                next_sample += 5
        progress("load over; waiting for the calls and streams in flight")
        await asyncio.gather(*pending, *streams, return_exceptions=True)
        await asyncio.sleep(3)  # settle
        samples.append(sample(process.pid, metrics_port))
        idle_after = await idle_latency(embed)
        await channel.close()
    finally:
        process.terminate()
        process.wait(60)
    warm = samples[1:] or samples
    first_rss, last_rss = warm[0]["rss_mib"], warm[-1]["rss_mib"]
    return {
        "seconds": args.seconds,
        "capacity_rps": rate,
        "offered_rps": offered,
        "outcomes": dict(outcomes),
        "idle_before": idle_before,
        "idle_after": idle_after,
        "samples": samples,
        "verdict": {
            "rss_growth_mib_after_warmup": last_rss - first_rss,
            "max_threads": max(s["threads"] for s in samples),
            "final_tasks": samples[-1]["tasks"],
            "max_tasks": max(s["tasks"] for s in samples),
            "latency_recovered": idle_after["p50_ms"] <= 1.25 * idle_before["p50_ms"] + 2,
            "no_server_errors": not any(k in outcomes for k in ("INTERNAL", "UNKNOWN")),
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=180)
    parser.add_argument("--factor", type=float, default=4)
    parser.add_argument("--model", help="model folder (default: the packaged MiniLM)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    report = asyncio.run(soak(args))
    text_out = json.dumps(report, indent=2)
    print(text_out)
    if args.out:
        args.out.write_text(text_out + "\n")


if __name__ == "__main__":
    main()

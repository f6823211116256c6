"""Async load generator for embedserve (grpc.aio raw stubs) and REST peers.

Closed loop: N callers, each sending its next request when the previous one answers.
Open loop: Poisson arrivals at a rate, whatever the server does (latency is measured from
the scheduled arrival, so a slow server cannot hide queueing: no coordinated omission).

Both have a warm-up (requests sent, not counted) and a measured window. Closed loop counts
the requests that complete inside the window; open loop counts those that arrive inside it
(and waits for them to finish). Errors are counted by gRPC code, with their own latencies
(how fast a RESOURCE_EXHAUSTED comes back is part of the result).

One process of Python can saturate neither a server nor itself at high rates, so a load can
be split over several generator processes (``run_load(spec, procs=N)``): each runs this
module as ``python -m bench.loadgen load --spec JSON``, they start together at a wall-clock
time, and their raw latencies are merged. ``bulk`` mode drives one EmbedStream.

Requests are built once, up front, and responses are parsed only for their usage counts, so
the generator's own cost per call stays small (a few tens of microseconds).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from typing import Any, NamedTuple

import grpc

from bench import texts as corpus
from bench.stats import summary_ms
from embedserve.client.aio import AsyncClient, EncodingName
from embedserve.client.errors import EmbedServeError, from_rpc_error
from embedserve.client.retry import NO_RETRY, RetryPolicy
from embedserve.v1 import (
    common_pb2,
    embed_service_pb2,
    embed_service_pb2_grpc,
    rerank_service_pb2,
    rerank_service_pb2_grpc,
)

ENCODINGS = {
    "bytes": common_pb2.ENCODING_FLOAT32_BYTES,
    "float32": common_pb2.ENCODING_FLOAT32,
}
# A coalescing client's merged calls: the server's default batch size.
COALESCE_MAX_INPUTS = 64
CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    # Each channel gets its own connection (by default equal channels share one).
    ("grpc.use_local_subchannel_pool", 1),
]


@dataclass
class LoadSpec:
    """One measurement. ``workload``: short (one short sentence a request, cycling over 2000
    of them), fixed (the same short text), mixed (one text of 16-512 tokens), rerank (1 query
    x ``inputs`` documents), many (``inputs`` short sentences a request), repeats (``inputs``
    short sentences a request, each one with probability ``repeat_share`` a repeat of a text
    sent earlier in the run, otherwise one never sent before)."""

    target: str
    mode: str = "closed"  # closed | open
    concurrency: int = 1
    rate: float = 0.0  # open loop: arrivals per second
    duration: float = 8.0
    warmup: float = 2.0
    workload: str = "short"
    inputs: int = 1
    encoding: str = "bytes"
    deadline: float | None = None  # seconds, sent as the gRPC deadline
    channels: int = 0  # 0: one per 32 callers (at least 1)
    protocol: str = "grpc"  # grpc | http (OpenAI-shaped /embeddings, e.g. infinity)
    http_model: str = ""
    max_outstanding: int = 50_000  # open loop: client-side cap on requests in flight
    drain: float = 60.0  # open loop: how long to wait for measured requests after the window
    seed: int = 0
    keep_raw: bool = False
    texts_file: str = ""  # a JSON list of texts to use instead of the built-in short ones
    repeat_share: float = 0.5  # workload "repeats"
    # Closed loop: a refused caller retries as the Python client does (its RetryPolicy:
    # exponential backoff with full jitter, the RetryInfo delay as a floor, 4 attempts);
    # False sends its next call at once (the worst case for the server).
    client_retries: bool = False
    # Unary embeds through the Python client with ``coalesce=True`` (its own retries off):
    # the callers of one process that call at the same time share one Embed call.
    coalesce: bool = False

    def split(self, parts: int) -> list[LoadSpec]:
        """This load shared by ``parts`` processes (callers, rate and seeds divided)."""
        out = []
        for i in range(parts):
            callers = self.concurrency // parts + (1 if i < self.concurrency % parts else 0)
            out.append(
                replace(
                    self,
                    concurrency=max(1, callers) if self.mode == "closed" else self.concurrency,
                    rate=self.rate / parts,
                    seed=self.seed + 1000 * i,
                    keep_raw=True,
                )
            )
        return out


@dataclass
class _Recorder:
    window_start: float
    window_end: float
    by_arrival: bool
    ok: list[float] = field(default_factory=list)
    errors: dict[str, list[float]] = field(default_factory=dict)
    inputs: int = 0
    tokens: int = 0
    cached: int = 0  # inputs the server answered from its embedding cache
    completed_in_window: int = 0
    sent: int = 0
    # Open loop: how late this generator started each call after its scheduled arrival. On
    # shared cores it is part of every latency measured from the arrival, the server's or not.
    send_lag: list[float] = field(default_factory=list)

    def record(
        self, arrival: float, finished: float, code: str, inputs: int, tokens: int, cached: int = 0
    ) -> None:
        in_window_done = self.window_start <= finished <= self.window_end
        if code == "OK" and in_window_done:
            self.completed_in_window += 1
            self.inputs += inputs
            self.tokens += tokens
            self.cached += cached
        moment = arrival if self.by_arrival else finished
        if not self.window_start <= moment <= self.window_end:
            return
        latency = finished - arrival
        if code == "OK":
            self.ok.append(latency)
        else:
            self.errors.setdefault(code, []).append(latency)


# -> (code, inputs, tokens, inputs answered from the server's cache)
class Answer(NamedTuple):
    code: str  # "OK", a gRPC status name, or the HTTP client's own
    inputs: int = 0
    tokens: int = 0
    cached: int = 0
    retry_after: float = 0.0  # a refusal's google.rpc.RetryInfo delay, in seconds

    @property
    def counts(self) -> tuple[str, int, int, int]:
        return self.code, self.inputs, self.tokens, self.cached


Call = Callable[[int], Awaitable[Answer]]


CLIENT_RETRIES = RetryPolicy()
RETRIED_CODES = frozenset(code.name for code in CLIENT_RETRIES.retryable_codes)


def _retry_delay(exc: grpc.aio.AioRpcError) -> float:
    """The RetryInfo delay of a refusal, read as the Python client reads it (0 without one)."""
    return from_rpc_error(exc).retry_after or 0.0


# -- request factories ----------------------------------------------------------------------


def _payloads(spec: LoadSpec) -> list[Any]:
    """Requests (protobuf messages or JSON bodies) to cycle over."""
    rng = random.Random(spec.seed)
    if spec.workload == "rerank":
        query, docs = corpus.rerank_documents(spec.inputs)
        return [rerank_service_pb2.RerankRequest(query=query, documents=docs)]
    if spec.workload == "fixed":
        groups = [[corpus.SHORT_TEXT] * spec.inputs]
    elif spec.workload == "repeats":
        groups = _repeats(spec, rng)
    elif spec.workload == "mixed":
        pool = corpus.mixed_lengths(400)
        rng.shuffle(pool)
        groups = [pool[i : i + spec.inputs] for i in range(0, len(pool), spec.inputs)]
    else:  # short, many
        pool = _load_texts(spec.texts_file) if spec.texts_file else corpus.short_sentences(2000)
        offset = rng.randrange(len(pool))
        pool = pool[offset:] + pool[:offset]
        groups = [pool[i : i + spec.inputs] for i in range(0, len(pool), spec.inputs)]
    if spec.protocol == "http":
        # Peers count tokens their own way (infinity: characters); count them as we do.
        return [
            (
                json.dumps(
                    {"model": spec.http_model, "input": g, "encoding_format": "float"}
                ).encode(),
                sum(corpus.token_counts(g)),
            )
            for g in groups
        ]
    encoding = ENCODINGS[spec.encoding]
    return [embed_service_pb2.EmbedRequest(inputs=g, encoding=encoding) for g in groups]


def _repeats(spec: LoadSpec, rng: random.Random, requests: int = 40_000) -> list[list[str]]:
    """Requests in the order they are sent: each text repeats one sent before it (chosen
    uniformly) with probability ``repeat_share``, otherwise it is new. Texts come from a
    seed of their own, so another seed (another round) starts from new texts."""
    count = requests * spec.inputs
    fresh = corpus.short_sentences(count, seed=10_000 + spec.seed)
    sent: list[str] = []
    texts: list[str] = []
    for _ in range(count):
        if sent and rng.random() < spec.repeat_share:
            texts.append(sent[rng.randrange(len(sent))])
        else:
            sent.append(fresh[len(sent)])
            texts.append(sent[-1])
    return [texts[i : i + spec.inputs] for i in range(0, count, spec.inputs)]


def _load_texts(path: str) -> list[str]:
    with open(path) as f:
        texts: list[str] = json.load(f)
    return texts


def _grpc_calls(spec: LoadSpec, channels: list[grpc.aio.Channel]) -> list[Call]:
    payloads = _payloads(spec)
    rerank = spec.workload == "rerank"
    calls: list[Call] = []
    for channel in channels:
        if rerank:
            method: Any = rerank_service_pb2_grpc.RerankServiceStub(channel).Rerank
        else:
            method = embed_service_pb2_grpc.EmbedServiceStub(channel).Embed

        async def call(n: int, method: Any = method) -> Answer:
            try:
                response = await method(payloads[n % len(payloads)], timeout=spec.deadline)
            except grpc.aio.AioRpcError as exc:
                # Read only by callers that retry: parsing every refusal's details would add
                # client CPU, on the server's cores, to the loads that resend at once.
                delay = _retry_delay(exc) if spec.client_retries else 0.0
                return Answer(exc.code().name, retry_after=delay)
            usage = response.usage
            return Answer("OK", usage.inputs, usage.input_tokens, usage.cached_inputs)

        calls.append(call)
    return calls


def _coalescing_calls(spec: LoadSpec, clients: list[AsyncClient]) -> list[Call]:
    texts = [list(request.inputs) for request in _payloads(spec)]
    encoding: EncodingName = "float32_bytes" if spec.encoding == "bytes" else "float32"
    calls: list[Call] = []
    for client in clients:

        async def call(n: int, client: AsyncClient = client) -> Answer:
            try:
                result = await client.embed(texts[n % len(texts)], encoding=encoding)
            except EmbedServeError as exc:
                return Answer(exc.code.name, retry_after=exc.retry_after or 0.0)
            usage = result.usage
            return Answer("OK", usage.inputs, usage.input_tokens, usage.cached_inputs)

        calls.append(call)
    return calls


class _HttpConnection:
    """A minimal HTTP/1.1 keep-alive client: one request at a time on one connection."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        if self._writer is None:
            self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
        assert self._reader is not None
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        self._writer.write(head.encode() + body)
        status_line = await self._reader.readline()
        status = int(status_line.split()[1])
        length = -1
        chunked = False
        while (line := await self._reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            name = name.strip().lower()
            if name == "content-length":
                length = int(value)
            elif name == "transfer-encoding" and "chunked" in value.lower():
                chunked = True
        if chunked:
            parts = []
            while True:
                size = int((await self._reader.readline()).strip(), 16)
                if size == 0:
                    await self._reader.readline()
                    break
                parts.append(await self._reader.readexactly(size))
                await self._reader.readline()
            return status, b"".join(parts)
        return status, await self._reader.readexactly(length)

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def _http_calls(spec: LoadSpec, count: int) -> tuple[list[Call], list[_HttpConnection]]:
    payloads = _payloads(spec)
    host, _, port = spec.target.rpartition(":")
    connections = [_HttpConnection(host, int(port)) for _ in range(count)]
    calls: list[Call] = []
    for conn in connections:

        async def call(n: int, conn: _HttpConnection = conn) -> Answer:
            body, tokens = payloads[n % len(payloads)]
            try:
                status, data = await conn.post("/embeddings", body)
            except (OSError, asyncio.IncompleteReadError, ValueError):
                conn._writer = None
                return Answer("CONNECTION_ERROR")
            if status != 200:
                return Answer(f"HTTP_{status}")
            return Answer("OK", len(json.loads(data)["data"]), tokens)

        calls.append(call)
    return calls, connections


# -- the two loops --------------------------------------------------------------------------


async def _closed(spec: LoadSpec, calls: list[Call], rec: _Recorder, end: float) -> None:
    loop = asyncio.get_running_loop()

    async def caller(index: int) -> None:
        call = calls[index % len(calls)]
        n = index
        attempt = 0
        rng = random.Random(spec.seed * 7919 + index)
        while True:
            started = loop.time()
            if started >= end:
                return
            answer = await call(n)
            rec.sent += 1
            rec.record(started, loop.time(), *answer.counts)
            if spec.client_retries and answer.code in RETRIED_CODES:
                attempt += 1
                if attempt < CLIENT_RETRIES.max_attempts:  # the same call again, later
                    hint = answer.retry_after or None
                    await asyncio.sleep(CLIENT_RETRIES.delay(attempt, hint, rng))
                    continue
            attempt = 0
            n += spec.concurrency

    await asyncio.gather(*(caller(i) for i in range(spec.concurrency)))


async def _open(spec: LoadSpec, calls: list[Call], rec: _Recorder, end: float) -> None:
    loop = asyncio.get_running_loop()
    rng = random.Random(spec.seed + 17)
    tasks: set[asyncio.Task[None]] = set()
    overflow = 0

    async def one(n: int, arrival: float) -> None:
        if rec.window_start <= arrival <= rec.window_end:
            rec.send_lag.append(loop.time() - arrival)
        answer = await calls[n % len(calls)](n)
        rec.record(arrival, loop.time(), *answer.counts)

    arrival = loop.time()
    n = 0
    while True:
        arrival += rng.expovariate(spec.rate)
        if arrival >= end:
            break
        delay = arrival - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        if len(tasks) >= spec.max_outstanding:
            overflow += 1
            if rec.window_start <= arrival <= rec.window_end:
                rec.errors.setdefault("CLIENT_OVERFLOW", []).append(0.0)
            continue
        task = asyncio.ensure_future(one(n, arrival))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        rec.sent += 1
        n += 1
    if tasks:
        _, pending = await asyncio.wait(set(tasks), timeout=spec.drain)
        for task in pending:
            task.cancel()
        if pending:
            rec.errors.setdefault("CLIENT_GAVE_UP", []).extend([spec.drain] * len(pending))


async def run_spec(spec: LoadSpec, start_at: float | None = None) -> dict[str, Any]:
    """Run one load in this process; returns the raw result (see ``finish``)."""
    channels: list[grpc.aio.Channel] = []
    connections: list[_HttpConnection] = []
    clients: list[AsyncClient] = []
    if spec.protocol == "http":
        count = spec.concurrency if spec.mode == "closed" else min(256, spec.max_outstanding)
        calls, connections = _http_calls(spec, count)
        if spec.mode == "open":
            raise ValueError("open loop over HTTP/1.1 is not supported (one request a socket)")
    else:
        # Several targets (comma-separated): channels spread over them, callers over channels.
        targets = spec.target.split(",")
        n_channels = spec.channels or max(len(targets), math.ceil(spec.concurrency / 32))
        n_channels = -(-n_channels // len(targets)) * len(targets)
        if spec.coalesce:
            clients = [
                AsyncClient(
                    targets[i % len(targets)],
                    timeout=spec.deadline,
                    retry=NO_RETRY,
                    channel_options=[*CHANNEL_OPTIONS, ("bench.ch", i)],
                    coalesce=True,
                    coalesce_max_inputs=COALESCE_MAX_INPUTS,
                )
                for i in range(n_channels)
            ]
            calls = _coalescing_calls(spec, clients)
        else:
            channels = [
                grpc.aio.insecure_channel(
                    targets[i % len(targets)], options=[*CHANNEL_OPTIONS, ("bench.ch", i)]
                )
                for i in range(n_channels)
            ]
            for channel in channels:
                await asyncio.wait_for(channel.channel_ready(), 30)
            calls = _grpc_calls(spec, channels)
    if start_at is not None:
        await asyncio.sleep(max(0.0, start_at - time.time()))
    loop = asyncio.get_running_loop()
    cpu_started = time.process_time()
    begin = loop.time()
    rec = _Recorder(begin + spec.warmup, begin + spec.warmup + spec.duration, spec.mode == "open")
    try:
        if spec.mode == "closed":
            await _closed(spec, calls, rec, rec.window_end)
        else:
            await _open(spec, calls, rec, rec.window_end)
    finally:
        for channel in channels:
            await channel.close(grace=None)
        for conn in connections:
            await conn.close()
        for client in clients:
            await client.close()
    return {
        "spec": asdict(spec),
        "ok": rec.ok,
        "errors": rec.errors,
        "inputs": rec.inputs,
        "tokens": rec.tokens,
        "cached": rec.cached,
        "completed_in_window": rec.completed_in_window,
        "sent": rec.sent,
        "send_lag": rec.send_lag,
        "client_cpu_s": time.process_time() - cpu_started,
    }


def finish(spec: LoadSpec, parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Merge the raw results of one or more processes into the reported figures."""
    ok: list[float] = [x for p in parts for x in p["ok"]]
    errors: dict[str, list[float]] = {}
    for p in parts:
        for code, values in p["errors"].items():
            errors.setdefault(code, []).extend(values)
    completed = sum(p["completed_in_window"] for p in parts)
    inputs = sum(p["inputs"] for p in parts)
    tokens = sum(p["tokens"] for p in parts)
    cached = sum(p.get("cached", 0) for p in parts)
    measured = len(ok) + sum(len(v) for v in errors.values())
    result: dict[str, Any] = {
        "mode": spec.mode,
        "workload": spec.workload,
        "concurrency": spec.concurrency if spec.mode == "closed" else None,
        "offered_rps": spec.rate if spec.mode == "open" else None,
        "duration_s": spec.duration,
        "processes": len(parts),
        "ok": len(ok),
        "measured": measured,
        "rps": completed / spec.duration,
        "inputs_per_s": inputs / spec.duration,
        "tokens_per_s": tokens / spec.duration,
        # Share of the measured inputs the server answered from its embedding cache.
        "cache_hit_ratio": cached / inputs if inputs else 0.0,
        "latency_ms": summary_ms(ok),
        "errors": {code: len(v) for code, v in sorted(errors.items())},
        "error_latency_ms": {code: summary_ms(v) for code, v in sorted(errors.items())},
        "error_rate": (measured - len(ok)) / measured if measured else 0.0,
        "client_cpu_s": sum(p.get("client_cpu_s", 0.0) for p in parts),
        "sent_total": sum(p["sent"] for p in parts),
    }
    if spec.mode == "open":
        result["send_lag_ms"] = summary_ms([x for p in parts for x in p.get("send_lag", [])])
    if spec.keep_raw:
        result["raw_ok_s"] = ok
    return result


def run_load(
    spec: LoadSpec, procs: int = 1, python: str = sys.executable, timeout: float = 600
) -> dict[str, Any]:
    """Run ``spec`` in ``procs`` separate generator processes (never in the caller's)."""
    specs = spec.split(procs)
    start_at = time.time() + 1.0 + 0.5 * procs  # after every process has imported and connected
    workers = [
        subprocess.Popen(
            [
                python,
                "-m",
                "bench.loadgen",
                "load",
                "--spec",
                json.dumps(asdict(s)),
                "--start-at",
                str(start_at),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        for s in specs
    ]
    parts = []
    for worker in workers:
        out, _ = worker.communicate(timeout=timeout)
        if worker.returncode != 0:
            raise RuntimeError(f"load generator failed ({worker.returncode})")
        parts.append(json.loads(out))
    return finish(spec, parts)


# -- bulk: one EmbedStream -------------------------------------------------------------------


@dataclass
class BulkSpec:
    target: str
    count: int = 20_000  # texts; with ``duration`` the corpus cycles until time is up
    duration: float | None = None
    batch_size: int = 64  # texts a stream item
    window: int = 16  # items in flight (the server's default --stream-window)
    encoding: str = "bytes"
    texts_file: str = ""  # a JSON list of texts (cycled) instead of the built-in corpus


async def run_bulk(spec: BulkSpec) -> dict[str, Any]:
    if spec.texts_file:
        texts = _load_texts(spec.texts_file)
    else:
        texts = corpus.bulk_corpus(min(spec.count, 5000) if spec.duration else spec.count)
    encoding = ENCODINGS[spec.encoding]

    def batches() -> Iterator[list[str]]:
        i = 0
        sent = 0
        while spec.duration is not None or sent < spec.count:
            size = spec.batch_size
            if spec.duration is None:
                size = min(size, spec.count - sent)
            yield [texts[(i + k) % len(texts)] for k in range(size)]
            i = (i + size) % len(texts)
            sent += size

    channel = grpc.aio.insecure_channel(spec.target, options=CHANNEL_OPTIONS)
    await asyncio.wait_for(channel.channel_ready(), 30)
    stub = embed_service_pb2_grpc.EmbedServiceStub(channel)
    loop = asyncio.get_running_loop()
    slots = asyncio.Semaphore(spec.window)
    started = loop.time()
    end = started + spec.duration if spec.duration is not None else math.inf
    items = inputs = tokens = 0
    errors: dict[str, int] = {}
    timeline: list[tuple[float, int]] = []

    async def requests() -> Any:
        for n, batch in enumerate(batches()):
            await slots.acquire()
            if loop.time() >= end:
                return
            yield embed_service_pb2.EmbedStreamRequest(
                id=str(n), request=embed_service_pb2.EmbedRequest(inputs=batch, encoding=encoding)
            )

    call = stub.EmbedStream(requests())
    code = "OK"
    try:
        async for response in call:
            slots.release()
            items += 1
            if response.HasField("result"):
                inputs += response.result.usage.inputs
                tokens += response.result.usage.input_tokens
            else:
                name = _grpc_status_name(response.error.code)
                errors[name] = errors.get(name, 0) + 1
            if items % 20 == 0:
                timeline.append((loop.time() - started, inputs))
    except grpc.aio.AioRpcError as exc:
        code = exc.code().name
    elapsed = loop.time() - started
    await channel.close(grace=None)
    return {
        "items": items,
        "inputs": inputs,
        "tokens": tokens,
        "elapsed_s": elapsed,
        "inputs_per_s": inputs / elapsed if elapsed else 0.0,
        "tokens_per_s": tokens / elapsed if elapsed else 0.0,
        "stream_status": code,
        "item_errors": errors,
        "timeline": timeline,
    }


def start_bulk(spec: BulkSpec, python: str = sys.executable) -> subprocess.Popen[str]:
    """A bulk stream in its own process; read its result with ``bulk_result``."""
    return subprocess.Popen(
        [python, "-m", "bench.loadgen", "bulk", "--spec", json.dumps(asdict(spec))],
        stdout=subprocess.PIPE,
        text=True,
    )


def bulk_result(process: subprocess.Popen[str], timeout: float = 3600) -> dict[str, Any]:
    out, _ = process.communicate(timeout=timeout)
    if process.returncode != 0:
        raise RuntimeError(f"bulk generator failed ({process.returncode})")
    result: dict[str, Any] = json.loads(out)
    return result


# -- command line ---------------------------------------------------------------------------


def _grpc_status_name(code: int) -> str:
    for status in grpc.StatusCode:
        if status.value[0] == code:
            return status.name
    return str(code)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.loadgen", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    load = sub.add_parser("load", help="one load (JSON LoadSpec), raw result on stdout")
    load.add_argument("--spec", required=True)
    load.add_argument("--start-at", type=float)
    bulk = sub.add_parser("bulk", help="one EmbedStream (JSON BulkSpec), result on stdout")
    bulk.add_argument("--spec", required=True)
    quick = sub.add_parser("run", help="a load from flags, summary on stdout")
    quick.add_argument("--target", default="127.0.0.1:50051")
    quick.add_argument("--mode", choices=("closed", "open"), default="closed")
    quick.add_argument("--concurrency", type=int, default=8)
    quick.add_argument("--rate", type=float, default=100.0)
    quick.add_argument("--duration", type=float, default=10.0)
    quick.add_argument("--warmup", type=float, default=2.0)
    quick.add_argument("--workload", default="short")
    quick.add_argument("--inputs", type=int, default=1)
    quick.add_argument("--repeat-share", type=float, default=0.5, help="workload repeats")
    quick.add_argument("--encoding", choices=tuple(ENCODINGS), default="bytes")
    quick.add_argument("--deadline", type=float)
    quick.add_argument("--procs", type=int, default=1)
    quick.add_argument("--protocol", choices=("grpc", "http"), default="grpc")
    quick.add_argument("--http-model", default="")
    quick.add_argument(
        "--client-retries", action="store_true", help="retry refusals as the Python client does"
    )
    quick.add_argument(
        "--coalesce",
        action="store_true",
        help="embed through the Python client with coalesce=True (concurrent calls merged)",
    )
    args = parser.parse_args(argv)
    if args.command == "load":
        spec = LoadSpec(**json.loads(args.spec))
        print(json.dumps(asyncio.run(run_spec(spec, args.start_at))))
        return 0
    if args.command == "bulk":
        print(json.dumps(asyncio.run(run_bulk(BulkSpec(**json.loads(args.spec))))))
        return 0
    spec = LoadSpec(
        target=args.target,
        mode=args.mode,
        concurrency=args.concurrency,
        rate=args.rate,
        duration=args.duration,
        warmup=args.warmup,
        workload=args.workload,
        inputs=args.inputs,
        repeat_share=args.repeat_share,
        encoding=args.encoding,
        deadline=args.deadline,
        protocol=args.protocol,
        http_model=args.http_model,
        client_retries=args.client_retries,
        coalesce=args.coalesce,
    )
    result = run_load(spec, args.procs)
    result.pop("raw_ok_s", None)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

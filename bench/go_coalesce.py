"""Go callers against one server: the generated client ("raw") against the client library's
CoalescingEmbedClient, beside the Python client's coalesce=True and the model's ceiling.

    python -m bench.go_coalesce [--rounds 3] [--duration 8] [--loads 1,64] [--no-python]
                                [--out docs/benchmarks/go-coalesce-ab-runN.json]

One ``embedserve serve`` process (the packaged MiniLM, ``--threads`` torch threads, defaults
otherwise). The ceiling worker (bench/ceiling.py) first picks the model's best way to run
short sentences (batch sizes 32 and 64, length-sorted or not, one or two workers, the
padding-free forward), and measures it again at the start of every round.

Each round then runs closed loops of one short sentence a call (the built-in 2000
sentences): the Go load generator (bench/goload, built by ``make go-goload``) with each of
``--loads`` callers, raw and through the coalescing client, and, unless ``--no-python``,
64 callers of the Python load generator, raw stubs and ``coalesce=True``, in one process.
The order of the loads turns by one every round, so that drift on the machine does not
always favour the same one. Each load is reported as requests/s, tokens/s, its share of the
round's ceiling, p50 and p99, errors by code, the server's CPU a call and, for Go, the
Embed calls that reached the connection (merged calls) and the client's CPU a call.
The medians of the rounds, and the ratios taken inside each round, are printed and written
to ``--out`` with every figure.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import procs
from bench.loadgen import LoadSpec
from bench.run import Ceiling, again_command, machine_info
from bench.texts import short_sentences

GOLOAD = procs.ROOT / "build" / "go" / "embedserve-goload"
CEILING_SECONDS = 3.0


def build_goload() -> Path:
    subprocess.run(["make", "--no-print-directory", "-s", "go-goload"], cwd=procs.ROOT, check=True)
    return GOLOAD


def best_ceiling(ceiling: Ceiling, threads: int) -> dict[str, Any]:
    """The fastest of the candidate ways to run the model on short sentences."""
    candidates = [
        ceiling.ask(
            op="throughput",
            inputs="short",
            batch_size=size,
            seconds=2.0,
            sort=sort,
            packed=True,
            workers=workers,
        )
        for size in (32, 64)
        for sort in (False, True)
        for workers in ((1, 2) if threads > 1 else (1,))
    ]
    return max(candidates, key=lambda r: float(r["tokens_per_s"]))


def ceiling_again(ceiling: Ceiling, best: dict[str, Any]) -> float:
    return float(ceiling.ask(**again_command(best, CEILING_SECONDS))["tokens_per_s"])


def go_load(
    goload: Path, target: str, callers: int, coalesce: bool, args: argparse.Namespace
) -> dict[str, Any]:
    command = [
        str(goload),
        "-target",
        target,
        "-callers",
        str(callers),
        "-duration",
        f"{args.duration}s",
        "-warmup",
        f"{args.warmup}s",
        "-texts",
        str(args.texts_file),
    ]
    if coalesce:
        command.append("-coalesce")
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=args.duration + args.warmup + 120
    )
    if done.returncode != 0:
        raise RuntimeError(f"embedserve-goload failed ({done.returncode}): {done.stderr}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def python_load(target: str, coalesce: bool, args: argparse.Namespace) -> dict[str, Any]:
    spec = LoadSpec(
        target=target,
        concurrency=64,
        duration=args.duration,
        warmup=args.warmup,
        texts_file=str(args.texts_file),
        coalesce=coalesce,
    )
    result = procs.run_load(spec, 1)
    result.pop("raw_ok_s", None)
    result["calls"] = result["ok"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.go_coalesce", description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--loads", default="1,64", help="Go callers, comma-separated")
    parser.add_argument("--no-python", action="store_true", help="skip the Python loads")
    parser.add_argument("--out", type=Path, default=Path("bench/results/go-coalesce.json"))
    args = parser.parse_args()
    loads_go = [int(n) for n in args.loads.split(",") if n.strip()]

    log_dir = args.out.parent / (args.out.stem + "-logs")
    log_dir.mkdir(parents=True, exist_ok=True)
    args.texts_file = log_dir / "texts.json"
    args.texts_file.write_text(json.dumps(short_sentences(2000)))
    started = time.monotonic()

    def log(message: str) -> None:
        print(f"[{time.monotonic() - started:5.0f}s] {message}", file=sys.stderr, flush=True)

    goload = build_goload()
    ceiling = Ceiling(args.threads, log_dir / "ceiling.log")
    server = procs.start_embedserve("embedserve", log_dir, args.threads)
    try:
        procs.wait_serving_log(server)
        ceiling.wait_ready()
        best = best_ceiling(ceiling, args.threads)
        log(f"ceiling: {best['tokens_per_s']:.0f} tokens/s with {json.dumps(best)}")

        loads: list[tuple[str, Callable[[], dict[str, Any]]]] = []
        for callers in loads_go:
            for coalesce in (False, True):
                name = f"go_{'coalesce' if coalesce else 'raw'}{callers}"
                loads.append(
                    (
                        name,
                        lambda c=callers, co=coalesce: go_load(goload, server.address, c, co, args),
                    )
                )
        if not args.no_python:
            for coalesce in (False, True):
                name = f"python_{'coalesce' if coalesce else 'raw'}64"
                loads.append((name, lambda co=coalesce: python_load(server.address, co, args)))

        rounds: list[dict[str, Any]] = []
        for r in range(args.rounds):
            row: dict[str, Any] = {"ceiling_tokens_per_s": ceiling_again(ceiling, best)}
            turn = r % len(loads)
            for name, run in loads[turn:] + loads[:turn]:
                cpu_before = server.cpu()
                result = run()
                cpu = server.cpu() - cpu_before
                # Over every call sent, the warm-up's included, as the CPU was spent on them.
                result["server_cpu_ms_per_call"] = cpu * 1e3 / max(1, int(result["sent_total"]))
                result["share_of_ceiling"] = result["tokens_per_s"] / row["ceiling_tokens_per_s"]
                row[name] = result
                lat = result["latency_ms"]
                log(
                    f"round {r} {name}: {result['rps']:.1f} req/s, "
                    f"{result['share_of_ceiling']:.0%} of the ceiling, p50 {lat['p50']:.1f} ms, "
                    f"p99 {lat['p99']:.1f} ms, errors {result['errors']}"
                    + (f", {result['rpcs']} Embed calls" if "rpcs" in result else "")
                )
            rounds.append(row)
    finally:
        server.stop(30)
        ceiling.close()

    summary = summarize(rounds, loads_go, not args.no_python)
    out = {
        "what": __doc__.split("\n\n")[0],
        "host": machine_info(args.threads),
        "date": time.strftime("%Y-%m-%d"),
        "ceiling": best,
        "duration_s": args.duration,
        "summary": summary,
        "rounds": rounds,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(summary, indent=1))


def summarize(rounds: list[dict[str, Any]], loads_go: list[int], python: bool) -> dict[str, Any]:
    """Medians over the rounds; every ratio is taken inside a round first."""

    def med(pick: Callable[[dict[str, Any]], float]) -> float:
        return round(statistics.median(pick(row) for row in rounds), 3)

    summary: dict[str, Any] = {"ceiling_tokens_per_s": med(lambda r: r["ceiling_tokens_per_s"])}
    names = [f"go_{kind}{n}" for n in loads_go for kind in ("raw", "coalesce")]
    if python:
        names += ["python_raw64", "python_coalesce64"]
    for name in names:
        summary[name] = {
            "rps": med(lambda r, n=name: r[n]["rps"]),
            "share_of_ceiling": med(lambda r, n=name: r[n]["share_of_ceiling"]),
            "p50_ms": med(lambda r, n=name: r[n]["latency_ms"]["p50"]),
            "p99_ms": med(lambda r, n=name: r[n]["latency_ms"]["p99"]),
            "server_cpu_ms_per_call": med(lambda r, n=name: r[n]["server_cpu_ms_per_call"]),
        }
        if name.startswith("go_"):
            summary[name]["calls_per_rpc"] = med(
                lambda r, n=name: r[n]["calls"] / max(1, r[n]["rpcs"])
            )
            summary[name]["client_cpu_ms_per_call"] = med(
                lambda r, n=name: r[n]["client_cpu_ms_per_call"]
            )
    for n in loads_go:
        summary[f"go_coalesce_vs_raw{n}"] = med(
            lambda r, n=n: r[f"go_coalesce{n}"]["rps"] / r[f"go_raw{n}"]["rps"]
        )
    if python and 64 in loads_go:
        summary["go_coalesce_vs_python_coalesce64"] = med(
            lambda r: r["go_coalesce64"]["rps"] / r["python_coalesce64"]["rps"]
        )
        summary["go_raw_vs_python_raw64"] = med(
            lambda r: r["go_raw64"]["rps"] / r["python_raw64"]["rps"]
        )
    return summary


if __name__ == "__main__":
    main()

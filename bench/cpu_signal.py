"""What a CPU replica's CPU use says about its load: server CPU against offered load.

    python -m bench.cpu_signal [--rates 10,25,50,100,200] [--duration 8]

One ``embedserve serve`` (the packaged MiniLM, 2 torch threads). For each open-loop rate
(Poisson arrivals of one short sentence a call), then for 64 closed-loop callers (the
server's capacity), it reports the server's CPU use in cores, the calls in flight by
Little's law (rate x mean latency), and p50/p99. An autoscaler that targets CPU utilisation
reads the first column; the question is whether it tracks the share of capacity in use.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench import procs
from bench.loadgen import LoadSpec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rates", default="10,25,50,100,200")
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("bench/results/cpu-signal"))
    args = parser.parse_args()
    server = procs.wait_serving_log(
        procs.start_embedserve("cpu-signal", args.out / "logs", args.threads)
    )
    rows = []
    try:
        assert server.address is not None
        loads = [
            LoadSpec(server.address, mode="open", rate=float(rate), duration=args.duration)
            for rate in args.rates.split(",")
        ]
        loads.append(LoadSpec(server.address, concurrency=64, duration=args.duration))
        for spec in loads:
            result = procs.load_with_cpu(spec, server, 1 if spec.mode == "open" else 2)
            wall = spec.duration + spec.warmup
            latency = result["latency_ms"]
            row = {
                "load": f"open {spec.rate:g}/s" if spec.mode == "open" else "closed c=64",
                "rps": round(result["rps"], 1),
                "server_cores": round(result["server_cpu_s"] / wall, 2),
                "cpu_ms_per_call": round(result["server_cpu_ms_per_request"], 1),
                "in_flight": round(result["rps"] * latency["mean"] / 1e3, 2),
                "p50_ms": round(latency["p50"], 1),
                "p99_ms": round(latency["p99"], 1),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        server.stop()
    capacity = rows[-1]["rps"]
    for row in rows:
        row["share_of_capacity"] = round(row["rps"] / capacity, 3)
        row["cpu_utilisation"] = round(row["server_cores"] / args.threads, 3)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cpu-signal.json").write_text(json.dumps(rows, indent=1) + "\n")
    print("| load | req/s | share of capacity | CPU utilisation | in flight | p50 ms | p99 ms |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['load']} | {r['rps']} | {r['share_of_capacity']:.0%} | "
            f"{r['cpu_utilisation']:.0%} | {r['in_flight']} | {r['p50_ms']} | {r['p99_ms']} |"
        )


if __name__ == "__main__":
    main()

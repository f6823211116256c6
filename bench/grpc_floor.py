"""The floor of a Python gRPC server: CPU a unary call costs with no work behind it.

``python -m bench.grpc_floor`` starts a bare grpc.aio server whose Embed parses the request
and answers a prebuilt vector (no validation, no tokenizer, no engine), sends it open-loop
load at each rate, and reads the process's CPU time. What it spends a call is what any
grpc.aio transport costs on this machine before it does anything; it bounds the share of
the forward ceiling a one-text-a-call workload can reach with such a transport on the same
cores (docs/benchmarks.md, "The transport floor"). embedserve itself is not measured here:
its OpenMP threads spin between batches, so its CPU time is not its per-call cost.

``python -m bench.grpc_floor serve --port P`` runs only the bare server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from bench import procs
from bench.loadgen import LoadSpec
from embedserve.v1 import common_pb2, embed_service_pb2

SERVICE = "embedserve.v1.EmbedService"
DIMENSIONS = 384  # all-MiniLM-L6-v2's, so the response is as large as the real one


async def _serve(port: int) -> None:
    vector = np.random.default_rng(0).random(DIMENSIONS, dtype=np.float32).astype("<f4")
    embedding = common_pb2.Embedding(float32_bytes=vector.tobytes(), dimensions=DIMENSIONS)

    async def embed(
        request: embed_service_pb2.EmbedRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> embed_service_pb2.EmbedResponse:
        # Parsed and built like a real answer, so protobuf's share is counted too.
        return embed_service_pb2.EmbedResponse(
            model="floor",
            embeddings=[embedding],
            usage=common_pb2.Usage(inputs=len(request.inputs)),
        )

    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    handler = grpc.unary_unary_rpc_method_handler(
        embed,
        request_deserializer=embed_service_pb2.EmbedRequest.FromString,
        response_serializer=embed_service_pb2.EmbedResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler(SERVICE, {"Embed": handler})]
    )
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print(json.dumps({"message": "serving", "port": bound}), flush=True)
    await server.wait_for_termination()


def _cpu_ms_per_call(service: procs.Service, rate: float, load_procs: int) -> dict[str, Any]:
    result = procs.load_with_cpu(
        LoadSpec(service.address, mode="open", rate=rate), service, load_procs
    )
    return {
        "rate": rate,
        "rps": result["rps"],
        "p50_ms": result["latency_ms"]["p50"],
        "server_cpu_s": round(result["server_cpu_s"], 2),
        # Warm-up calls are sent too, and their CPU is counted.
        "server_cpu_ms_per_call": round(result["server_cpu_ms_per_request"], 3),
        "errors": result.get("errors", {}),
    }


def measure(out_dir: Path, rates: list[float], load_procs: int) -> dict[str, Any]:
    service = procs.wait_serving_log(procs.start_grpc_floor(out_dir))
    try:
        return {"bare_grpc_aio": [_cpu_ms_per_call(service, r, load_procs) for r in rates]}
    finally:
        service.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command")
    serve = sub.add_parser("serve")
    serve.add_argument("--port", type=int, required=True)
    parser.add_argument("--rates", default="150,300,600", help="open-loop calls/s, comma-separated")
    parser.add_argument("--procs", type=int, default=1, help="load generator processes")
    parser.add_argument("--out", type=Path, default=Path("bench/results/grpc-floor"))
    args = parser.parse_args()
    if args.command == "serve":
        asyncio.run(_serve(args.port))
        return
    started = time.time()
    rates = [float(r) for r in args.rates.split(",")]
    results = measure(args.out, rates, args.procs)
    results["seconds"] = round(time.time() - started, 1)
    (args.out / "floor.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

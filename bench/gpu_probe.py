"""Where a GPU server's time goes at small batches: one short run for a GPU machine.

    python -m bench.gpu_probe --out DIR [--size 0.6B]
    python -m bench.gpu_probe --out DIR --device cpu --size tiny   # a dry run of the script

bench/gpu.py found, on an H200, unary calls far under the model-alone ceiling while the GPU
sat mostly idle, and a c=1 latency well above the batch-1 forward. An eager transformers
forward is bound by Python dispatching kernels (about 1 ms a decoder layer there), and that
dispatch holds the GIL, which the asyncio loop needs for every call. This measures, in one
process run:

- FORWARD: the batch-1 forward (host tensors in, the vector back on the host) on the main
  thread, on a worker thread (as the server runs it), with torch at 1 CPU thread, and with a
  busy Python thread beside it (an event loop's share of the GIL); a 64-text batch beside.
- SERVERS at c=1 and c=64 with short texts: as shipped; with the interpreter's GIL switch
  interval at 0.5 ms (the default is 5 ms: a thread that waits for the GIL waits that long
  behind a thread that holds it); with torch's CPU pool at one thread; and a py-spy profile
  of the shipped server at c=64.

Results: probe.json, and profile summaries beside it.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench import procs
from bench.gpu import (
    MAX_BATCH_TOKENS,
    build_checkpoint,
    embed,
    load_model,
    make_texts,
    right_padded,
)
from bench.loadgen import LoadSpec, run_load
from bench.profile import record, summarise

SWITCH_INTERVAL_LAUNCHER = (
    "import runpy, sys; sys.setswitchinterval(float(sys.argv.pop(1)));"
    "runpy.run_module('embedserve.service', run_name='__main__', alter_sys=True)"
)


def _median_ms(run: Callable[[], Any], repeats: int = 30, warmups: int = 3) -> float:
    for _ in range(warmups):
        run()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


def forward_probe(folder: Path, texts: list[str], device: str, dtype: str) -> dict[str, float]:
    import torch

    model, tok, pad = load_model(folder, device, dtype)
    seqs = [e.ids for e in tok.encode_batch(texts[:64])]

    def forward(batch: list[list[int]]) -> Any:
        ids, mask = right_padded(batch, pad)
        with torch.inference_mode():
            if device == "cuda":
                ids = ids.pin_memory().to(device, non_blocking=True)
                mask = mask.pin_memory().to(device, non_blocking=True)
            return embed(model, ids, mask).cpu()

    one = [seqs[0]]
    pool = ThreadPoolExecutor(1)
    result = {
        "batch1_main_ms": _median_ms(lambda: forward(one)),
        "batch1_worker_ms": _median_ms(lambda: pool.submit(forward, one).result()),
        "batch64_main_ms": _median_ms(lambda: forward(seqs), repeats=10),
        "batch64_worker_ms": _median_ms(lambda: pool.submit(forward, seqs).result(), repeats=10),
    }
    stop = threading.Event()

    def busy() -> None:
        n = 0
        while not stop.is_set():
            n += 1

    spinner = threading.Thread(target=busy, daemon=True)
    spinner.start()
    # Every torch op releases the GIL and takes it back, each time behind the busy thread:
    # slow enough that a few repeats will do.
    result["batch1_worker_busy_thread_beside_ms"] = _median_ms(
        lambda: pool.submit(forward, one).result(), repeats=3, warmups=0
    )
    previous = sys.getswitchinterval()
    sys.setswitchinterval(0.0005)
    result["batch1_worker_busy_thread_beside_switch_0.5ms_ms"] = _median_ms(
        lambda: pool.submit(forward, one).result(), repeats=5, warmups=0
    )
    sys.setswitchinterval(previous)
    stop.set()
    spinner.join()
    threads = torch.get_num_threads()
    pool.submit(torch.set_num_threads, 1).result()
    torch.set_num_threads(1)
    result["batch1_worker_1_cpu_thread_ms"] = _median_ms(lambda: pool.submit(forward, one).result())
    torch.set_num_threads(threads)
    result["torch_cpu_threads_default"] = threads
    model.to("cpu")
    if device == "cuda":
        torch.cuda.empty_cache()
    return result


def server_args(folder: Path, device: str, dtype: str) -> list[str]:
    return [
        "serve",
        "--port",
        "0",
        "--model",
        str(folder),
        "--device",
        device,
        "--dtype",
        dtype,
        "--max-batch-tokens",
        str(MAX_BATCH_TOKENS),
        "--max-batch-size",
        "256",
    ]


def server_probe(
    name: str,
    command: list[str],
    texts_file: Path,
    out: Path,
    profile: bool,
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    server = procs.wait_serving_log(procs._spawn(name, command, out / "logs", env), timeout=600)
    entry: dict[str, Any] = {}
    try:
        for callers in (1, 64):
            spec = LoadSpec(
                target=server.address,
                concurrency=callers,
                duration=4.0,
                warmup=1.5,
                texts_file=str(texts_file),
            )
            result = procs.load_with_cpu(spec, server, min(4, callers))
            result.pop("raw_ok_s", None)
            entry[f"c{callers}"] = {
                "tokens_per_s": result["tokens_per_s"],
                "calls_per_s": result["rps"],
                "latency_ms": result["latency_ms"],
                "server_cpu_ms_per_request": result["server_cpu_ms_per_request"],
                "errors": result["errors"],
            }
        if profile:
            path = out / f"{name}-c64.speedscope.json"
            recorder = record(server.pid, 5, path, rate=200)
            run_load(
                LoadSpec(
                    target=server.address,
                    concurrency=64,
                    duration=6.0,
                    warmup=0.5,
                    texts_file=str(texts_file),
                ),
                4,
            )
            recorder.wait(60)
            summary = summarise(path)
            (out / f"{name}-c64-profile.json").write_text(json.dumps(summary, indent=1))
            entry["profile_components_pct"] = summary.get("components_pct")
            entry["profile_threads_busy_s"] = summary.get("threads_busy_s")
    finally:
        server.stop(60)
    return entry


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_probe", description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--size", default="0.6B")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--only", choices=("graphs",), help="run only this part")
    args = parser.parse_args(argv)
    dtype = "float16" if args.device == "cuda" else "float32"
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench.gpu_probe: no CUDA device here; nothing was measured.", file=sys.stderr)
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="probe-"))
    folder = build_checkpoint(work / "model", args.size, args.device, dtype)
    texts = make_texts(folder, 64, 2000)
    texts_file = work / "texts.json"
    texts_file.write_text(json.dumps(texts))
    name = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu (dry run)"
    results: dict[str, Any] = {"size": args.size, "device": name}

    def save(step: str) -> None:
        (args.out / "probe.json").write_text(json.dumps(results, indent=1))
        print(f"[{time.perf_counter() - started:6.1f} s] {step}", file=sys.stderr, flush=True)

    if args.only == "graphs":
        results["graphs"] = graph_probe(folder, texts)
        save(f"graphs {results['graphs']}")
        return 0
    results["forward"] = forward_probe(folder, texts, args.device, dtype)
    save(f"forward {results['forward']}")
    plain = [sys.executable, "-m", "embedserve.service", *server_args(folder, args.device, dtype)]
    switched = [
        sys.executable,
        "-c",
        SWITCH_INTERVAL_LAUNCHER,
        "0.0005",
        *server_args(folder, args.device, dtype),
    ]
    variants: list[tuple[str, list[str], bool, dict[str, str] | None]] = [
        ("shipped", plain, True, None),
        ("switch-0.5ms", switched, False, None),
        # torch's CPU pool idles beside a GPU forward; its threads spin before they sleep.
        ("omp-1-thread", plain, False, {"OMP_NUM_THREADS": "1"}),
    ]
    for name, command, profile, env in variants:
        results[name] = server_probe(name, command, texts_file, args.out, profile, env)
        entry = results[name]
        save(
            f"{name}: c=1 p50 {entry['c1']['latency_ms']['p50']:.1f} ms, "
            f"c=64 {entry['c64']['tokens_per_s']:,.0f} tokens/s, "
            f"p50 {entry['c64']['latency_ms']['p50']:.0f} ms, "
            f"server CPU {entry['c64']['server_cpu_ms_per_request']:.2f} ms a call"
        )
    return 0


def graph_probe(folder: Path, texts: list[str]) -> dict[str, Any]:
    """Whether the embedding step (transformers forward, last-token pooling, normalize)
    captures into a CUDA graph, whether a replay on other inputs (another padding pattern
    than the captured one) matches eager, and what a replay costs against eager."""
    import torch

    model, tok, pad = load_model(folder, "cuda", "float16")
    seqs = [e.ids for e in tok.encode_batch(texts[:256])]

    def tensors(batch: list[list[int]], width: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask = right_padded(batch, pad, width)
        return ids.cuda(), mask.cuda()

    out: dict[str, Any] = {}
    for rows in (1, 64):
        try:
            out[f"batch{rows}"] = _graph_case(
                functools.partial(embed, model), tensors, seqs[:rows], seqs[rows : 2 * rows]
            )
        except Exception as exc:  # the probe reports whatever capture raises
            out[f"batch{rows}"] = {
                "captured": False,
                "error": f"{type(exc).__name__}: {exc}"[:2000],
            }
    model.to("cpu")
    torch.cuda.empty_cache()
    return out


def _graph_case(step: Any, tensors: Any, first: list[list[int]], second: list[list[int]]) -> Any:
    """Capture ``step`` on ``first``, replay it on ``second`` and on a mask without padding."""
    import torch

    width = 64
    static_ids, static_mask = tensors(first, width)
    side = torch.cuda.Stream()  # type: ignore[no-untyped-call]
    side.wait_stream(torch.cuda.current_stream())
    with torch.inference_mode():
        with torch.cuda.stream(side):
            for _ in range(3):
                step(static_ids, static_mask)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = step(static_ids, static_mask)
        ids, mask = tensors(second, width)

        def replay(mask: Any = mask) -> Any:
            static_ids.copy_(ids)
            static_mask.copy_(mask)
            graph.replay()
            return static_out.cpu()

        def eager(mask: Any = mask) -> Any:
            return step(ids, mask).cpu()

        full = torch.ones_like(mask)
        return {
            "captured": True,
            "cosine_min_other_padding": float((replay() * eager()).sum(1).min()),
            "cosine_min_no_padding": float((replay(full) * eager(full)).sum(1).min()),
            "replay_ms": _median_ms(replay),
            "eager_ms": _median_ms(eager),
        }


if __name__ == "__main__":
    sys.exit(main())

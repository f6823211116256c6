"""The benchmark suite for a GPU machine: Qwen3-Embedding shapes in float16.

    python -m bench.gpu [--sizes 0.6B,4B] [--out bench/results/gpu-DATE] [--quick]
    python -m bench.gpu --device cpu --sizes tiny --quick   # a dry run of the script itself

No weights are downloaded: for each size a checkpoint with the real published shapes
(Qwen3-Embedding-0.6B and -4B config.json: layers, widths, heads, vocabulary) and RANDOM
weights is built offline, with a small byte-level BPE tokenizer trained on the spot like
tests/support/qwen3.py does (it appends <|endoftext|>, as the real one). Random weights
compute exactly as much as trained ones, so throughput is what the real model would get.

For each size it measures, in one run:
- the CEILING: the model alone (transformers Qwen3Model, float16, SDPA, last-token pooling and
  normalization) on pre-tokenized, length-sorted batches of the same texts, at several
  batch shapes within the server's token budget, tokens/s at the best one;
  the batch-1 forward time is measured beside it, the floor of a single call's latency;
- embedserve (its own ``embedserve serve --device cuda --dtype float16`` process): unary
  closed loop of one text a call at 1, 64 and 256 callers, of 32 texts a call at 16 callers,
  and a bulk EmbedStream; tokens/s and the ratio to the ceiling, p50/p99. ``--variants``
  measures several servers (their extra flags) against the same ceiling.

Without a CUDA device it prints why and exits 0 (``--device cpu`` runs the whole script on
the ``tiny`` shape in float32, to check the script, not to measure). Results: results.json
(rewritten after every step, so a run cut short keeps what it measured) and results.md.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import procs
from bench.loadgen import BulkSpec, LoadSpec, run_bulk, run_load

# From the published config.json of each checkpoint (Qwen/Qwen3-Embedding-*).
SHAPES: dict[str, dict[str, Any]] = {
    "0.6B": {
        "hidden_size": 1024,
        "intermediate_size": 3072,
        "num_hidden_layers": 28,
        "num_attention_heads": 16,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "vocab_size": 151669,
        "max_position_embeddings": 32768,
        "tie_word_embeddings": True,
    },
    "4B": {
        "hidden_size": 2560,
        "intermediate_size": 9728,
        "num_hidden_layers": 36,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "vocab_size": 151665,
        "max_position_embeddings": 40960,
        "tie_word_embeddings": True,
    },
    "8B": {
        "hidden_size": 4096,
        "intermediate_size": 12288,
        "num_hidden_layers": 36,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "vocab_size": 151665,
        "max_position_embeddings": 40960,
        "tie_word_embeddings": False,
    },
    # Not a published model: the dry run's shape (``--device cpu``).
    "tiny": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "vocab_size": 1000,
        "max_position_embeddings": 2048,
        "tie_word_embeddings": True,
    },
}
MAX_BATCH_TOKENS = 16384
TEXT_TOKENS = (64, 256)  # approximate lengths of the benchmark texts


def build_checkpoint(
    folder: Path,
    size: str,
    device: str,
    dtype: str,
    *,
    reranker: bool = False,
    layers: int | None = None,
) -> Path:
    """Tokenizer (offline BPE, as tests/support/qwen3.py) + random weights in ``dtype``.
    ``reranker``: a Qwen3-Reranker's tokenizer (no end-of-text appended); ``layers``: fewer
    layers of the same shape, for a CPU."""
    import torch
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

    from tests.support.qwen3 import ENDOFTEXT, build_qwen3_tokenizer

    build_qwen3_tokenizer(folder, append_eos=not reranker)
    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    eos = tokenizer.convert_tokens_to_ids(ENDOFTEXT)
    if not isinstance(eos, int):
        raise TypeError(f"unexpected id for {ENDOFTEXT}: {eos!r}")
    shape = dict(SHAPES[size])
    if layers is not None:
        shape["num_hidden_layers"] = layers
    config = Qwen3Config(
        **shape,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
        dtype=dtype,
        pad_token_id=eos,
        eos_token_id=eos,
        bos_token_id=None,
        architectures=["Qwen3ForCausalLM"],
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen3ForCausalLM(config).to(getattr(torch, dtype))
    model.save_pretrained(str(folder), safe_serialization=True)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return folder


def make_texts(folder: Path, tokens: int, count: int, seed: int = 0) -> list[str]:
    """Texts of about ``tokens`` tokens under the checkpoint's own tokenizer."""
    from tokenizers import Tokenizer

    from tests.support.qwen3 import _CORPUS

    words = _CORPUS.split()
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        text = " ".join(rng.choice(words) for _ in range(tokens))
        ids = tok.encode(text, add_special_tokens=False)
        target = max(1, rng.randint(tokens // 2, tokens) - 1)
        end = ids.offsets[min(target, len(ids.offsets)) - 1][1]
        out.append(text[:end])
    return out


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def load_model(folder: Path, device: str, dtype: str) -> tuple[Any, Any, int]:
    """The checkpoint as transformers' Qwen3Model (SDPA, eval mode) on ``device``, its
    tokenizer with padding off, and the pad id."""
    import torch
    from tokenizers import Tokenizer
    from transformers import AutoModel

    model = AutoModel.from_pretrained(
        str(folder), dtype=getattr(torch, dtype), attn_implementation="sdpa", local_files_only=True
    ).to(device)
    model.eval()
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok.no_padding()
    return model, tok, tok.token_to_id("<|endoftext|>") or 0


def right_padded(seqs: list[list[int]], pad: int, width: int = 0) -> tuple[Any, Any]:
    """Host tensors (ids, mask) of ``seqs`` right-padded to ``width`` (0: the longest, rounded
    up to a multiple of 8, as the server does on CUDA); longer sequences are cut."""
    import torch

    width = width or -(-max(len(s) for s in seqs) // 8) * 8
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, s in enumerate(seqs):
        kept = s[:width]
        ids[row, : len(kept)] = torch.tensor(kept)
        mask[row, : len(kept)] = 1
    return ids, mask


def embed(model: Any, ids: Any, mask: Any) -> Any:
    """Qwen3-Embedding's recipe on the device: last-token pooling, then normalization."""
    import torch
    import torch.nn.functional as F  # noqa: N812

    hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
    pooled = hidden[torch.arange(ids.shape[0], device=ids.device), mask.sum(1) - 1]
    return F.normalize(pooled.float(), dim=1)


def ceiling(
    folder: Path, texts: list[str], seconds: float, device: str, dtype: str
) -> dict[str, Any]:
    """The model alone: best tokens/s over batch shapes within the token budget, and the
    median batch-1 forward (a single call's floor)."""
    import torch

    model, tok, pad = load_model(folder, device, dtype)
    seqs = sorted((e.ids for e in tok.encode_batch(texts)), key=len)

    def step(ids: torch.Tensor, mask: torch.Tensor) -> Any:
        with torch.inference_mode():
            return embed(model, ids, mask).cpu()

    def padded(chunk: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, int]:
        ids, mask = right_padded(chunk, pad)
        return ids.to(device), mask.to(device), sum(len(s) for s in chunk)

    # Batch 1, the median text: host tensors in, the normalized vector back on the host,
    # as a single call needs.
    one = seqs[len(seqs) // 2]
    for _ in range(3):
        step(*padded([one])[:2])
    single = []
    for _ in range(30):
        started = time.perf_counter()
        ids, mask, _ = padded([one])
        step(ids, mask)
        single.append(time.perf_counter() - started)
    single.sort()

    results = []
    longest = max(len(s) for s in seqs)
    for batch_size in (8, 32, 64, 128, 256):
        if batch_size * longest > MAX_BATCH_TOKENS * 2:
            continue
        batches = [
            padded(seqs[i : i + batch_size])
            for i in range(0, len(seqs) - batch_size + 1, batch_size)
        ]
        if not batches:
            continue
        step(*batches[0][:2])
        _sync(device)
        done = n = 0
        started = time.perf_counter()
        while time.perf_counter() - started < seconds or n < 3:
            ids, mask, tokens = batches[n % len(batches)]
            step(ids, mask)
            done += tokens
            n += 1
        _sync(device)
        elapsed = time.perf_counter() - started
        results.append({"batch_size": batch_size, "tokens_per_s": done / elapsed, "batches": n})
    model.to("cpu")
    if device == "cuda":
        torch.cuda.empty_cache()
    best = max(results, key=lambda r: r["tokens_per_s"])
    return {
        "sweep": results,
        "best": best,
        "batch1_forward_ms": {
            "p50": 1000 * single[len(single) // 2],
            "min": 1000 * single[0],
            "tokens": len(one),
        },
    }


def _progress(message: str, started: float) -> None:
    print(
        f"bench.gpu [{time.perf_counter() - started:6.1f} s] {message}", file=sys.stderr, flush=True
    )


def parse_variants(text: str) -> dict[str, list[str]]:
    """``NAME=ARGS;NAME=ARGS``: server variants, each the extra flags of its server."""
    return dict(procs.named_flags(part) for part in text.split(";") if part.strip())


LOADS = {"unary_c1": (1, 1), "unary_c64": (64, 1), "unary_c256": (256, 1), "many32_c16": (16, 32)}


def measure_server(
    name: str, flags: list[str], folder: Path, texts_file: Path, args: argparse.Namespace
) -> dict[str, Any]:
    """One embedserve process with ``flags``: every load, then the bulk stream."""
    duration = 3.0 if args.quick else 15.0
    server = procs.wait_serving_log(
        procs.start_embedserve(
            name,
            args.out / "logs",
            1,
            [
                "--model",
                str(folder),
                "--device",
                args.device,
                "--dtype",
                args.dtype,
                "--max-batch-tokens",
                str(MAX_BATCH_TOKENS),
                "--max-batch-size",
                "256",
                "--max-queue-tokens",
                str(MAX_BATCH_TOKENS * 16),
                "--stream-window",
                "64",
                *flags,
            ],
        ),
        timeout=900,
    )
    entry: dict[str, Any] = {"flags": flags}
    try:
        for key, (callers, inputs) in LOADS.items():
            spec = LoadSpec(
                target=server.address,
                concurrency=callers,
                duration=duration,
                warmup=1.5 if args.quick else 3.0,
                workload="many" if inputs > 1 else "short",
                inputs=inputs,
                texts_file=str(texts_file),
            )
            entry[key] = run_load(spec, procs=min(args.loadgen_procs, callers))
            entry[key].pop("raw_ok_s", None)
        entry["bulk"] = asyncio.run(
            run_bulk(
                BulkSpec(
                    target=server.address,
                    count=2000,
                    duration=duration,
                    batch_size=64,
                    window=64,
                    texts_file=str(texts_file),
                )
            )
        )
        entry["bulk"].pop("timeline", None)
    finally:
        server.stop(60)
    return entry


def run_size(size: str, args: argparse.Namespace, save: Any, result: dict[str, Any]) -> None:
    """Fill ``result`` for one size, calling ``save()`` after every step."""
    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix=f"qwen3-{size}-"))
    folder = build_checkpoint(work / "model", size, args.device, args.dtype)
    _progress(f"{size}: checkpoint built", started)
    result.update({"size": size, "shape": SHAPES[size]})
    for tokens in TEXT_TOKENS:
        texts = make_texts(folder, tokens, 2000)
        texts_file = work / f"texts-{tokens}.json"
        texts_file.write_text(json.dumps(texts))
        entry: dict[str, Any] = {"servers": {}}
        result[f"texts_{tokens}"] = entry
        seconds = 1.5 if args.quick else 7.5
        entry["ceiling"] = ceiling(folder, texts, seconds, args.device, args.dtype)
        save()
        _progress(f"{size} ~{tokens} tokens: ceiling {entry['ceiling']['best']}", started)
        best = entry["ceiling"]["best"]["tokens_per_s"]
        for variant, flags in args.variants.items():
            name = f"embedserve-{size}-{tokens}-{variant}"
            server = measure_server(name, flags, folder, texts_file, args)
            for key in (*LOADS, "bulk"):
                server[f"{key}_vs_ceiling"] = server[key]["tokens_per_s"] / best
            entry["servers"][variant] = server
            save()
            _progress(f"{size} ~{tokens} tokens: {variant} done", started)
    shutil.rmtree(work, ignore_errors=True)


def markdown(results: dict[str, Any]) -> str:
    lines = [
        f"# embedserve on GPU (random weights, real Qwen3-Embedding shapes, {results['dtype']})",
        "",
        f"{results['device']}, torch {results['torch']}, transformers "
        f"{results['transformers']}, {results['date']}",
        "",
        "Tokens/s, and in brackets the share of the model-alone ceiling measured in the same run.",
        "",
        "| size | text tokens | server | ceiling tok/s (batch) | unary c=64 | c=256 | "
        "32 texts/call c=16 | bulk stream | c=1 p50 ms (batch-1 forward) | c=64 p50/p99 ms |",
        "|---|---:|---|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in results["sizes"]:
        for tokens in TEXT_TOKENS:
            e = r.get(f"texts_{tokens}")
            if not e or "ceiling" not in e:
                continue
            c = e["ceiling"]["best"]
            forward1 = e["ceiling"]["batch1_forward_ms"]["p50"]
            for variant, v in e["servers"].items():

                def cell(key: str, v: dict[str, Any] = v) -> str:
                    return f"{v[key]['tokens_per_s']:,.0f} ({v[f'{key}_vs_ceiling']:.0%})"

                u1, u64 = v["unary_c1"]["latency_ms"], v["unary_c64"]["latency_ms"]
                lines.append(
                    f"| {r['size']} | ~{tokens} | {variant} | "
                    f"{c['tokens_per_s']:,.0f} ({c['batch_size']}) | "
                    f"{cell('unary_c64')} | {cell('unary_c256')} | {cell('many32_c16')} | "
                    f"{cell('bulk')} | {u1['p50']:.1f} ({forward1:.1f}) | "
                    f"{u64['p50']:.0f}/{u64['p99']:.0f} |"
                )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__)
    parser.add_argument("--sizes", default="0.6B,4B", help=f"any of {', '.join(SHAPES)}")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--loadgen-procs", type=int, default=4)
    parser.add_argument(
        "--variants",
        default="shipped=",
        help="servers to measure against the same ceiling: NAME=FLAGS;NAME=FLAGS "
        "(e.g. 'shipped=;graphs=--cuda-graph-tokens 8192')",
    )
    args = parser.parse_args(argv)
    args.variants = parse_variants(args.variants)
    args.dtype = "float16" if args.device == "cuda" else "float32"
    try:
        import torch
        import transformers
    except ImportError:
        print("bench.gpu: torch is not installed; nothing to measure.", file=sys.stderr)
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        print(
            "bench.gpu: no CUDA device here (torch.cuda.is_available() is False); "
            "run it on a GPU machine. Nothing was measured.",
            file=sys.stderr,
        )
        return 0
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    unknown = [s for s in sizes if s not in SHAPES]
    if unknown:
        parser.error(f"unknown sizes {unknown}; choose from {', '.join(SHAPES)}")
    stamp = datetime.datetime.now().strftime("%Y-%m-%d_%H%M%S")
    out: Path = args.out or procs.ROOT / "bench" / "results" / f"gpu-{stamp}"
    out.mkdir(parents=True, exist_ok=True)
    args.out = out
    results: dict[str, Any] = {
        "device": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu (dry run)",
        "dtype": args.dtype,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "quick": args.quick,
        "sizes": [],
    }

    def save() -> None:
        (out / "results.json").write_text(json.dumps(results, indent=1))
        (out / "results.md").write_text(markdown(results))

    for size in sizes:
        print(f"bench.gpu: {size} ...", file=sys.stderr, flush=True)
        results["sizes"].append({})
        run_size(size, args, save, results["sizes"][-1])
    save()
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The padded forward against the padding-free one, the model alone, on the same batches.

    python -m bench.packed_forward [--model qwen3|minilm] [--layers 4] [--threads 2]
                                   [--inputs short|mixed|rerank] [--shared-prefix 0]
                                   [--batch 32] [--batches 8]
                                   [--rounds 3] [--out FILE]

``qwen3``: a randomly initialised Qwen3 decoder with Qwen3-Embedding-0.6B's layer shape
(hidden 1024, 16 query and 8 key/value heads of 128, MLP 3072) and ``--layers`` layers (the
real model has 28; every layer costs the same, so the ratio holds). ``minilm``: the packaged
all-MiniLM-L6-v2. The batches are random draws, in arrival order, of the benchmark's texts,
as token counts (``short``: one short sentence, 10 to 25 tokens; ``mixed``: 16 to 512 tokens,
at most the model's limit; ``rerank``: the rerank scenario's 100 documents), with random ids:
only the lengths matter to the time. ``--shared-prefix N`` starts every row with the same N
tokens, as a reranker's judging prompt and query do. Each round runs the padded forward
(Hugging Face's), the padding-free forward with attention in blocks of one length (the CPU's
default; for Qwen3 also without sharing a prefix) and with attention padded (CUDA's), in
turn. Prints tokens/s of each, and each one's ratio to the padded, a round at a time and the
medians.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from bench import texts as corpus

Forward = Callable[[torch.Tensor, torch.Tensor], Any]


def _forwards(model: Any, packed: dict[str, Any], pooling: str) -> dict[str, Forward]:
    """Hugging Face's padded forward, then each padding-free one of ``packed``."""

    def pooled(encoder: Any) -> Forward:
        return lambda ids, mask: getattr(encoder(ids, mask), pooling)()

    return {
        "padded": lambda ids, mask: model(input_ids=ids, attention_mask=mask).last_hidden_state,
        **{name: pooled(encoder) for name, encoder in packed.items()},
    }


def _qwen3(layers: int) -> tuple[dict[str, Forward], int, int]:
    """A random Qwen3 decoder of the 0.6B layer shape: its forwards, vocabulary and limit."""
    from transformers import Qwen3Config, Qwen3Model

    from embedserve.service.models.packed_qwen3 import PackedQwen3Decoder

    config = Qwen3Config(
        vocab_size=151669,
        hidden_size=1024,
        intermediate_size=3072,
        num_hidden_layers=layers,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=128,
        max_position_embeddings=32768,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
    )
    torch.manual_seed(0)
    model = Qwen3Model(config).eval()  # type: ignore[no-untyped-call]
    packed = {
        "by_length": PackedQwen3Decoder(model, by_length=True),
        "by_length_unshared": PackedQwen3Decoder(model, by_length=True, share_prefix=False),
        "packed_padded": PackedQwen3Decoder(model, by_length=False),
    }
    return _forwards(model, packed, "last"), config.vocab_size, 512


def _minilm() -> tuple[dict[str, Forward], int, int]:
    """The packaged all-MiniLM-L6-v2: its forwards, vocabulary and limit (256 tokens)."""
    from transformers import AutoModel

    from embedserve.service.models.packed_bert import PackedBertEncoder

    model = AutoModel.from_pretrained(str(corpus.model_folder())).eval()
    packed = {
        "by_length": PackedBertEncoder(model, by_length=True),
        "packed_padded": PackedBertEncoder(model, by_length=False),
    }
    return _forwards(model, packed, "mean"), model.config.vocab_size, 256


def _batches(
    inputs: str, batch: int, count: int, vocab: int, limit: int, prefix: int
) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
    if inputs == "rerank":
        texts = corpus.rerank_documents(100)[1]
    else:
        texts = corpus.short_sentences(2000) if inputs == "short" else corpus.mixed_lengths(400)
    lengths = [min(prefix + n, limit) for n in corpus.token_counts(texts)]
    rng = random.Random(0)
    made = []
    for _ in range(count):
        drawn = rng.sample(lengths, batch)
        width = max(drawn)
        ids = torch.randint(1, vocab, (batch, width))
        ids[:, :prefix] = ids[0, :prefix]
        mask = torch.zeros_like(ids)
        for row, length in enumerate(drawn):
            mask[row, :length] = 1
        made.append((ids * mask, mask, sum(drawn)))
    return made


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.packed_forward", description=__doc__)
    parser.add_argument("--model", choices=("qwen3", "minilm"), default="qwen3")
    parser.add_argument("--layers", type=int, default=4, help="qwen3 only")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--inputs", choices=("short", "mixed", "rerank"), default="short")
    parser.add_argument(
        "--shared-prefix",
        type=int,
        default=0,
        help="tokens every row starts with (a reranker's prompt and query)",
    )
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    forwards, vocab, limit = _qwen3(args.layers) if args.model == "qwen3" else _minilm()
    batches = _batches(args.inputs, args.batch, args.batches, vocab, limit, args.shared_prefix)
    tokens = sum(b[2] for b in batches)
    rounds: list[dict[str, float]] = []
    with torch.inference_mode():
        for forward in forwards.values():
            forward(*batches[0][:2])  # warm
        for index in range(args.rounds):
            row: dict[str, float] = {}
            for name, forward in forwards.items():
                started = time.perf_counter()
                for ids, mask, _ in batches:
                    forward(ids, mask)
                row[name] = tokens / (time.perf_counter() - started)
            row |= {f"{name}_vs_padded": row[name] / row["padded"] for name in list(row)[1:]}
            rounds.append(row)
            print(index, {k: round(v, 3 if "vs" in k else 0) for k, v in row.items()}, flush=True)
    median = {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}
    print("median", {k: round(v, 3 if "vs" in k else 0) for k, v in median.items()})
    if args.out is not None:
        args.out.write_text(
            json.dumps({"settings": vars(args) | {"out": str(args.out)}, "rounds": rounds}) + "\n"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

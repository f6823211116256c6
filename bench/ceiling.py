"""The CEILING: the model alone in a loop, no server.

The packaged all-MiniLM-L6-v2 folder loaded with plain transformers, the same mean pooling
(and L2 normalization) as the server, the same torch thread count, the same inputs, and the
same weights precision (``--dtype``, the server's: float32 unless the run says otherwise). Inputs
are tokenized and padded before the clock starts: what is timed is the forward pass, the
pooling and the copy of the result to numpy, as on the server's forward thread.

Runs as its own process (``python -m bench.ceiling --threads 2 [--dtype bfloat16|int8]``) that
answers JSON commands, one a line on stdin, so that ``bench.run`` can interleave ceiling
measurements with server measurements in one run without loading the model again.

Commands: ``{"op": "throughput", "inputs": "short"|"bulk"|"mixed", "batch_size": 32,
"seconds": 3, "sort": false, "packed": false, "workers": 1}`` (``packed``: the server's
padding-free forward, ``service/models/packed_bert.py``, instead of plain transformers;
``workers``: that many threads each running batches with an equal share of the torch
threads, as the server's ``--forward-workers`` do),
``{"op": "forward_ms", "batch_size": 1, "length": 0, "repeats": 50}`` (length 0: the short
sentences, a different batch each repeat, as the load generator sends them; else a batch of
that many tokens each).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812 - the idiomatic name

from bench import texts as corpus
from bench.procs import DTYPES
from embedserve.service.models.loading import resolve_device
from embedserve.service.models.packed_bert import PackedBertEncoder
from embedserve.service.models.quantization import apply_int8

MAX_TOKENS = 256  # all-MiniLM-L6-v2's max_seq_length (sentence_bert_config.json)


class Ceiling:
    def __init__(self, threads: int, dtype: str = "float32") -> None:
        from tokenizers import Tokenizer
        from transformers import AutoModel

        torch.set_num_threads(threads)
        self.threads = threads
        self.dtype = dtype
        folder = corpus.model_folder()
        self.model = AutoModel.from_pretrained(str(folder), local_files_only=True)
        device = resolve_device("cpu", dtype)  # the server's reading of --dtype
        # Before the packed encoder fuses the projections: it keeps the weights' dtype.
        self.model.to(device.dtype)
        self.model.eval()
        # Shares the model's weights. Exact token counts, unlike the server in bfloat16 and
        # int8 (packing.py's round_tokens): the loop cycles through at most 200 batches, so
        # oneDNN compiles each one's shapes once, and no padding rows are computed.
        self._packed = PackedBertEncoder(self.model)
        # As the server's adapter does: int8 converts the fused projections too.
        apply_int8(device, self.model, self._packed.layers)
        tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
        tok.no_padding()
        tok.enable_truncation(MAX_TOKENS)
        self.tokenizer = tok
        self._pools: dict[str, list[list[int]]] = {}

    def pool(self, name: str) -> list[list[int]]:
        if name not in self._pools:
            if name == "short":
                texts = corpus.short_sentences(2000)
            elif name == "bulk":
                texts = corpus.bulk_corpus(5000)
            elif name == "mixed":
                texts = corpus.mixed_lengths(400)
            else:
                raise ValueError(f"unknown inputs {name!r}")
            self._pools[name] = [list(e.ids) for e in self.tokenizer.encode_batch(texts)]
        return self._pools[name]

    @staticmethod
    def _tensors(batch: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, int]:
        width = max(len(s) for s in batch)
        ids = torch.zeros((len(batch), width), dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, seq in enumerate(batch):
            ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
        return ids, mask, sum(len(s) for s in batch)

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, packed: bool = False) -> Any:
        with torch.inference_mode():
            if packed:
                pooled = self._packed(ids, mask).mean()
            else:
                hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
                m = mask.unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1e-9)
            # float32 on the host, as the server's runner returns every batch.
            return F.normalize(pooled.float(), p=2, dim=1).numpy()

    def throughput(
        self,
        inputs: str,
        batch_size: int,
        seconds: float,
        sort: bool,
        threads: int = 0,
        packed: bool = False,
        workers: int = 1,
    ) -> dict[str, Any]:
        """``threads`` > 0 runs this one measurement with that many torch threads in all."""
        threads = threads or self.threads
        workers = min(workers, threads)  # a worker has at least one thread
        seqs = self.pool(inputs)
        if sort:
            seqs = sorted(seqs, key=len)
        batches = [
            self._tensors(seqs[i : i + batch_size])
            for i in range(0, len(seqs) - batch_size + 1, batch_size)
        ][:200]
        # torch's thread count is per calling thread: each worker sets its own share.
        counts = [_Count() for _ in range(workers)]
        start = threading.Barrier(workers)
        jobs = [
            threading.Thread(
                target=self._loop,
                args=(batches[i::workers], packed, seconds, max(1, threads // workers), start, c),
            )
            for i, c in enumerate(counts)
        ]
        for job in jobs:
            job.start()
        for job in jobs:
            job.join()
        elapsed = max(c.seconds for c in counts)
        done_tokens = sum(c.tokens for c in counts)
        return {
            "inputs": inputs,
            "batch_size": batch_size,
            "sorted": sort,
            "tokens_per_s": done_tokens / elapsed,
            "sentences_per_s": sum(c.sequences for c in counts) / elapsed,
            "padding_ratio": 1 - done_tokens / sum(c.padded for c in counts),
            "batches": sum(c.batches for c in counts),
            "seconds": elapsed,
            "threads": threads,
            "packed": packed,
            "workers": workers,
        }

    def _loop(
        self,
        batches: list[tuple[torch.Tensor, torch.Tensor, int]],
        packed: bool,
        seconds: float,
        threads: int,
        start: threading.Barrier,
        count: _Count,
    ) -> None:
        torch.set_num_threads(threads)
        self._forward(*batches[0][:2], packed=packed)  # warm
        start.wait()
        started = time.perf_counter()
        while True:
            ids, mask, tokens = batches[count.batches % len(batches)]
            self._forward(ids, mask, packed)
            count.batches += 1
            count.tokens += tokens
            count.sequences += ids.shape[0]
            count.padded += ids.numel()
            count.seconds = time.perf_counter() - started
            if count.seconds >= seconds and count.batches >= 3:
                return

    def forward_ms(
        self, batch_size: int, length: int, repeats: int, threads: int = 0, packed: bool = False
    ) -> dict[str, Any]:
        if threads:
            torch.set_num_threads(threads)
        try:
            result = self._forward_ms(batch_size, length, repeats, packed)
        finally:
            torch.set_num_threads(self.threads)
        result["threads"] = threads or self.threads
        result["packed"] = packed
        return result

    def _forward_ms(
        self, batch_size: int, length: int, repeats: int, packed: bool
    ) -> dict[str, Any]:
        if length:
            seq = self.tokenizer.encode("warm up " * length).ids[:length]
            batches = [self._tensors([list(seq)] * batch_size)]
        else:
            # The sentences the load generator sends, not one of them: lengths differ, and
            # the first sentence alone was 1-1.5 ms faster than their median at batch 1.
            pool = self.pool("short")
            batches = [
                self._tensors(pool[i : i + batch_size])
                for i in range(0, min(len(pool), repeats * batch_size), batch_size)
            ]
        self._forward(*batches[0][:2], packed)
        times = []
        for step in range(repeats):
            ids, mask, _ = batches[step % len(batches)]
            started = time.perf_counter()
            self._forward(ids, mask, packed)
            times.append(time.perf_counter() - started)
        widths = sorted(int(b[0].shape[1]) for b in batches)
        return {
            "batch_size": batch_size,
            "tokens": statistics.median(b[2] for b in batches),
            "width": widths[len(widths) // 2],
            "median_ms": statistics.median(times) * 1e3,
            "min_ms": min(times) * 1e3,
            "repeats": repeats,
        }


class _Count:
    """One worker's share of a throughput measurement."""

    def __init__(self) -> None:
        self.batches = self.tokens = self.sequences = self.padded = 0
        self.seconds = 0.0


def serve(threads: int, dtype: str) -> None:
    ceiling = Ceiling(threads, dtype)
    hello = {"ready": True, "threads": threads, "dtype": dtype, "torch": torch.__version__}
    print(json.dumps(hello), flush=True)
    for line in sys.stdin:
        command = json.loads(line)
        op = command.pop("op")
        if op == "throughput":
            reply = ceiling.throughput(**command)
        elif op == "forward_ms":
            reply = ceiling.forward_ms(**command)
        elif op == "quit":
            return
        else:
            reply = {"error": f"unknown op {op!r}"}
        print(json.dumps(reply), flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ceiling", description=__doc__)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="weights precision")
    parser.add_argument("--sweep", action="store_true", help="print a batch-size sweep and exit")
    args = parser.parse_args(argv)
    if args.sweep:
        ceiling = Ceiling(args.threads, args.dtype)
        for size in (1, 8, 32, 64):
            for sort in (False, True):
                for packed in (False, True):
                    print(json.dumps(ceiling.throughput("short", size, 3.0, sort, packed=packed)))
                if size > 1 and args.threads > 1:
                    print(json.dumps(ceiling.throughput("short", size, 3.0, sort, True, workers=2)))
        print(json.dumps(ceiling.forward_ms(1, 0, 50)))
        return 0
    serve(args.threads, args.dtype)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The CEILING: the model alone in a loop, no server.

The packaged all-MiniLM-L6-v2 folder loaded with plain transformers, the same mean pooling
(and L2 normalization) as the server, the same torch thread count, the same inputs. Inputs
are tokenized and padded before the clock starts: what is timed is the forward pass, the
pooling and the copy of the result to numpy, as on the server's forward thread.

Runs as its own process (``python -m bench.ceiling --threads 2``) that answers JSON
commands, one a line on stdin, so that ``bench.run`` can interleave ceiling measurements
with server measurements in one run without loading the model again.

Commands: ``{"op": "throughput", "inputs": "short"|"bulk"|"mixed", "batch_size": 32,
"seconds": 3, "sort": false, "packed": false}`` (``packed``: the server's padding-free
forward, ``service/models/packed_bert.py``, instead of plain transformers),
``{"op": "forward_ms", "batch_size": 1, "length": 0, "repeats": 50}`` (length 0: the short
sentences; else a batch of that many tokens each).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812 - the idiomatic name

from bench import texts as corpus
from embedserve.service.models.packed_bert import PackedBertEncoder

MAX_TOKENS = 256  # all-MiniLM-L6-v2's max_seq_length (sentence_bert_config.json)


class Ceiling:
    def __init__(self, threads: int) -> None:
        from tokenizers import Tokenizer
        from transformers import AutoModel

        torch.set_num_threads(threads)
        self.threads = threads
        folder = corpus.model_folder()
        self.model = AutoModel.from_pretrained(str(folder), local_files_only=True)
        self.model.eval()
        self._packed = PackedBertEncoder(self.model)  # shares the model's weights
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
            return F.normalize(pooled, p=2, dim=1).numpy()

    def throughput(
        self,
        inputs: str,
        batch_size: int,
        seconds: float,
        sort: bool,
        threads: int = 0,
        packed: bool = False,
    ) -> dict[str, Any]:
        """``threads`` > 0 runs this one measurement with that many torch threads."""
        if threads:
            torch.set_num_threads(threads)
        try:
            result = self._throughput(inputs, batch_size, seconds, sort, packed)
        finally:
            torch.set_num_threads(self.threads)
        result["threads"] = threads or self.threads
        result["packed"] = packed
        return result

    def _throughput(
        self, inputs: str, batch_size: int, seconds: float, sort: bool, packed: bool
    ) -> dict[str, Any]:
        seqs = self.pool(inputs)
        if sort:
            seqs = sorted(seqs, key=len)
        batches = [
            self._tensors(seqs[i : i + batch_size])
            for i in range(0, len(seqs) - batch_size + 1, batch_size)
        ][:200]
        self._forward(*batches[0][:2], packed=packed)  # warm
        done_tokens = done_seqs = steps = 0
        padded = 0
        started = time.perf_counter()
        while True:
            ids, mask, tokens = batches[steps % len(batches)]
            self._forward(ids, mask, packed)
            steps += 1
            done_tokens += tokens
            done_seqs += ids.shape[0]
            padded += ids.numel()
            elapsed = time.perf_counter() - started
            if elapsed >= seconds and steps >= 3:
                break
        return {
            "inputs": inputs,
            "batch_size": batch_size,
            "sorted": sort,
            "tokens_per_s": done_tokens / elapsed,
            "sentences_per_s": done_seqs / elapsed,
            "padding_ratio": 1 - done_tokens / padded,
            "batches": steps,
            "seconds": elapsed,
        }

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
            batch = [list(seq)] * batch_size
        else:
            batch = self.pool("short")[:batch_size]
        ids, mask, tokens = self._tensors(batch)
        self._forward(ids, mask, packed)
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            self._forward(ids, mask, packed)
            times.append(time.perf_counter() - started)
        return {
            "batch_size": batch_size,
            "tokens": tokens,
            "width": int(ids.shape[1]),
            "median_ms": statistics.median(times) * 1e3,
            "min_ms": min(times) * 1e3,
            "repeats": repeats,
        }


def serve(threads: int) -> None:
    ceiling = Ceiling(threads)
    print(json.dumps({"ready": True, "threads": threads, "torch": torch.__version__}), flush=True)
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
    parser.add_argument("--sweep", action="store_true", help="print a batch-size sweep and exit")
    args = parser.parse_args(argv)
    if args.sweep:
        ceiling = Ceiling(args.threads)
        for size in (1, 8, 32, 64):
            for sort in (False, True):
                for packed in (False, True):
                    print(json.dumps(ceiling.throughput("short", size, 3.0, sort, packed=packed)))
        print(json.dumps(ceiling.forward_ms(1, 0, 50)))
        return 0
    serve(args.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())

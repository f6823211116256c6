"""What a lower weights precision costs retrieval: the server's own vectors, float32 against
another ``--dtype``, on the benchmark's texts.

    python -m bench.precision [--dtype bfloat16|float16|int8] [--documents 4000] [--queries 300]
                              [--k 10] [--threads 2] [--out FILE]

Both embedders are the server's adapter for the packaged all-MiniLM-L6-v2 (padding-free, as
served), run through the server's own ``BatchRunner``, in batches of 32 length-sorted texts.
The documents are the bulk scenario's corpus and the mixed-length texts; the queries are
short sentences of the unary scenario's kind, embedded as an Embed call without an
instruction embeds them, and normalized as the server normalizes every answer.

Prints, for the lower precision against float32:

- the cosine of each text's two vectors: minimum, 1st percentile and median;
- nearest-neighbour agreement: of each query's ``--k`` nearest documents in float32, the
  share that are also among its ``--k`` nearest when both sides use the lower precision (a
  fleet that switched), and when only the queries do (documents indexed in float32, queries
  served in the lower precision: a fleet mid-switch); the mean and the worst query, and the
  largest float32 score gap between the k-th neighbour and a document that took a place
  (how near a tie each swap was);
- the tokens/s of each precision over the whole corpus, on this machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench import texts as corpus
from bench.procs import DTYPES
from embedserve.service.api.encoding import finish_vectors
from embedserve.service.engine.runner import BatchRunner
from embedserve.service.models.loading import resolve_device
from embedserve.service.models.options import ModelOptions
from embedserve.service.models.sentence_transformer import SentenceTransformerEmbedder
from embedserve.service.models.tokenization import Truncation

BATCH = 32


class Embedder:
    """The server's adapter and runner for the packaged MiniLM in one precision."""

    def __init__(self, dtype: str) -> None:
        options = ModelOptions(folder=corpus.model_folder(), name=f"minilm-{dtype}")
        device = resolve_device("cpu", dtype)
        self.adapter = SentenceTransformerEmbedder(options, device)
        self.runner = BatchRunner(self.adapter)

    def embed(self, texts: list[str]) -> tuple[np.ndarray, float]:
        """Unit vectors of ``texts`` in the input order, and the tokens/s it took."""
        ids = [t.ids for t in self.adapter.tokenize(texts, "", Truncation.END)]
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        raw = np.empty((len(ids), self.adapter.dimensions), dtype=np.float32)
        self.runner.run([ids[order[0]]])  # warm
        started = time.perf_counter()
        for start in range(0, len(order), BATCH):
            chosen = order[start : start + BATCH]
            raw[chosen] = self.runner.run([ids[i] for i in chosen])
        seconds = time.perf_counter() - started
        return finish_vectors(raw, None, normalize=True), sum(len(s) for s in ids) / seconds


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Each query's ``k`` best documents, best first, from its row of ``scores``."""
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def agreement(reference: np.ndarray, other: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    """How much of each query's reference top-k ``other`` keeps, and how far below the k-th
    reference score (float32's) the documents that took the others' places were: near-ties
    between neighbours swap for any numeric change."""
    shares, gaps = [], [0.0]
    for query, (a, b) in enumerate(zip(reference, other, strict=True)):
        shares.append(len(set(a) & set(b)) / len(a))
        kth = scores[query, a[-1]]
        gaps += [float(kth - scores[query, doc]) for doc in set(b) - set(a)]
    return {
        "mean": statistics.fmean(shares),
        "worst_query": min(shares),
        "largest_score_gap_of_a_swap": max(gaps),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.precision", description=__doc__)
    parser.add_argument(
        "--dtype", choices=[d for d in DTYPES if d != "float32"], default="bfloat16"
    )
    parser.add_argument("--documents", type=int, default=4000)
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    documents = corpus.bulk_corpus(args.documents) + corpus.mixed_lengths(args.documents // 10)
    queries = corpus.short_sentences(args.queries, seed=7)
    vectors: dict[str, dict[str, Any]] = {}
    for dtype in ("float32", args.dtype):
        embedder = Embedder(dtype)
        docs, docs_rate = embedder.embed(documents)
        found, _ = embedder.embed(queries)
        vectors[dtype] = {"documents": docs, "queries": found, "tokens_per_s": docs_rate}
    ref, low = vectors["float32"], vectors[args.dtype]
    cosines = np.concatenate(
        [
            (ref["documents"] * low["documents"]).sum(axis=1),
            (ref["queries"] * low["queries"]).sum(axis=1),
        ]
    )
    reference_scores = ref["queries"] @ ref["documents"].T
    reference = top_k(reference_scores, args.k)
    result = {
        "dtype": args.dtype,
        "documents": len(documents),
        "queries": len(queries),
        "k": args.k,
        "threads": args.threads,
        "cosine": {
            "min": float(cosines.min()),
            "p1": float(np.percentile(cosines, 1)),
            "median": float(np.median(cosines)),
        },
        f"top{args.k}_agreement_both_{args.dtype}": agreement(
            reference, top_k(low["queries"] @ low["documents"].T, args.k), reference_scores
        ),
        f"top{args.k}_agreement_queries_only_{args.dtype}": agreement(
            reference, top_k(low["queries"] @ ref["documents"].T, args.k), reference_scores
        ),
        "tokens_per_s": {d: round(v["tokens_per_s"]) for d, v in vectors.items()},
    }
    text = json.dumps(result, indent=1)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

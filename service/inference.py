"""The engine API the transport calls: embed texts, rerank documents.

Each served model is one object here, bound to its adapter and its engine. The
transport never sees token ids; the engine never sees texts.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np

from embedserve.service.cache.memory import CachedVector
from embedserve.service.engine.engine import Engine
from embedserve.service.engine.work import Lane
from embedserve.service.models.base import EmbeddingAdapter, RerankerAdapter, RerankMethod
from embedserve.service.models.tokenization import InputTooLongError, TokenizedInput, Truncation

if TYPE_CHECKING:
    from embedserve.service.cache.front import EmbeddingCache


# Tokenization jobs of more texts always go to the tokenizer thread (tokenizer_pool.py).
MOST_TEXTS_INLINE = 4


@dataclass(frozen=True)
class Scheduling:
    """Where the work goes in the queue and until when it is worth computing."""

    lane: Lane
    # Absolute, on the event loop's clock; None for no deadline.
    deadline: float | None
    # Spans for tokenization and queueing; off for stream items, which are aggregated
    # on their stream's span instead of making a span each.
    detailed_trace: bool = True
    # The call this work belongs to is admitted on its other work, so only the queue's
    # token bound applies to this part: the query of a similarity rerank rides on its
    # documents, which may wait longer than a lone query would be let.
    rides_on_call: bool = False


@dataclass(frozen=True)
class Outcome:
    """Raw model outputs in input order, with accounting."""

    values: np.ndarray
    input_tokens: int
    truncated_inputs: int
    tokenize_s: float
    queue_s: float
    inference_s: float
    # Inputs answered from the embedding cache, without tokenizing or computing them.
    cached_inputs: int = 0
    # The same accounting an input, in input order (embeddings only: a caller that merged
    # several callers' texts into one request splits the usage back with these).
    tokens_each: Sequence[int] = ()
    truncated_each: Sequence[bool] = ()
    cached_each: Sequence[bool] = ()


async def _tokenize(
    engine: Engine,
    scheduling: Scheduling,
    inputs: int,
    job: Callable[[], list[TokenizedInput]],
    chars: int | None,
) -> tuple[list[TokenizedInput], float]:
    """Admission first, to shed load before spending CPU on it; then ``job`` on the
    tokenizer thread (or the loop, when ``chars`` says it is small), in a span."""
    if not scheduling.rides_on_call:
        engine.shed_early(scheduling.lane, inputs)
    with engine.telemetry.span(
        "tokenize", scheduling.detailed_trace, **{"embedserve.inputs": inputs}
    ):
        return await engine.tokenize(job, chars)


def _text_chars(prefix: str, texts: Sequence[str]) -> int | None:
    """The characters a tokenization job reads (each text with its prefix), or None for a
    job of many texts, which never runs on the event loop and is not worth counting."""
    if len(texts) > MOST_TEXTS_INLINE:
        return None
    return sum(len(prefix) + len(text) for text in texts)


async def _run(
    engine: Engine, tokenized: list[TokenizedInput], tokenize_s: float, scheduling: Scheduling
) -> Outcome:
    ids = [t.ids for t in tokenized]
    tokens_each = [len(s) for s in ids]
    truncated_each = [t.truncated for t in tokenized]
    result = await engine.compute(
        ids,
        scheduling.lane,
        scheduling.deadline,
        detailed_trace=scheduling.detailed_trace,
        delay_bound=not scheduling.rides_on_call,
    )
    return Outcome(
        values=result.outputs,
        input_tokens=sum(tokens_each),
        truncated_inputs=sum(truncated_each),
        tokenize_s=tokenize_s,
        queue_s=result.queue_s,
        inference_s=result.inference_s,
        tokens_each=tokens_each,
        truncated_each=truncated_each,
        cached_each=[False] * len(ids),
    )


class EmbeddingModel:
    def __init__(
        self, adapter: EmbeddingAdapter, engine: Engine, cache: EmbeddingCache | None = None
    ) -> None:
        self.adapter = adapter
        self.engine = engine
        # Exact-match cache of raw vectors (service/cache/); None when it is off.
        self.cache = cache

    @property
    def name(self) -> str:
        return self.adapter.name

    async def embed(
        self,
        texts: Sequence[str],
        instruction: str | None,
        truncation: Truncation,
        scheduling: Scheduling,
    ) -> Outcome:
        """Pooled, unnormalized vectors (n, dimensions). A query when ``instruction`` is set."""
        prefix = "" if instruction is None else self.adapter.query_prefix(instruction)
        if self.cache is not None:
            return await self._embed_cached(self.cache, texts, prefix, truncation, scheduling)
        tokenized, seconds = await _tokenize(
            self.engine,
            scheduling,
            len(texts),
            lambda: self.adapter.tokenize(texts, prefix, truncation),
            _text_chars(prefix, texts),
        )
        return await _run(self.engine, tokenized, seconds, scheduling)

    async def _embed_cached(
        self,
        cache: EmbeddingCache,
        texts: Sequence[str],
        prefix: str,
        truncation: Truncation,
        scheduling: Scheduling,
    ) -> Outcome:
        """Look every text up; tokenize and compute only the misses, each distinct text
        once. A request answered wholly from the cache never enters the engine."""
        keys = cache.keys(prefix, truncation, texts)
        slot_of: dict[bytes, int] = {}
        distinct: list[bytes] = []
        first_input: list[int] = []  # of each distinct key
        slots: list[int] = []  # of each input
        for index, key in enumerate(keys):
            slot = slot_of.get(key)
            if slot is None:
                slot = slot_of[key] = len(distinct)
                distinct.append(key)
                first_input.append(index)
            slots.append(slot)
        found = await cache.lookup(distinct)
        missing = [slot for slot, entry in enumerate(found) if entry is None]
        tokenize_s = queue_s = inference_s = 0.0
        if missing:
            todo = [texts[first_input[slot]] for slot in missing]
            try:
                tokenized, tokenize_s = await _tokenize(
                    self.engine,
                    scheduling,
                    len(todo),
                    lambda: self.adapter.tokenize(todo, prefix, truncation),
                    _text_chars(prefix, todo),
                )
            except InputTooLongError as exc:
                if exc.index is None:
                    raise
                # Name the input in the request, not in the list of misses.
                index = first_input[missing[exc.index]]
                raise InputTooLongError(index, exc.tokens, exc.limit) from exc
            result = await _run(self.engine, tokenized, tokenize_s, scheduling)
            queue_s, inference_s = result.queue_s, result.inference_s
            computed: list[tuple[bytes, CachedVector]] = []
            for slot, item, row in zip(missing, tokenized, result.values, strict=True):
                entry = CachedVector.of(row, len(item.ids), item.truncated)
                found[slot] = entry
                computed.append((distinct[slot], entry))
            cache.store(computed)
        values = np.empty((len(texts), self.adapter.dimensions), dtype=np.float32)
        tokens_each: list[int] = []
        truncated_each: list[bool] = []
        cached_each: list[bool] = []
        fresh = set(missing)
        for index, slot in enumerate(slots):
            answer = found[slot]
            assert answer is not None
            values[index] = answer.vector
            tokens_each.append(answer.tokens)
            truncated_each.append(bool(answer.truncated))
            cached_each.append(slot not in fresh)
        return Outcome(
            values=values,
            input_tokens=sum(tokens_each),
            truncated_inputs=sum(truncated_each),
            tokenize_s=tokenize_s,
            queue_s=queue_s,
            inference_s=inference_s,
            cached_inputs=sum(cached_each),
            tokens_each=tokens_each,
            truncated_each=truncated_each,
            cached_each=cached_each,
        )


class Reranker:
    """Scores (query, document) pairs; higher is more relevant."""

    name: str
    method: RerankMethod
    family: str
    accepts_instruction: bool
    default_instruction: str
    engine: Engine

    async def rerank(
        self,
        query: str,
        documents: Sequence[str],
        instruction: str | None,
        truncation: Truncation,
        scheduling: Scheduling,
    ) -> Outcome:
        raise NotImplementedError


class ModelReranker(Reranker):
    """A dedicated reranker model (cross-encoder or Qwen3-Reranker)."""

    def __init__(self, adapter: RerankerAdapter, engine: Engine) -> None:
        self.adapter = adapter
        self.engine = engine
        self.name = adapter.name
        self.method = adapter.method
        self.family = adapter.family
        self.accepts_instruction = adapter.accepts_instruction
        self.default_instruction = adapter.default_instruction

    async def rerank(
        self,
        query: str,
        documents: Sequence[str],
        instruction: str | None,
        truncation: Truncation,
        scheduling: Scheduling,
    ) -> Outcome:
        chosen = self.default_instruction if instruction is None else instruction
        tokenized, seconds = await _tokenize(
            self.engine,
            scheduling,
            len(documents),
            lambda: self.adapter.tokenize_pairs(query, documents, chosen, truncation),
            _text_chars(chosen + query, documents),
        )
        return await _run(self.engine, tokenized, seconds, scheduling)


class SimilarityReranker(Reranker):
    """Reranking by cosine similarity when no reranker model is configured."""

    method = RerankMethod.EMBEDDING_SIMILARITY
    family = "embedding-similarity"
    accepts_instruction = True

    def __init__(self, embedder: EmbeddingModel) -> None:
        self.embedder = embedder
        self.engine = embedder.engine
        self.name = embedder.name
        self.default_instruction = embedder.adapter.default_instruction

    async def _embed_query(
        self, query: str, instruction: str, truncation: Truncation, scheduling: Scheduling
    ) -> Outcome:
        try:
            return await self.embedder.embed([query], instruction, truncation, scheduling)
        except InputTooLongError as exc:  # it is the query, not documents[0], that is too long
            raise InputTooLongError(None, exc.tokens, exc.limit) from exc

    async def rerank(
        self,
        query: str,
        documents: Sequence[str],
        instruction: str | None,
        truncation: Truncation,
        scheduling: Scheduling,
    ) -> Outcome:
        chosen = self.default_instruction if instruction is None else instruction
        riding = replace(scheduling, rides_on_call=True)
        query_task = asyncio.ensure_future(self._embed_query(query, chosen, truncation, riding))
        docs_task = asyncio.ensure_future(
            self.embedder.embed(documents, None, truncation, scheduling)
        )
        try:
            query_vector, docs = await asyncio.gather(query_task, docs_task)
        finally:
            query_task.cancel()
            docs_task.cancel()
        q = _unit(query_vector.values)[0]
        scores = _unit(docs.values) @ q
        return Outcome(
            values=scores.astype(np.float32),
            input_tokens=docs.input_tokens + query_vector.input_tokens,
            truncated_inputs=docs.truncated_inputs + query_vector.truncated_inputs,
            tokenize_s=docs.tokenize_s + query_vector.tokenize_s,
            queue_s=max(docs.queue_s, query_vector.queue_s),
            inference_s=max(docs.inference_s, query_vector.inference_s),
            # Usage.inputs counts documents, so this counts cached documents only.
            cached_inputs=docs.cached_inputs,
        )


def _unit(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return np.asarray(vectors / np.maximum(norms, 1e-12), dtype=np.float32)

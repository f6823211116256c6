"""What a response says about its own cost: usage (tokens, truncations, cache hits) and
timing, for the whole call and for each input."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from google.protobuf import duration_pb2

from embedserve.v1 import common_pb2

if TYPE_CHECKING:
    from embedserve.service.inference import Outcome


def usage(outcome: Outcome, inputs: int) -> common_pb2.Usage:
    return common_pb2.Usage(
        input_tokens=outcome.input_tokens,
        inputs=inputs,
        truncated_inputs=outcome.truncated_inputs,
        cached_inputs=outcome.cached_inputs,
    )


def timing(outcome: Outcome, started: float) -> common_pb2.Timing:
    """The outcome's stages, and the call's total since ``started`` (``time.perf_counter``)."""
    return common_pb2.Timing(
        tokenization=duration(outcome.tokenize_s),
        queue=duration(outcome.queue_s),
        inference=duration(outcome.inference_s),
        total=duration(time.perf_counter() - started),
    )


def account_each(
    embeddings: list[common_pb2.Embedding], outcome: Outcome
) -> list[common_pb2.Embedding]:
    """Each input's share of the usage on its own embedding, so that a client that merged
    several callers' texts into one call can give each caller its own usage."""
    for embedding, tokens, truncated, cached in zip(
        embeddings, outcome.tokens_each, outcome.truncated_each, outcome.cached_each, strict=True
    ):
        embedding.input_tokens = tokens
        embedding.truncated = truncated
        embedding.cached = cached
    return embeddings


def duration(seconds: float) -> duration_pb2.Duration:
    value = duration_pb2.Duration()
    value.FromNanoseconds(int(seconds * 1e9))
    return value

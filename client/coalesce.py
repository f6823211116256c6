"""Concurrent ``embed`` calls of one client merged into one Embed call.

A service that embeds one query per request, many requests at a time, makes the server
pay gRPC's per-call cost once a text: on a 2-core server that cost is most of what stands
between 64 single-text callers and the model's own throughput (docs/benchmarks.md, "Merged
calls"). Calls made in the same turn of the event loop with the same options and deadline
become one call here instead, in the caller's process, and each caller gets its own rows
back with its own usage (the server reports it an input: ``Embedding.input_tokens``,
``truncated``, ``cached``).

What a caller sees does not change, except that calls merged together share one fate on
the server:
- An INVALID_ARGUMENT answer that names an input is one caller's error, not the others':
  each call of the merged one is sent again alone, so that each gets its own answer and a
  violation names its own ``inputs[i]``. One that names only the options they share is all
  of theirs.
- Any other error (overload, unavailable, a deadline) is every merged caller's error, after
  the client's retries, as it would be for each of them alone under the same load.
- A caller that gives up (its task cancelled) leaves the merged call to the others; the
  merged call is cancelled when all of its callers have given up.
- A caller's texts are never split between merged calls; a merged call holds at most
  ``max_inputs`` texts unless one caller alone sends more. A server that takes fewer
  texts a call (its ``--max-inputs``) answers a merged call with a violation of
  ``inputs`` itself: its callers are sent alone, and ``max_inputs`` halves until merged
  calls fit, so that merging never fails a call that would have passed alone.
"""

from __future__ import annotations

import asyncio
import contextvars
import copy
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from opentelemetry import trace

from embedserve.client.errors import EmbedServeError, InvalidArgumentError
from embedserve.client.results import Embeddings, Usage, decode_embeddings
from embedserve.v1 import common_pb2, embed_service_pb2

# Sends one Embed request with a timeout, for this many callers, under span links to those
# of them that were in a span.
SendEmbed = Callable[
    [embed_service_pb2.EmbedRequest, "float | None", int, Sequence[trace.Link]],
    Awaitable[embed_service_pb2.EmbedResponse],
]
# Builds the request for a list of texts (the options of one group of callers).
BuildRequest = Callable[[list[str]], embed_service_pb2.EmbedRequest]


@dataclass
class _Caller:
    texts: list[str]
    answer: asyncio.Future[Embeddings]
    link: trace.Link | None


@dataclass
class _Group:
    """Callers waiting for the next flush, with one options-and-deadline key."""

    build: BuildRequest
    timeout: float | None
    callers: list[_Caller] = field(default_factory=list)


class Coalescer:
    """Merges ``embed`` calls made in the same turn of the event loop. Calls are merged
    only when their ``key`` is equal: it must say everything ``build`` and the timeout do."""

    def __init__(self, send: SendEmbed, max_inputs: int) -> None:
        if max_inputs < 1:
            raise ValueError(f"max_inputs must be at least 1, got {max_inputs}")
        self._send = send
        self.max_inputs = max_inputs
        self._waiting: dict[object, _Group] = {}
        self._in_flight: set[asyncio.Task[None]] = set()

    async def embed(
        self, key: object, build: BuildRequest, texts: list[str], timeout: float | None
    ) -> Embeddings:
        loop = asyncio.get_running_loop()
        if not self._waiting:
            # After the callbacks already due in this turn: callers woken together (by the
            # answers of one merged call) all join before the flush.
            loop.call_soon(self._flush, context=contextvars.Context())
        group = self._waiting.get(key)
        if group is None:
            group = self._waiting[key] = _Group(build, timeout)
        span_context = trace.get_current_span().get_span_context()
        link = trace.Link(span_context) if span_context.is_valid else None
        caller = _Caller(texts, loop.create_future(), link)
        group.callers.append(caller)
        return await caller.answer

    async def close(self) -> None:
        """Cancels the merged calls still in flight (their callers see CancelledError)."""
        for task in list(self._in_flight):
            task.cancel()
        await asyncio.gather(*self._in_flight, return_exceptions=True)

    def _flush(self) -> None:
        groups, self._waiting = self._waiting, {}
        for group in groups.values():
            for callers in self._chunks(group.callers):
                self._start(group, callers)

    def _chunks(self, callers: list[_Caller]) -> list[list[_Caller]]:
        chunks: list[list[_Caller]] = []
        inputs = 0
        for caller in callers:
            if caller.answer.done():  # cancelled before the flush
                continue
            if not caller.texts:  # alone, so that the server's answer to it stays its own
                chunks.append([caller])
                inputs = self.max_inputs
                continue
            if not chunks or inputs + len(caller.texts) > self.max_inputs:
                chunks.append([])
                inputs = 0
            chunks[-1].append(caller)
            inputs += len(caller.texts)
        return chunks

    def _start(self, group: _Group, callers: list[_Caller]) -> None:
        task = asyncio.get_running_loop().create_task(
            self._merged(group, callers), context=contextvars.Context()
        )
        self._in_flight.add(task)
        task.add_done_callback(self._in_flight.discard)

        def given_up(_: asyncio.Future[Embeddings]) -> None:
            if all(c.answer.done() for c in callers) and not task.done():
                task.cancel()

        for caller in callers:
            caller.answer.add_done_callback(given_up)

    async def _merged(self, group: _Group, callers: list[_Caller]) -> None:
        texts = [text for caller in callers for text in caller.texts]
        links = [caller.link for caller in callers if caller.link is not None]
        try:
            response = await self._send(group.build(texts), group.timeout, len(callers), links)
        except InvalidArgumentError as exc:
            fields = [v.field for v in exc.violations]
            if len(callers) > 1 and any(f == "inputs" or f.startswith("inputs[") for f in fields):
                if "inputs" in fields:
                    # More texts than the server takes a call: the merging's fault, not any
                    # caller's. Merge less from now on; the server's limit is not known here.
                    self.max_inputs = max(1, min(self.max_inputs, len(texts) // 2))
                # One caller's input, or too many together: each caller alone gets its own
                # answer.
                alone = [c for c in callers if not c.answer.done()]
                await asyncio.gather(*(self._merged(group, [caller]) for caller in alone))
                return
            for caller in callers:  # the options all of them share
                _fail(caller, copy.copy(exc))
            return
        except EmbedServeError as exc:
            for caller in callers:
                _fail(caller, copy.copy(exc))
            return
        except asyncio.CancelledError:
            for caller in callers:
                caller.answer.cancel()
            raise
        except Exception as exc:  # a fault of this process, not an answer: every caller's
            for caller in callers:
                _fail(caller, copy.copy(exc))
            return
        _answer(callers, response)


def _fail(caller: _Caller, error: BaseException) -> None:
    if not caller.answer.done():
        caller.answer.set_exception(error)


def _answer(callers: list[_Caller], response: embed_service_pb2.EmbedResponse) -> None:
    merged = decode_embeddings(response)
    start = 0
    for caller in callers:
        end = start + len(caller.texts)
        if not caller.answer.done():
            caller.answer.set_result(
                Embeddings(
                    vectors=merged.vectors[start:end].copy(),
                    dimensions=merged.dimensions,
                    model=merged.model,
                    usage=_usage(response.embeddings[start:end]),
                    timing=merged.timing,
                    scales=None if merged.scales is None else merged.scales[start:end].copy(),
                )
            )
        start = end


def _usage(embeddings: Sequence[common_pb2.Embedding]) -> Usage:
    tokens = truncated = cached = 0
    for embedding in embeddings:
        tokens += embedding.input_tokens
        truncated += embedding.truncated
        cached += embedding.cached
    return Usage(
        input_tokens=tokens,
        inputs=len(embeddings),
        truncated_inputs=truncated,
        cached_inputs=cached,
    )

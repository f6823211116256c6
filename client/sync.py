"""The synchronous client: the asyncio client driven on a private event loop thread.

One implementation of calls, retries and bulk serves both surfaces; each sync call is
one hop to the loop thread (bulk results cross it a message at a time, not an item at
a time).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncGenerator, Coroutine, Iterable, Iterator, Sequence
from typing import Any, TypeVar

from embedserve.client.aio import _UNSET, AsyncClient, BulkItem, TruncationName
from embedserve.client.results import Embeddings, Ranking, ServerInfo

T = TypeVar("T")


class Client:
    """Same arguments and methods as AsyncClient, without ``await``.

    Thread-safe: calls from several threads share one channel. Use as a context manager,
    or call ``close()``.
    """

    def __init__(self, target: str, **kwargs: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="embedserve-client", daemon=True
        )
        self._thread.start()

        async def make() -> AsyncClient:
            # grpc.aio channels belong to the loop they are created on.
            return AsyncClient(target, **kwargs)

        self._client = self._run(make())
        self._closed = False

    def _run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._run(self._client.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    @property
    def target(self) -> str:
        return self._client.target

    def embed(
        self, texts: Sequence[str], *, timeout: float | None = _UNSET, **options: Any
    ) -> Embeddings:
        return self._run(self._client.embed(texts, timeout=timeout, **options))

    def rerank(
        self,
        query: str,
        documents: Sequence[str],
        *,
        top_n: int | None = None,
        return_documents: bool = False,
        instruction: str | None = None,
        model: str = "",
        truncation: TruncationName | None = None,
        timeout: float | None = _UNSET,
    ) -> Ranking:
        return self._run(
            self._client.rerank(
                query,
                documents,
                top_n=top_n,
                return_documents=return_documents,
                instruction=instruction,
                model=model,
                truncation=truncation,
                timeout=timeout,
            )
        )

    def info(self, *, timeout: float | None = _UNSET) -> ServerInfo:
        return self._run(self._client.info(timeout=timeout))

    def health(self, service: str = "", *, timeout: float | None = _UNSET) -> bool:
        return self._run(self._client.health(service, timeout=timeout))

    def embed_bulk(self, texts: Iterable[str], **kwargs: Any) -> Iterator[BulkItem]:
        """See AsyncClient.embed_bulk. ``texts`` is read on the client's loop thread."""
        for chunk in self.embed_bulk_chunks(texts, **kwargs):
            yield from chunk

    def embed_bulk_chunks(self, texts: Iterable[str], **kwargs: Any) -> Iterator[list[BulkItem]]:
        chunks = self._client.embed_bulk_chunks(texts, **kwargs)
        assert isinstance(chunks, AsyncGenerator)
        try:
            while True:
                try:
                    yield self._run(anext(chunks))
                except StopAsyncIteration:
                    return
        finally:
            self._run(chunks.aclose())

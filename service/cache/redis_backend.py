"""The shared tier: Redis, for several replicas of one model.

It is a cache, so it never fails a request. Every operation has a small time budget
(``--cache-redis-timeout-ms``: connecting, waiting for a pooled connection and reading
each get it). On any error the operation counts as a miss (reads) or is dropped
(writes), the error counter goes up, and Redis is left alone for a second, so that a
Redis that is down costs requests nothing but that second's first attempt. Errors are
logged at most once every 30 seconds, with how many there were.

Writes never wait on the response path: new entries go to a bounded buffer that one
writer task sends in pipelines (``SET key value EX ttl``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.connection import parse_url
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from embedserve.service.cache.memory import CachedVector

log = logging.getLogger(__name__)

NAMESPACE = "embedserve:v1:"
# version, flags (bit 0: truncated), tokens, dimensions; then the float32 values, little-endian.
_HEADER = struct.Struct("<BBII")
_VERSION = 1
_LE_F32 = np.dtype("<f4")


def encode_entry(entry: CachedVector) -> bytes:
    header = _HEADER.pack(_VERSION, int(entry.truncated), entry.tokens, entry.vector.shape[0])
    return header + entry.vector.astype(_LE_F32, copy=False).tobytes()


def decode_entry(data: bytes, dimensions: int) -> CachedVector | None:
    """None for a value this server cannot use (another format or dimension)."""
    if len(data) != _HEADER.size + 4 * dimensions:
        return None
    version, flags, tokens, dims = _HEADER.unpack_from(data)
    if version != _VERSION or dims != dimensions:
        return None
    vector = np.frombuffer(data, dtype=_LE_F32, offset=_HEADER.size).astype(np.float32)
    vector.flags.writeable = False
    return CachedVector(vector, int(tokens), bool(flags & 1))


def check_url(url: str) -> str:
    """Raise ValueError for a URL the client cannot use; return it for logs, without
    its password."""
    kwargs: dict[str, Any] = dict(parse_url(url))
    if "path" in kwargs:
        return f"unix://{kwargs['path']}"
    return f"{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}/{kwargs.get('db', 0)}"


def _client_options(timeout_s: float) -> dict[str, Any]:
    return {"socket_timeout": timeout_s, "socket_connect_timeout": timeout_s}


def ping_at_boot(url: str, timeout_s: float) -> Exception | None:
    """One blocking PING before serving; the error when Redis does not answer."""
    import redis
    from redis.retry import Retry as SyncRetry

    client = redis.Redis.from_url(
        url, retry=SyncRetry(NoBackoff(), 0), **_client_options(timeout_s)
    )
    try:
        client.ping()
    except Exception as exc:
        return exc
    finally:
        client.close()
    return None


class RedisBackend:
    """Reads and writes of one model's entries; used on one event loop."""

    def __init__(
        self,
        url: str,
        *,
        model: str,
        dimensions: int,
        ttl_s: int,
        timeout_s: float,
        max_connections: int = 32,
        max_pending_bytes: int = 16 * 1024 * 1024,
        pipeline_size: int = 256,
        retry_after_s: float = 1.0,
        log_every_s: float = 30.0,
    ) -> None:
        self.where = check_url(url)
        self.dimensions = dimensions
        self.prefix = f"{NAMESPACE}{model}:".encode()
        self.ttl_s = ttl_s
        self.timeout_s = timeout_s
        # Connecting, waiting for a pooled connection and the reply, at most.
        self._budget_s = 3 * timeout_s
        self._url = url
        self._max_connections = max_connections
        self._max_pending_bytes = max_pending_bytes
        self._pipeline_size = pipeline_size
        self._retry_after_s = retry_after_s
        self._log_every_s = log_every_s
        self._client: Redis | None = None
        self._pending: dict[bytes, bytes] = {}
        self._pending_bytes = 0
        self._writer: asyncio.Task[None] | None = None
        self._resume_at = 0.0  # time.monotonic(); Redis is left alone until then
        self._failing = False
        self._errors_unlogged = 0
        self._last_log = -float("inf")
        # Read by the metrics scrape.
        self.errors = 0
        self.dropped_writes = 0

    def _redis(self) -> Redis:
        # Made on first use, inside the serving event loop that its connections belong to.
        if self._client is None:
            pool = BlockingConnectionPool.from_url(
                self._url,
                max_connections=self._max_connections,
                timeout=self.timeout_s,
                # The default retries three times with a backoff: a cache gives up at once.
                retry=Retry(NoBackoff(), 0),
                **_client_options(self.timeout_s),
            )
            self._client = Redis(connection_pool=pool)
        return self._client

    @property
    def available(self) -> bool:
        return time.monotonic() >= self._resume_at

    async def get_many(self, keys: Sequence[bytes]) -> list[CachedVector | None] | None:
        """One MGET; None when Redis is unavailable or failed (then nothing is known)."""
        if not keys or not self.available:
            return None
        try:
            async with asyncio.timeout(self._budget_s):
                values = await self._redis().mget([self.prefix + k for k in keys])
        except Exception as exc:
            self._failed(exc)
            return None
        self._succeeded()
        out: list[CachedVector | None] = []
        for value in values:
            entry = None
            if value is not None:
                if isinstance(value, bytes):
                    entry = decode_entry(value, self.dimensions)
                if entry is None:
                    self.errors += 1  # a foreign value under our key: treated as a miss
            out.append(entry)
        return out

    def put_many(self, items: Sequence[tuple[bytes, CachedVector]]) -> None:
        """Queue the entries for the writer task; never waits. Dropped (and counted)
        while Redis is unavailable or the buffer is full."""
        if not items:
            return
        if not self.available:
            self.dropped_writes += len(items)
            return
        for key, entry in items:
            value = encode_entry(entry)
            if self._pending_bytes + len(value) > self._max_pending_bytes:
                self.dropped_writes += 1
                continue
            if key not in self._pending:
                self._pending[key] = value
                self._pending_bytes += len(value)
        if self._pending and self._writer is None:
            self._writer = asyncio.get_running_loop().create_task(
                self._write(), name="embedserve-cache-redis-writer"
            )

    async def _write(self) -> None:
        try:
            while self._pending:
                batch = dict(list(self._pending.items())[: self._pipeline_size])
                for key, value in batch.items():
                    del self._pending[key]
                    self._pending_bytes -= len(value)
                if not self.available:
                    self.dropped_writes += len(batch)
                    continue
                try:
                    async with asyncio.timeout(self._budget_s):
                        pipe = self._redis().pipeline(transaction=False)
                        for key, value in batch.items():
                            pipe.set(self.prefix + key, value, ex=self.ttl_s)
                        await pipe.execute()
                except Exception as exc:
                    self.dropped_writes += len(batch)
                    self._failed(exc)
                else:
                    self._succeeded()
        finally:
            self._writer = None

    async def flush(self, timeout_s: float = 2.0) -> None:
        """Wait (a bounded time) for the queued writes."""
        writer = self._writer
        if writer is not None:
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(writer), timeout_s)

    async def aclose(self) -> None:
        await self.flush()
        if self._writer is not None:
            self._writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer
        if self._client is not None:
            client, self._client = self._client, None
            with contextlib.suppress(Exception):
                await client.aclose()
                await client.connection_pool.disconnect()

    def _failed(self, exc: Exception) -> None:
        self.errors += 1
        self._errors_unlogged += 1
        self._resume_at = time.monotonic() + self._retry_after_s
        self._failing = True
        now = time.monotonic()
        if now - self._last_log >= self._log_every_s:
            log.warning(
                "redis cache unavailable; computing instead",
                extra={
                    "redis": self.where,
                    "errors": self._errors_unlogged,
                    "error": f"{type(exc).__name__}: {exc}",
                },
            )
            self._last_log = now
            self._errors_unlogged = 0

    def _succeeded(self) -> None:
        if self._failing:
            self._failing = False
            log.info("redis cache reachable again", extra={"redis": self.where})

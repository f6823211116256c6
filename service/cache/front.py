"""The two tiers behind one front: memory first, then one Redis MGET for what memory
lacks (filling memory with what Redis had); new vectors go to both."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from embedserve.service.cache.keys import KeyBuilder
from embedserve.service.cache.memory import CachedVector, MemoryLRU
from embedserve.service.models.tokenization import Truncation

if TYPE_CHECKING:  # redis is imported only when a Redis URL is configured
    from embedserve.service.cache.redis_backend import RedisBackend


class EmbeddingCache:
    """One served embedding model's cache. Lives on the serving event loop; the
    counters are plain ints that the metrics scrape reads."""

    def __init__(
        self,
        model: str,
        keys: KeyBuilder,
        memory: MemoryLRU | None,
        redis: RedisBackend | None,
    ) -> None:
        if memory is None and redis is None:
            raise ValueError("an embedding cache needs a memory tier, a Redis tier or both")
        self.model = model
        self.memory = memory
        self.redis = redis
        self._keys = keys
        self.hits_memory = 0
        self.hits_redis = 0
        self.misses = 0

    def keys(self, prefix: str, truncation: Truncation, texts: Sequence[str]) -> list[bytes]:
        return self._keys.keys(prefix, truncation, texts)

    async def lookup(self, keys: Sequence[bytes]) -> list[CachedVector | None]:
        """One result a key (give each key once), None for a miss in every tier."""
        found: list[CachedVector | None] = [None] * len(keys)
        wanted: list[int] = []
        memory = self.memory
        for i, key in enumerate(keys):
            entry = memory.get(key) if memory is not None else None
            if entry is None:
                wanted.append(i)
            else:
                found[i] = entry
        self.hits_memory += len(keys) - len(wanted)
        if wanted and self.redis is not None:
            shared = await self.redis.get_many([keys[i] for i in wanted])
            if shared is not None:
                still: list[int] = []
                for i, entry in zip(wanted, shared, strict=True):
                    if entry is None:
                        still.append(i)
                        continue
                    found[i] = entry
                    if memory is not None:
                        memory.put(keys[i], entry)
                self.hits_redis += len(wanted) - len(still)
                wanted = still
        self.misses += len(wanted)
        return found

    def store(self, items: Sequence[tuple[bytes, CachedVector]]) -> None:
        """Keep newly computed vectors: in memory now, in Redis in the background."""
        if self.memory is not None:
            for key, entry in items:
                self.memory.put(key, entry)
        if self.redis is not None:
            self.redis.put_many(items)

    async def aclose(self) -> None:
        """Send the queued Redis writes (bounded wait) and close the connections."""
        if self.redis is not None:
            await self.redis.aclose()

"""The exact-match embedding cache: an in-process LRU bounded in bytes, optionally in front
of a Redis shared by several replicas (``--cache-bytes``, ``--cache-redis-url``)."""

from embedserve.service.cache.front import EmbeddingCache
from embedserve.service.cache.memory import CachedVector, MemoryLRU

__all__ = ["CachedVector", "EmbeddingCache", "MemoryLRU"]

"""The in-process tier: a least-recently-used map bounded in bytes.

It lives on the event loop thread (lookups and stores happen there); the metrics scrape
thread only reads its counters.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

# What an entry costs besides its vector's data and its key: the ndarray and bytes
# objects, the entry itself and its OrderedDict node (measured with tracemalloc on
# CPython 3.11; rounded up).
ENTRY_OVERHEAD_BYTES = 320


@dataclass(frozen=True, slots=True)
class CachedVector:
    """One input's raw result: the pooled, unnormalized float32 vector, with the token
    count and truncated flag of the input it came from (so that ``Usage`` stays true)."""

    vector: np.ndarray
    tokens: int
    truncated: bool

    @classmethod
    def of(cls, row: np.ndarray, tokens: int, truncated: bool) -> CachedVector:
        """A private, read-only float32 copy of ``row`` (never a view of a batch's outputs)."""
        vector = np.array(row, dtype=np.float32, copy=True)
        vector.flags.writeable = False
        return cls(vector, tokens, truncated)


def entry_bytes(key: bytes, entry: CachedVector) -> int:
    return int(entry.vector.nbytes) + len(key) + ENTRY_OVERHEAD_BYTES


class MemoryLRU:
    """Holds at most ``capacity`` bytes (as ``entry_bytes`` counts them); the least
    recently used entries go first. An entry larger than the whole capacity is not kept."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1 byte, got {capacity}")
        self.capacity = capacity
        self.bytes = 0
        self.evictions = 0
        self._entries: OrderedDict[bytes, CachedVector] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: bytes) -> bool:
        return key in self._entries

    def get(self, key: bytes) -> CachedVector | None:
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
        return entry

    def put(self, key: bytes, entry: CachedVector) -> bool:
        """Store (or refresh) an entry; False when it is larger than the capacity."""
        size = entry_bytes(key, entry)
        if size > self.capacity:
            return False
        old = self._entries.pop(key, None)
        if old is not None:
            self.bytes -= entry_bytes(key, old)
        self._entries[key] = entry
        self.bytes += size
        while self.bytes > self.capacity:
            evicted_key, evicted = self._entries.popitem(last=False)
            self.bytes -= entry_bytes(evicted_key, evicted)
            self.evictions += 1
        return True

    def keys(self) -> list[bytes]:
        """Oldest (next to be evicted) first."""
        return list(self._entries)

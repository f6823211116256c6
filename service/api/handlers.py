"""Wrapped gRPC method handlers, built once per handler instead of once per call.

grpc.aio asks every server interceptor for a handler on every call. Building a new
``RpcMethodHandler`` and its closures each time showed up in the event loop's profile, and
the event loop shares two cores with torch; the registered handlers never change, so their
wrappers need not either.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

# Handlers built per call (an interceptor's refusal, for one) must not grow the cache
# without bound; the registered ones number one a method.
_MAX_ENTRIES = 256


class WrappedHandlers:
    def __init__(self, wrap: Callable[[Any], Any]) -> None:
        self._wrap = wrap
        # id(handler) -> (handler, wrapped). Holding the handler keeps its id unique.
        self._entries: dict[int, tuple[Any, Any]] = {}

    def get(self, handler: Any) -> Any:
        entry = self._entries.get(id(handler))
        if entry is not None and entry[0] is handler:
            return entry[1]
        wrapped = self._wrap(handler)
        if len(self._entries) < _MAX_ENTRIES:
            self._entries[id(handler)] = (handler, wrapped)
        return wrapped

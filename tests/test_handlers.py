"""Interceptors wrap each registered handler once, not once per call."""

from __future__ import annotations

from typing import Any

from embedserve.service.api.handlers import WrappedHandlers


class Handler:
    pass


def test_a_handler_is_wrapped_once_and_reused() -> None:
    built: list[Any] = []

    def wrap(handler: Any) -> Any:
        built.append(handler)
        return ("wrapped", handler)

    cache = WrappedHandlers(wrap)
    first, second = Handler(), Handler()
    assert cache.get(first) == ("wrapped", first)
    assert cache.get(first) is cache.get(first)
    assert cache.get(second) == ("wrapped", second)
    assert built == [first, second]


def test_handlers_made_per_call_do_not_grow_the_cache_without_bound() -> None:
    built = 0

    def wrap(handler: Any) -> Any:
        nonlocal built
        built += 1
        return handler

    cache = WrappedHandlers(wrap)
    keep = [Handler() for _ in range(1000)]
    for handler in keep:
        assert cache.get(handler) is handler
    assert built == 1000
    assert len(cache._entries) <= 256
    # Cached ones are still served from the cache, uncached ones are wrapped again.
    cache.get(keep[0])
    cache.get(keep[-1])
    assert built == 1001

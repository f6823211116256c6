"""Building the caches from the server's configuration, and closing them at exit."""

from __future__ import annotations

import logging
from pathlib import Path

from embedserve.service.cache.front import EmbeddingCache
from embedserve.service.cache.keys import KeyBuilder, model_fingerprint
from embedserve.service.cache.memory import MemoryLRU
from embedserve.service.config import ServerConfig
from embedserve.service.registry import ModelRegistry
from embedserve.service.telemetry.setup import DISABLED, Telemetry

log = logging.getLogger(__name__)


def install_caches(
    registry: ModelRegistry, config: ServerConfig, folder: Path, telemetry: Telemetry = DISABLED
) -> None:
    """Give each served embedding model (loaded from ``folder``) its cache, when
    ``--cache-bytes`` or ``--cache-redis-url`` asks for one. Raises ValueError for an
    unusable Redis URL (a configuration error: exit code 2); a Redis that does not answer
    is only a warning."""
    url = config.cache_redis_url or None
    if config.cache_bytes <= 0 and url is None:
        return
    timeout_s = config.cache_redis_timeout_ms / 1000.0
    if url is not None:
        from embedserve.service.cache.redis_backend import check_url, ping_at_boot

        try:
            where = check_url(url)
        except ValueError as exc:
            raise ValueError(f"--cache-redis-url: {exc}") from exc
        error = ping_at_boot(url, timeout_s)
        if error is not None:
            log.warning(
                "redis cache does not answer; serving without it until it does",
                extra={"redis": where, "error": f"{type(error).__name__}: {error}"},
            )
    for name, model in registry.embedders.items():
        adapter = model.adapter
        fingerprint = model_fingerprint(
            folder, (adapter.family, adapter.pooling, adapter.device.dtype_name)
        )
        redis = None
        if url is not None:
            from embedserve.service.cache.redis_backend import RedisBackend

            redis = RedisBackend(
                url,
                model=name,
                dimensions=adapter.dimensions,
                ttl_s=config.cache_redis_ttl_s,
                timeout_s=timeout_s,
            )
        cache = EmbeddingCache(
            name,
            KeyBuilder(name, fingerprint, adapter.max_input_tokens),
            MemoryLRU(config.cache_bytes) if config.cache_bytes > 0 else None,
            redis,
        )
        model.cache = cache
        if telemetry.metrics is not None:
            telemetry.metrics.watch_cache(cache)
        log.info(
            "embedding cache",
            extra={
                "model": name,
                "memory_bytes": config.cache_bytes,
                "redis": redis.where if redis is not None else None,
                "redis_ttl_s": config.cache_redis_ttl_s if redis is not None else None,
                "fingerprint": fingerprint[:16],
            },
        )


async def close_caches(registry: ModelRegistry) -> None:
    """After the server stopped: send the queued Redis writes and close the connections."""
    for model in registry.embedders.values():
        if model.cache is not None:
            await model.cache.aclose()

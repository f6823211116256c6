"""API keys: bearer tokens in the ``authorization`` metadata, checked against a file of
SHA-256 hashes that is re-read when it changes, without a restart.

The file holds one key a line, as ``sha256:<hex>`` with an optional ``name=`` before it
(``indexer=sha256:9f86...``); blank lines and ``#`` comments are ignored. ``embedserve
hash-key`` prints a line for a key. Presented keys are hashed and compared with every
stored hash in constant time; keys are never logged.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

log = logging.getLogger(__name__)

_PREFIX = "sha256:"
_RELOAD_CHECK_S = 1.0


def hash_line(key: str, name: str = "") -> str:
    digest = hashlib.sha256(key.encode("utf-8")).hexdigest()
    return f"{name}={_PREFIX}{digest}" if name else f"{_PREFIX}{digest}"


@dataclass(frozen=True)
class _Entry:
    name: str
    digest: bytes


class KeyFileError(ValueError):
    pass


def parse_key_file(text: str, source: str) -> list[_Entry]:
    entries: list[_Entry] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        name, _, value = line.rpartition("=") if "=" in line else ("", "", line)
        if not value.startswith(_PREFIX):
            raise KeyFileError(f"{source}:{number}: expected [name=]sha256:<64 hex digits>")
        try:
            digest = bytes.fromhex(value.removeprefix(_PREFIX))
        except ValueError as exc:
            raise KeyFileError(f"{source}:{number}: the hash is not hexadecimal") from exc
        if len(digest) != 32:
            raise KeyFileError(f"{source}:{number}: a SHA-256 hash has 64 hex digits")
        entries.append(_Entry(name.strip() or f"key{number}", digest))
    return entries


class KeyStore:
    """The accepted keys, reloaded from their file when its modification time changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp: tuple[int, int] | None = None
        self._entries: list[_Entry] = []
        self._checked = 0.0
        self.reload()  # fail at boot on a missing or malformed file
        if not self._entries:
            log.warning("the API key file holds no keys: every call will be refused")

    def reload(self) -> None:
        stat = self.path.stat()
        stamp = (stat.st_mtime_ns, stat.st_size)
        if stamp == self._stamp:
            return
        entries = parse_key_file(self.path.read_text(encoding="utf-8"), str(self.path))
        self._entries, self._stamp = entries, stamp
        log.info("API keys loaded", extra={"keys": len(entries), "file": str(self.path)})

    def _maybe_reload(self) -> None:
        now = time.monotonic()
        if now - self._checked < _RELOAD_CHECK_S:
            return
        self._checked = now
        try:
            self.reload()
        except (OSError, KeyFileError) as exc:
            # Keep serving with the keys we have rather than locking everyone out.
            log.error("API key file not reloaded: %s", exc)

    def match(self, presented: str) -> str | None:
        """The name of the matching key, or None. Constant time in which key matched."""
        self._maybe_reload()
        digest = hashlib.sha256(presented.encode("utf-8")).digest()
        found: str | None = None
        for entry in self._entries:
            if hmac.compare_digest(entry.digest, digest):
                found = entry.name
        return found


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """UNAUTHENTICATED, trailers-only, for a missing or wrong key; exempt services pass."""

    def __init__(self, store: KeyStore, exempt_services: Iterable[str]) -> None:
        self._store = store
        self._exempt = tuple(f"/{name}/" for name in exempt_services)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        method: str = handler_call_details.method
        if method.startswith(self._exempt):
            return await continuation(handler_call_details)
        token = _bearer(handler_call_details.invocation_metadata)
        if token is not None and self._store.match(token) is not None:
            return await continuation(handler_call_details)
        reason = "missing" if token is None else "not accepted"
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        return _refusal(handler, f"API key {reason}: send 'authorization: Bearer <key>'")


def _bearer(metadata: Any) -> str | None:
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str):
            scheme, _, token = value.partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
            return None
    return None


def _refusal(handler: Any, message: str) -> Any:
    async def abort(_request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def abort_stream(_requests: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover - makes this an async generator, never reached

    kwargs = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(abort, **kwargs)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(abort_stream, **kwargs)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(abort, **kwargs)
    return grpc.stream_stream_rpc_method_handler(abort_stream, **kwargs)

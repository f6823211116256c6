"""Cache keys: a fixed-size hash of everything that decides a pooled vector.

That is the model (its name and a fingerprint of its checkpoint), the max input tokens
in force, the prompt prefix actually put before the text, the truncation policy and the
text. ``dimensions``, ``normalize`` and the encoding are applied after the cache, so
they are not part of the key: one entry serves all of them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from pathlib import Path

from embedserve.service.models.tokenization import Truncation

# Bump when the meaning of a cached value changes: old entries are then never read.
KEY_VERSION = b"embedserve-cache-1"
DIGEST_SIZE = 32
# Files hashed whole; larger ones (weights) by their size and evenly spaced samples.
_HASHED_WHOLE_MAX_BYTES = 4 * 1024 * 1024
_SAMPLES = 16
_SAMPLE_BYTES = 64 * 1024


def _field(value: bytes) -> bytes:
    """Length-prefixed, so that no two field sequences hash the same bytes."""
    return len(value).to_bytes(8, "little") + value


def _sampled(path: Path, size: int) -> bytes:
    """The size and 16 slices of 64 KiB spread over the file, first and last included:
    a fine-tune of the same architecture has the same size but other bytes everywhere,
    and reading 1 MiB of a multi-GB checkpoint costs nothing at start-up."""
    parts = [str(size).encode()]
    step = max(0, size - _SAMPLE_BYTES) / (_SAMPLES - 1)
    with path.open("rb") as f:
        for i in range(_SAMPLES):
            f.seek(int(i * step))
            parts.append(f.read(_SAMPLE_BYTES))
    return b"".join(_field(part) for part in parts)


def model_fingerprint(folder: Path, extra: Iterable[str] = ()) -> str:
    """A hex digest of a model folder: the contents of its small files (configs,
    tokenizer) and a sample of the large ones (weights), plus ``extra`` (serving
    settings that change the vectors, such as pooling and dtype).

    Computed once at load time. A shared Redis thus never serves the vectors of one
    checkpoint for another that was given the same name.
    """
    digest = hashlib.sha256(KEY_VERSION)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    for path in files:
        size = path.stat().st_size
        digest.update(_field(path.relative_to(folder).as_posix().encode()))
        if size <= _HASHED_WHOLE_MAX_BYTES:
            digest.update(_field(path.read_bytes()))
        else:
            digest.update(_field(_sampled(path, size)))
    for item in extra:
        digest.update(_field(item.encode()))
    return digest.hexdigest()


class KeyBuilder:
    """Keys of one served model; the model's part of the hash is computed once."""

    def __init__(self, model: str, fingerprint: str, max_input_tokens: int) -> None:
        self.model = model
        self.fingerprint = fingerprint
        self._base = hashlib.blake2b(KEY_VERSION, digest_size=DIGEST_SIZE)
        for part in (model, fingerprint, str(max_input_tokens)):
            self._base.update(_field(part.encode()))

    def keys(self, prefix: str, truncation: Truncation, texts: Sequence[str]) -> list[bytes]:
        """One key a text, in order. ``prefix`` is the template text put before each text
        (the instruction as the model applies it; empty for documents)."""
        scope = self._base.copy()
        scope.update(_field(prefix.encode()))
        scope.update(_field(truncation.value.encode()))
        keys: list[bytes] = []
        for text in texts:
            digest = scope.copy()
            digest.update(_field(text.encode("utf-8", "surrogatepass")))
            keys.append(digest.digest())
        return keys

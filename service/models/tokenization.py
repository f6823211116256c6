"""Tokenization with the fast (Rust) tokenizer and the three truncation policies.

The tokenizer's own padding and truncation are switched off: padding is the runner's
job, and truncation follows the request's policy, which never cuts a prompt template
(instruction, reranker prefix) but only the user's text.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Encoding, Tokenizer


class Truncation(enum.Enum):
    ERROR = "error"
    END = "end"
    START = "start"


@dataclass(frozen=True, slots=True)
class TokenizedInput:
    ids: list[int]
    truncated: bool


class InputTooLongError(ValueError):
    """An input does not fit the model and the policy forbids truncating it.

    ``index`` is the input's position in its request; None means the fixed part of the
    prompt (instruction or query) leaves no room for the text at all.
    """

    def __init__(self, index: int | None, tokens: int, limit: int) -> None:
        self.index = index
        self.tokens = tokens
        self.limit = limit
        where = "the prompt template" if index is None else f"input {index}"
        super().__init__(f"{where} has {tokens} tokens, more than the limit of {limit}")


class TextTokenizer:
    """One model's tokenizer, safe to call from one thread at a time (the tokenizer thread)."""

    def __init__(self, backend: Tokenizer, *, max_tokens: int, pad_token_id: int) -> None:
        # A private copy: the checkpoint's tokenizer.json may enable padding/truncation
        # (all-MiniLM-L6-v2 pads to 128), which must not leak into our sequences.
        self._tok = Tokenizer.from_str(backend.to_str())
        self._tok.no_padding()
        self._tok.no_truncation()
        self.max_tokens = max_tokens
        self.pad_token_id = pad_token_id

    @classmethod
    def from_folder(cls, folder: Path, *, max_tokens: int) -> TextTokenizer:
        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        backend = getattr(hf, "backend_tokenizer", None)
        if backend is None:
            raise ValueError(f"{folder} has no fast tokenizer (tokenizer.json)")
        pad = hf.pad_token_id if hf.pad_token_id is not None else hf.eos_token_id
        if pad is None:
            raise ValueError(f"{folder}: the tokenizer defines neither a pad nor an eos token")
        return cls(backend, max_tokens=max_tokens, pad_token_id=int(pad))

    def token_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def encode_one(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=add_special_tokens).ids)

    def encode_with_prefix(
        self,
        texts: Sequence[str],
        prefix: str,
        truncation: Truncation,
        *,
        limit: int | None = None,
        add_special_tokens: bool = True,
    ) -> list[TokenizedInput]:
        """Tokenize ``prefix + text`` for each text, jointly (as the model cards do).

        Over-long inputs are re-encoded with the prefix kept whole and the text cut at
        the end or the start, as the policy says.
        """
        limit = self.max_tokens if limit is None else limit
        encodings = self._tok.encode_batch(
            [prefix + text for text in texts], add_special_tokens=add_special_tokens
        )
        out: list[TokenizedInput] = []
        for index, encoding in enumerate(encodings):
            if len(encoding.ids) <= limit:
                out.append(TokenizedInput(encoding.ids, truncated=False))
            elif truncation is Truncation.ERROR:
                # Blame the prompt template when it leaves no room for any text, as _fit does.
                self._prefix_room(prefix, limit, add_special_tokens)
                raise InputTooLongError(index, len(encoding.ids), limit)
            else:
                ids = self._fit(prefix, texts[index], truncation, limit, add_special_tokens)
                out.append(TokenizedInput(ids, truncated=True))
        return out

    def encode_pairs(
        self, first: str, seconds: Sequence[str], truncation: Truncation
    ) -> list[TokenizedInput]:
        """Tokenize (first, second) pairs; over-long pairs lose tokens from the second text only."""
        encodings = self._tok.encode_batch([(first, second) for second in seconds])
        out: list[TokenizedInput] = []
        for index, encoding in enumerate(encodings):
            if len(encoding.ids) <= self.max_tokens:
                out.append(TokenizedInput(encoding.ids, truncated=False))
            elif truncation is Truncation.ERROR:
                # Blame the first text (the query) when it alone leaves no room, as _fit_pair does.
                self._pair_room(first)
                raise InputTooLongError(index, len(encoding.ids), self.max_tokens)
            else:
                out.append(TokenizedInput(self._fit_pair(first, seconds[index], truncation), True))
        return out

    def longest_input(self) -> list[int]:
        """A sequence of exactly ``max_tokens`` ids, for warm-up."""
        return self._fit("", "warm up " * self.max_tokens, Truncation.END, self.max_tokens, True)

    def _fit(
        self, prefix: str, text: str, side: Truncation, limit: int, add_special_tokens: bool
    ) -> list[int]:
        head, room = self._prefix_room(prefix, limit, add_special_tokens)
        body = self._tok.encode(text, add_special_tokens=False)
        body.truncate(room, direction=_direction(side))
        merged = Encoding.merge([head, body]) if head is not None else body
        if not add_special_tokens:
            return list(merged.ids)
        return list(self._tok.post_process(merged).ids)

    def _fit_pair(self, first: str, second: str, side: Truncation) -> list[int]:
        a, room = self._pair_room(first)
        b = self._tok.encode(second, add_special_tokens=False)
        b.truncate(room, direction=_direction(side))
        return list(self._tok.post_process(a, b).ids)

    def _prefix_room(
        self, prefix: str, limit: int, add_special_tokens: bool
    ) -> tuple[Encoding | None, int]:
        """The encoded prefix and the tokens left for the text; raises when none are left."""
        specials = self._tok.num_special_tokens_to_add(False) if add_special_tokens else 0
        head = self._tok.encode(prefix, add_special_tokens=False) if prefix else None
        room = limit - specials - (len(head.ids) if head is not None else 0)
        if room < 1:
            raise InputTooLongError(None, limit - room + 1, limit)
        return head, room

    def _pair_room(self, first: str) -> tuple[Encoding, int]:
        """The encoded first text and the tokens left for the second; raises when none are."""
        a = self._tok.encode(first, add_special_tokens=False)
        room = self.max_tokens - self._tok.num_special_tokens_to_add(True) - len(a.ids)
        if room < 1:
            raise InputTooLongError(None, self.max_tokens - room + 1, self.max_tokens)
        return a, room


def _direction(side: Truncation) -> str:
    return "right" if side is Truncation.END else "left"

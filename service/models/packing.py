"""Padding-free batches: the real tokens of a right-padded batch, packed row after row.

A right-padded batch of texts of unequal length spends much of its compute on padding: 64
unary calls of short sentences, taken as one batch, are about 30% padding here, and the
engine cannot sort them away because it takes every queued call at once. A padding-free
forward (``packed_bert.py``, ``packed_qwen3.py``) runs its embeddings, norms and linear
layers, which are most of the work, on the real tokens only, as one ``[tokens, hidden]``
matrix. ``Packing`` is the layout: which tokens are real, their positions, and how attention,
which needs each sequence's tokens side by side, runs on them.

On the CPU the rows are sorted by length, so that the packed tokens of the rows of one length
form one contiguous block: each block is a ``[rows, length]`` batch as it stands and runs
through SDPA with no mask and no copy. Against scattering every row into the padded layout
around one masked SDPA, that made MiniLM's forward 3-5% faster on batches of short sentences
and 8-13% faster on batches of 16 to 256 tokens (docs/benchmarks.md, the changes table). On
CUDA, where each block would cost kernel launches a layer, a batch of unequal lengths is
scattered into the padded layout around one masked SDPA (unmeasured there: no GPU has been
lent since).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F  # noqa: N812 - the idiomatic name

from embedserve.service.models.base import DeviceSpec


@dataclass
class PackedBatch:
    """Hidden states of the real tokens of a right-padded batch.

    The rows may be packed in another order than the batch's (``order``); every pooling
    returns its rows in the batch's order.
    """

    hidden: torch.Tensor  # [tokens, hidden]: the shared prefix's tokens, then each row's
    lengths: torch.Tensor  # [rows]: each row's own tokens (after the prefix), in packed order
    order: torch.Tensor | None = None  # [rows]: the batch row of each packed row; None: same
    prefix: int = 0  # leading tokens every row shares, held once at the start of ``hidden``

    def mean(self) -> torch.Tensor:
        """Mean over each row's tokens, the shared prefix included, accumulated in float32."""
        rows = self.lengths.shape[0]
        sums = self.hidden[: self.prefix].float().sum(dim=0).expand(rows, -1).clone()
        # The row each of the rows' own tokens belongs to.
        row_of_token = torch.arange(rows, device=self.hidden.device).repeat_interleave(self.lengths)
        sums.index_add_(0, row_of_token, self.hidden[self.prefix :].float())
        counts = (self.lengths + self.prefix).clamp(min=1).unsqueeze(1).float()
        return self._in_batch_order(sums / counts)

    def first(self) -> torch.Tensor:
        if self.prefix:
            return self.hidden[:1].expand(self.lengths.shape[0], -1)
        return self._in_batch_order(self.hidden[self._starts()])

    def last(self) -> torch.Tensor:
        return self._in_batch_order(self.hidden[self._starts() + self.lengths - 1])

    def _starts(self) -> torch.Tensor:
        return torch.cumsum(self.lengths, 0) - self.lengths + self.prefix

    def _in_batch_order(self, rows: torch.Tensor) -> torch.Tensor:
        if self.order is None:
            return rows
        unsorted = torch.empty_like(rows)
        unsorted[self.order] = rows
        return unsorted


# Below this many tokens a shared prefix saves less than its bookkeeping costs.
MIN_SHARED_PREFIX = 8

# Rounded token counts (``round_tokens``): a multiple of 1/32 of the count's power of two, and
# of 16 tokens. At most 3% (1.5% on average) more rows for the layers, and at most 160 shapes
# up to the default token budget of 8192.
TOKEN_STEPS_PER_OCTAVE = 32
MIN_TOKEN_STEP = 16


def rounded_token_count(tokens: int) -> int:
    """``tokens`` rounded up to one of few shapes (see ``Packing``'s ``round_tokens``)."""
    if tokens <= 0:
        return tokens
    step = max(MIN_TOKEN_STEP, (1 << (tokens.bit_length() - 1)) // TOKEN_STEPS_PER_OCTAVE)
    return -(-tokens // step) * step


def rounds_tokens(device: DeviceSpec) -> bool:
    """Whether a packed forward on ``device`` should round its token count (see
    ``Packing``): on the CPU, where its linear layers run on oneDNN (bfloat16, float16,
    int8), and not in float32, whose BLAS keeps nothing per shape."""
    return device.device.type == "cpu" and (device.int8_linears or device.dtype != torch.float32)


def shared_prefix(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> int:
    """How many leading tokens every row of a right-padded batch has in common, short of each
    row's last token (every row keeps at least one of its own)."""
    mask = attention_mask.bool()
    same = ((input_ids == input_ids[:1]) & mask).all(dim=0)
    common = int(same.int().cumprod(dim=0).sum())
    return max(0, min(common, int(attention_mask.sum(dim=1).min()) - 1))


def _blocks_of_one_length(sorted_lengths: torch.Tensor) -> list[tuple[int, int]]:
    """(rows, length) of each run of equal lengths; rows with no tokens attend to nothing."""
    lengths, rows = torch.unique_consecutive(sorted_lengths, return_counts=True)
    return [
        (count, length)
        for length, count in zip(lengths.tolist(), rows.tolist(), strict=True)
        if length
    ]


class Packing:
    """The packed layout of one right-padded batch, and attention over it.

    ``by_length``: whether rows of unequal length attend in blocks of one length (None: on
    the CPU) or scattered into the padded layout around one masked SDPA (None: on CUDA).
    ``share_prefix``: for causal models only, where a token never sees what follows it:
    leading tokens that every row has in common (at least ``MIN_SHARED_PREFIX`` of them) are
    packed and computed once, before the rows' own tokens, which attend to them. A batch of
    Qwen3-Reranker pairs shares the judging prompt, and the instruction and query when they
    are one call's; queries to Qwen3-Embedding share their instruction. In blocks of one
    length only.
    ``round_tokens``: pad the packed tokens with rows of token 0 at position 0, up to
    ``rounded_token_count``, which every row-wise layer computes and attention and the
    pooling skip. oneDNN, under the CPU's bfloat16 and int8 linear layers, keeps a compiled
    kernel for every shape it has run and no packed batch of unequal texts has the same token
    count as the last. A bfloat16 MiniLM server's bulk stream peaked at 1,697 MiB of host
    memory with exact counts and 688 MiB rounded, and ran 26% faster rounded, because a
    server's batches have more distinct counts than that cache holds and compiling a kernel
    costs more than a forward (docs/benchmarks.md, twentieth session).
    """

    def __init__(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        by_length: bool | None,
        share_prefix: bool = False,
        round_tokens: bool = False,
    ) -> None:
        rows, width = input_ids.shape
        lengths = attention_mask.sum(dim=1)
        if by_length is None:
            by_length = input_ids.device.type == "cpu"
        by_length = by_length and rows > 1
        prefix = shared_prefix(input_ids, attention_mask) if share_prefix and by_length else 0
        if prefix < MIN_SHARED_PREFIX:
            prefix = 0
        self.order: torch.Tensor | None = None
        if by_length:
            lengths, self.order = torch.sort(lengths, stable=True)
            input_ids, attention_mask = input_ids[self.order], attention_mask[self.order]
        mask = attention_mask.bool()
        if prefix:
            # Each row keeps its own tokens only; the prefix goes in once, from the first row.
            mask = mask.clone()
            mask[:, :prefix] = False
            lengths = lengths - prefix
        self.lengths = lengths
        self.prefix = prefix
        # Right padding: each row's real tokens come first, so their row-major order keeps
        # each sequence contiguous and in order.
        full = not prefix and int(lengths.sum()) == rows * width
        positions = torch.arange(width, device=input_ids.device).expand(rows, width).reshape(-1)
        ids = input_ids.reshape(-1)
        # The padded position of each real token (None: there is no padding).
        self._index = None if full else mask.reshape(-1).nonzero().squeeze(1)
        if self._index is not None:
            ids, positions = ids[self._index], positions[self._index]
        if prefix:
            ids = torch.cat([input_ids[0, :prefix], ids])
            positions = torch.cat([torch.arange(prefix, device=positions.device), positions])
        self._real_tokens = ids.shape[0]
        self._padding_rows = 0
        if round_tokens:
            self._padding_rows = rounded_token_count(self._real_tokens) - self._real_tokens
            filler = ids.new_zeros(self._padding_rows)
            ids, positions = torch.cat([ids, filler]), torch.cat([positions, filler])
        self.ids = ids  # [tokens]: the real tokens, then any padding rows
        self.positions = positions  # [tokens]: each token's position in its sequence
        self._rows, self._width = rows, width
        self._key_mask = mask[:, None, None, :]
        # (rows, length) of each block of rows of one length, in packed order; None: padded.
        self._blocks: list[tuple[int, int]] | None = None
        if self._index is None:
            self._blocks = [(rows, width)]
        elif by_length:
            self._blocks = _blocks_of_one_length(lengths)

    def batch(self, hidden: torch.Tensor) -> PackedBatch:
        return PackedBatch(hidden[: self._real_tokens], self.lengths, self.order, self.prefix)

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False
    ) -> torch.Tensor:
        """Attention of packed ``q`` ``[tokens, heads, head]`` over packed ``k`` and ``v``
        ``[tokens, kv_heads, head]`` (fewer heads: grouped-query attention), each token
        within its own sequence; the context as ``[tokens, heads * head]``, zero on padding
        rows."""
        _, heads, head = q.shape
        grouped = k.shape[1] != heads
        if self.prefix and not causal:
            raise ValueError("a shared prefix needs causal attention")
        contexts = self._attend_blocks(q, k, v, causal, grouped)
        if self._padding_rows:
            contexts.append(q.new_zeros((self._padding_rows, heads * head)))
        return contexts[0] if len(contexts) == 1 else torch.cat(contexts)

    def _attend_blocks(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, grouped: bool
    ) -> list[torch.Tensor]:
        """Each block's context, in packed order, the padding rows left out."""
        _, heads, head = q.shape
        if self._blocks is None:
            return [self._attend_padded(q, k, v, causal, grouped)]
        # A shared prefix is the first block: one row, attending to itself. Every later
        # block attends to the prefix's keys and values as well as its own.
        blocks = ([(1, self.prefix)] if self.prefix else []) + self._blocks
        shared: tuple[torch.Tensor, torch.Tensor] | None = None
        contexts: list[torch.Tensor] = []
        start = 0
        for rows, length in blocks:
            end = start + rows * length
            block_q, block_k, block_v = (
                t[start:end].view(rows, length, t.shape[1], head).transpose(1, 2) for t in (q, k, v)
            )
            sees = None
            if shared is not None:
                block_k, block_v = (
                    torch.cat([prefix_part.expand(rows, -1, -1, -1), own], dim=2)
                    for prefix_part, own in zip(shared, (block_k, block_v), strict=True)
                )
                # Token i of a row sees the whole prefix and its row's tokens up to i.
                width = self.prefix + length
                sees = torch.ones((length, width), dtype=torch.bool, device=q.device)
                sees = sees.tril(diagonal=self.prefix)
            elif self.prefix:
                shared = (block_k, block_v)
            context = F.scaled_dot_product_attention(
                block_q,
                block_k,
                block_v,
                attn_mask=sees,
                is_causal=causal and sees is None,
                enable_gqa=grouped,
            )
            contexts.append(context.transpose(1, 2).reshape(end - start, heads * head))
            start = end
        return contexts

    def _attend_padded(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, grouped: bool
    ) -> torch.Tensor:
        assert self._index is not None
        rows, width = self._rows, self._width
        heads, head = q.shape[1], q.shape[2]

        def padded(t: torch.Tensor) -> torch.Tensor:
            grid = t.new_zeros((rows * width, t.shape[1], head))
            grid[self._index] = t[: self._real_tokens]
            return grid.view(rows, width, t.shape[1], head).transpose(1, 2)

        mask = self._key_mask
        if causal:
            lower = torch.ones((width, width), dtype=torch.bool, device=q.device).tril()
            mask = mask & lower
        context = F.scaled_dot_product_attention(
            padded(q), padded(k), padded(v), attn_mask=mask, enable_gqa=grouped
        )
        return context.transpose(1, 2).reshape(rows * width, heads * head)[self._index]

"""A padding-free forward pass for BERT encoders (all-MiniLM-L6-v2 and kin).

A right-padded batch of texts of unequal length spends much of its compute on padding:
64 unary calls of short sentences, taken as one batch, are about 30% padding here, and the
engine cannot sort them away because it takes every queued call at once. Here the linear
layers, which are most of the work, run on the real tokens only, packed into one
``[tokens, hidden]`` matrix.

Attention needs each sequence's tokens side by side. On the CPU the rows are sorted by
length, so that the packed tokens of the rows of one length form one contiguous block: each
block is a ``[rows, length]`` batch as it stands, and runs through SDPA with no mask and no
copy. Against scattering every row into the padded layout and running a masked SDPA, that
made MiniLM's forward 3-5% faster on batches of short sentences and about 30% faster on
batches of 16 to 512 tokens (docs/benchmarks.md, the changes table). On CUDA, where each
block would cost a kernel launch per layer, a batch of unequal lengths still scatters into
the padded layout (unmeasured there: no GPU has been lent since).

The weights are the Hugging Face model's own: the query, key and value projections are
re-pointed into one fused ``[3 * hidden, hidden]`` matrix (one matmul instead of three), so
the model keeps working unchanged and no weight is held twice.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F  # noqa: N812 - the idiomatic name
from torch import nn


@dataclass
class PackedBatch:
    """Hidden states of the real tokens of a right-padded batch.

    The rows may be packed in another order than the batch's (``order``); every pooling
    returns its rows in the batch's order.
    """

    hidden: torch.Tensor  # [tokens, hidden]: the rows' tokens, row after row
    lengths: torch.Tensor  # [rows]: real tokens a row, in packed order
    order: torch.Tensor | None = None  # [rows]: the batch row of each packed row; None: same

    def mean(self) -> torch.Tensor:
        """Mean over each row's tokens, accumulated in float32."""
        rows = self.lengths.shape[0]
        sums = torch.zeros(
            (rows, self.hidden.shape[1]), dtype=torch.float32, device=self.hidden.device
        )
        # The row each token belongs to.
        row_of_token = torch.arange(rows, device=self.hidden.device).repeat_interleave(self.lengths)
        sums.index_add_(0, row_of_token, self.hidden.float())
        return self._in_batch_order(sums / self.lengths.clamp(min=1).unsqueeze(1).float())

    def first(self) -> torch.Tensor:
        return self._in_batch_order(self.hidden[self._starts()])

    def last(self) -> torch.Tensor:
        return self._in_batch_order(self.hidden[self._starts() + self.lengths - 1])

    def _starts(self) -> torch.Tensor:
        return torch.cumsum(self.lengths, 0) - self.lengths

    def _in_batch_order(self, rows: torch.Tensor) -> torch.Tensor:
        if self.order is None:
            return rows
        unsorted = torch.empty_like(rows)
        unsorted[self.order] = rows
        return unsorted


def unsupported_reason(model: Any) -> str | None:
    """Why ``model`` cannot run packed (None when it can): only plain BERT encoders are."""
    config = getattr(model, "config", None)
    if type(model).__name__ != "BertModel" or config is None:
        return f"{type(model).__name__} is not a BertModel"
    if getattr(config, "position_embedding_type", "absolute") not in (None, "absolute"):
        return f"position_embedding_type {config.position_embedding_type!r}"
    if config.is_decoder or getattr(config, "add_cross_attention", False):
        return "a decoder or cross-attention BERT"
    if getattr(config, "chunk_size_feed_forward", 0):
        return "chunked feed-forward"
    return None


class _Layer:
    """One BertLayer's weights. Hugging Face's module tree is untyped, hence ``Any``."""

    def __init__(self, layer: Any) -> None:
        attention = layer.attention.self
        hidden = attention.query.in_features
        fused_weight = torch.cat(
            [attention.query.weight.data, attention.key.weight.data, attention.value.weight.data]
        )
        fused_bias = torch.cat(
            [attention.query.bias.data, attention.key.bias.data, attention.value.bias.data]
        )
        # The model's own projections become views into the fused tensors.
        for part, projection in enumerate((attention.query, attention.key, attention.value)):
            rows = slice(part * hidden, (part + 1) * hidden)
            projection.weight = nn.Parameter(fused_weight[rows], requires_grad=False)
            projection.bias = nn.Parameter(fused_bias[rows], requires_grad=False)
        self.qkv_weight: torch.Tensor = fused_weight
        self.qkv_bias: torch.Tensor = fused_bias
        self.heads: int = attention.num_attention_heads
        self.head_size: int = attention.attention_head_size
        self.attention_out: nn.Linear = layer.attention.output.dense
        self.attention_norm: nn.LayerNorm = layer.attention.output.LayerNorm
        self.intermediate: nn.Linear = layer.intermediate.dense
        self.activation: Callable[[torch.Tensor], torch.Tensor] = (
            layer.intermediate.intermediate_act_fn
        )
        self.out: nn.Linear = layer.output.dense
        self.out_norm: nn.LayerNorm = layer.output.LayerNorm


class _Attention(Protocol):
    def __call__(self, qkv: torch.Tensor, layer: _Layer) -> torch.Tensor:
        """The attention context ``[tokens, hidden]`` of packed ``[tokens, 3 * hidden]``."""
        ...


class _BlocksOfOneLength:
    """Rows packed in runs of one length: each run attends as an unpadded batch."""

    def __init__(self, blocks: list[tuple[int, int]]) -> None:
        self._blocks = blocks  # (rows, length) of each run, in packed order

    def __call__(self, qkv: torch.Tensor, layer: _Layer) -> torch.Tensor:
        hidden = qkv.shape[1] // 3
        contexts = []
        start = 0
        for rows, length in self._blocks:
            end = start + rows * length
            q, k, v = (
                qkv[start:end]
                .view(rows, length, 3, layer.heads, layer.head_size)
                .permute(2, 0, 3, 1, 4)
            )
            context = F.scaled_dot_product_attention(q, k, v)
            contexts.append(context.transpose(1, 2).reshape(end - start, hidden))
            start = end
        return contexts[0] if len(contexts) == 1 else torch.cat(contexts)


class _Padded:
    """Rows of unequal length scattered into the padded layout around one masked SDPA."""

    def __init__(self, index: torch.Tensor, mask: torch.Tensor) -> None:
        self._index = index  # the padded position of each packed token
        self._rows, self._width = mask.shape
        self._key_mask = mask[:, None, None, :]

    def __call__(self, qkv: torch.Tensor, layer: _Layer) -> torch.Tensor:
        rows, width, hidden = self._rows, self._width, qkv.shape[1] // 3
        padded = qkv.new_zeros((rows * width, 3 * hidden))
        padded[self._index] = qkv
        q, k, v = padded.view(rows, width, 3, layer.heads, layer.head_size).permute(2, 0, 3, 1, 4)
        context = F.scaled_dot_product_attention(q, k, v, attn_mask=self._key_mask)
        return context.transpose(1, 2).reshape(rows * width, hidden)[self._index]


class PackedBertEncoder:
    """Runs a BertModel's embeddings and encoder on the real tokens of a padded batch."""

    def __init__(self, model: Any, by_length: bool | None = None) -> None:
        """``by_length``: whether rows of unequal length attend in runs of one length
        (the default on the CPU) or scattered into the padded layout (the default on CUDA)."""
        reason = unsupported_reason(model)
        if reason is not None:
            raise ValueError(f"cannot run packed: {reason}")
        self._by_length = by_length
        embeddings = model.embeddings
        self._words: nn.Embedding = embeddings.word_embeddings
        self._positions: nn.Embedding = embeddings.position_embeddings
        self._token_type: nn.Embedding = embeddings.token_type_embeddings
        self._embedding_norm: nn.LayerNorm = embeddings.LayerNorm
        self._layers = [_Layer(layer) for layer in model.encoder.layer]

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> PackedBatch:
        rows, width = input_ids.shape
        lengths = attention_mask.sum(dim=1)
        order = None
        by_length = self._by_length
        if by_length is None:
            by_length = input_ids.device.type == "cpu"
        by_length = by_length and rows > 1
        if by_length:
            lengths, order = torch.sort(lengths, stable=True)
            input_ids, attention_mask = input_ids[order], attention_mask[order]
        mask = attention_mask.bool()
        # Right padding: every row is a prefix, so the row-major order of the real tokens
        # keeps each sequence contiguous and in order.
        full = int(lengths.sum()) == rows * width
        index = None if full else mask.reshape(-1).nonzero().squeeze(1)
        positions = torch.arange(width, device=input_ids.device).expand(rows, width)
        ids = input_ids.reshape(-1)
        positions = positions.reshape(-1)
        if index is not None:
            ids, positions = ids[index], positions[index]
        # Token type 0 for every token: embedders get one segment.
        x = self._words(ids) + self._positions(positions) + self._token_type.weight[0]
        x = self._embedding_norm(x)
        attention: _Attention
        if index is None:
            attention = _BlocksOfOneLength([(rows, width)])
        elif by_length:
            lengths_of_runs, rows_of_runs = torch.unique_consecutive(lengths, return_counts=True)
            attention = _BlocksOfOneLength(
                [
                    (run_rows, length)
                    for length, run_rows in zip(
                        lengths_of_runs.tolist(), rows_of_runs.tolist(), strict=True
                    )
                    if length  # an empty row has no tokens to attend
                ]
            )
        else:
            attention = _Padded(index, mask)
        for layer in self._layers:
            x = self._layer(layer, x, attention)
        return PackedBatch(x, lengths, order)

    @staticmethod
    def _layer(layer: _Layer, x: torch.Tensor, attention: _Attention) -> torch.Tensor:
        context = attention(F.linear(x, layer.qkv_weight, layer.qkv_bias), layer)
        x = layer.attention_norm(
            F.linear(context, layer.attention_out.weight, layer.attention_out.bias) + x
        )
        inner = layer.activation(F.linear(x, layer.intermediate.weight, layer.intermediate.bias))
        out: torch.Tensor = layer.out_norm(F.linear(inner, layer.out.weight, layer.out.bias) + x)
        return out

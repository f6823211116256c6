"""A padding-free forward pass for BERT encoders (all-MiniLM-L6-v2 and kin).

A right-padded batch of texts of unequal length spends much of its compute on padding:
64 unary calls of short sentences, taken as one batch, are about 30% padding here, and the
engine cannot sort them away because it takes every queued call at once. Here the linear
layers, which are most of the work, run on the real tokens only, packed into one
``[tokens, hidden]`` matrix. Only attention, which needs each sequence's tokens side by side,
scatters them into the padded layout and gathers them back.

The weights are the Hugging Face model's own: the query, key and value projections are
re-pointed into one fused ``[3 * hidden, hidden]`` matrix (one matmul instead of three), so
the model keeps working unchanged and no weight is held twice.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812 - the idiomatic name
from torch import nn


@dataclass
class PackedBatch:
    """Hidden states of the real tokens of a right-padded batch, in batch order."""

    hidden: torch.Tensor  # [tokens, hidden]
    lengths: torch.Tensor  # [batch]: real tokens a row

    def mean(self) -> torch.Tensor:
        """Mean over each row's tokens, accumulated in float32."""
        rows = self.lengths.shape[0]
        sums = torch.zeros(
            (rows, self.hidden.shape[1]), dtype=torch.float32, device=self.hidden.device
        )
        # The row each token belongs to.
        row_of_token = torch.arange(rows, device=self.hidden.device).repeat_interleave(self.lengths)
        sums.index_add_(0, row_of_token, self.hidden.float())
        return sums / self.lengths.clamp(min=1).unsqueeze(1).float()

    def first(self) -> torch.Tensor:
        return self.hidden[self._starts()]

    def last(self) -> torch.Tensor:
        return self.hidden[self._starts() + self.lengths - 1]

    def _starts(self) -> torch.Tensor:
        return torch.cumsum(self.lengths, 0) - self.lengths


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


class PackedBertEncoder:
    """Runs a BertModel's embeddings and encoder on the real tokens of a padded batch."""

    def __init__(self, model: Any) -> None:
        reason = unsupported_reason(model)
        if reason is not None:
            raise ValueError(f"cannot run packed: {reason}")
        embeddings = model.embeddings
        self._words: nn.Embedding = embeddings.word_embeddings
        self._positions: nn.Embedding = embeddings.position_embeddings
        self._token_type: nn.Embedding = embeddings.token_type_embeddings
        self._embedding_norm: nn.LayerNorm = embeddings.LayerNorm
        self._layers = [_Layer(layer) for layer in model.encoder.layer]

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> PackedBatch:
        batch, width = input_ids.shape
        mask = attention_mask.bool()
        lengths = mask.sum(dim=1)
        # Right padding: every row is a prefix, so the row-major order of the real tokens
        # keeps each sequence contiguous and in order.
        full = int(lengths.sum()) == batch * width
        index = None if full else mask.reshape(-1).nonzero().squeeze(1)
        positions = torch.arange(width, device=input_ids.device).expand(batch, width)
        ids = input_ids.reshape(-1)
        positions = positions.reshape(-1)
        if index is not None:
            ids, positions = ids[index], positions[index]
        # Token type 0 for every token: embedders get one segment.
        x = self._words(ids) + self._positions(positions) + self._token_type.weight[0]
        x = self._embedding_norm(x)
        key_mask = None if full else mask[:, None, None, :]
        for layer in self._layers:
            x = self._layer(layer, x, index, key_mask, batch, width)
        return PackedBatch(x, lengths)

    @staticmethod
    def _layer(
        layer: _Layer,
        x: torch.Tensor,
        index: torch.Tensor | None,
        key_mask: torch.Tensor | None,
        batch: int,
        width: int,
    ) -> torch.Tensor:
        hidden = x.shape[1]
        qkv = F.linear(x, layer.qkv_weight, layer.qkv_bias)
        if index is not None:
            padded = qkv.new_zeros((batch * width, 3 * hidden))
            padded[index] = qkv
            qkv = padded
        q, k, v = qkv.view(batch, width, 3, layer.heads, layer.head_size).permute(2, 0, 3, 1, 4)
        context = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)
        context = context.transpose(1, 2).reshape(batch * width, hidden)
        if index is not None:
            context = context[index]
        x = layer.attention_norm(
            F.linear(context, layer.attention_out.weight, layer.attention_out.bias) + x
        )
        inner = layer.activation(F.linear(x, layer.intermediate.weight, layer.intermediate.bias))
        out: torch.Tensor = layer.out_norm(F.linear(inner, layer.out.weight, layer.out.bias) + x)
        return out

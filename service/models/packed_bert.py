"""A padding-free forward pass for BERT encoders (all-MiniLM-L6-v2 and kin).

The embeddings and every linear layer run on the real tokens of the batch only, and attention
runs as ``packing.py`` lays it out (in blocks of one length on the CPU).

The weights are the Hugging Face model's own: the query, key and value projections are
re-pointed into one fused ``[3 * hidden, hidden]`` matrix (one matmul instead of three), so
the model keeps working unchanged and no weight is held twice.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from embedserve.service.models.packing import PackedBatch, Packing


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


class _Layer(nn.Module):
    """One BertLayer's modules, with the query, key and value projections as one."""

    def __init__(self, layer: Any) -> None:
        super().__init__()
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
        qkv = nn.Linear(hidden, 3 * hidden, device="meta")  # its weights are set next
        qkv.weight = nn.Parameter(fused_weight, requires_grad=False)
        qkv.bias = nn.Parameter(fused_bias, requires_grad=False)
        self.qkv: nn.Module = qkv
        self.heads: int = attention.num_attention_heads
        self.head_size: int = attention.attention_head_size
        # The model's own modules: a linear layer converted in place (--dtype int8,
        # quantization.py) is converted for both.
        self.attention_out: nn.Module = layer.attention.output.dense
        self.attention_norm: nn.LayerNorm = layer.attention.output.LayerNorm
        self.intermediate: nn.Module = layer.intermediate.dense
        self.activation: Callable[[torch.Tensor], torch.Tensor] = (
            layer.intermediate.intermediate_act_fn
        )
        self.out: nn.Module = layer.output.dense
        self.out_norm: nn.LayerNorm = layer.output.LayerNorm


class PackedBertEncoder:
    """Runs a BertModel's embeddings and encoder on the real tokens of a padded batch."""

    def __init__(
        self, model: Any, by_length: bool | None = None, round_tokens: bool = False
    ) -> None:
        """``by_length``: whether rows of unequal length attend in runs of one length
        (the default on the CPU) or scattered into the padded layout (the default on CUDA).
        ``round_tokens``: see ``Packing``."""
        reason = unsupported_reason(model)
        if reason is not None:
            raise ValueError(f"cannot run packed: {reason}")
        self._by_length = by_length
        self._round_tokens = round_tokens
        embeddings = model.embeddings
        self._words: nn.Embedding = embeddings.word_embeddings
        self._positions: nn.Embedding = embeddings.position_embeddings
        self._token_type: nn.Embedding = embeddings.token_type_embeddings
        self._embedding_norm: nn.LayerNorm = embeddings.LayerNorm
        self._layers = [_Layer(layer) for layer in model.encoder.layer]
        # The same layers as a module tree, for what walks one (--dtype int8's conversion).
        self.layers = nn.ModuleList(self._layers)

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> PackedBatch:
        packing = Packing(
            input_ids, attention_mask, self._by_length, round_tokens=self._round_tokens
        )
        # Token type 0 for every token: embedders get one segment.
        x = self._words(packing.ids) + self._positions(packing.positions)
        x = self._embedding_norm(x + self._token_type.weight[0])
        for layer in self._layers:
            x = self._layer(layer, x, packing)
        return packing.batch(x)

    @staticmethod
    def _layer(layer: _Layer, x: torch.Tensor, packing: Packing) -> torch.Tensor:
        qkv = layer.qkv(x)
        q, k, v = qkv.view(x.shape[0], 3, layer.heads, layer.head_size).unbind(1)
        context = packing.attend(q, k, v)
        x = layer.attention_norm(layer.attention_out(context) + x)
        inner = layer.activation(layer.intermediate(x))
        out: torch.Tensor = layer.out_norm(layer.out(inner) + x)
        return out

"""A padding-free forward pass for the Qwen3 decoder (Qwen3-Embedding, Qwen3-Reranker).

The Hugging Face modules run as they are, on the real tokens of the batch only (``[tokens,
hidden]``): the token embeddings, every RMSNorm (the per-head query and key norms too), the
projections and the MLP. Only attention is this module's own: rotary embeddings at each
token's position in its sequence, then causal attention within each sequence as ``packing.py``
lays it out. With right padding a real token never attends to padding (it comes after it), so
the result is the padded forward's.

Only what the Hugging Face forward computes the same way is run packed: full attention in
every layer and the default rotary embedding. Anything else runs padded (``unsupported_reason``).
"""

from __future__ import annotations

from typing import Any

import torch

from embedserve.service.models.packing import PackedBatch, Packing


def unsupported_reason(model: Any) -> str | None:
    """Why the Qwen3 decoder ``model`` cannot run packed (None when it can)."""
    config = getattr(model, "config", None)
    if type(model).__name__ != "Qwen3Model" or config is None:
        return f"{type(model).__name__} is not a Qwen3Model"
    layer_types = getattr(config, "layer_types", None) or []
    if any(kind != "full_attention" for kind in layer_types):
        return "sliding-window attention layers"
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rope_type = (
        rope.get("rope_type", rope.get("type", "default"))
        if isinstance(rope, dict)
        else type(rope).__name__
    )
    if rope_type != "default":
        return f"rope type {rope_type!r}"
    return None


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class PackedQwen3Decoder:
    """Runs a Qwen3Model on the real tokens of a right-padded batch; its final hidden states."""

    def __init__(
        self,
        model: Any,
        by_length: bool | None = None,
        share_prefix: bool = True,
        round_tokens: bool = False,
    ) -> None:
        """``by_length``, ``share_prefix``, ``round_tokens``: see ``Packing``."""
        reason = unsupported_reason(model)
        if reason is not None:
            raise ValueError(f"cannot run packed: {reason}")
        self._model = model
        self._by_length = by_length
        self._share_prefix = share_prefix
        self._round_tokens = round_tokens
        config = model.config
        self._heads: int = config.num_attention_heads
        self._kv_heads: int = config.num_key_value_heads
        self._head: int = getattr(config, "head_dim", None) or config.hidden_size // self._heads

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> PackedBatch:
        model = self._model
        packing = Packing(
            input_ids, attention_mask, self._by_length, self._share_prefix, self._round_tokens
        )
        x = model.embed_tokens(packing.ids)
        # The model's own rotary module, over the batch's width, then each token's row.
        width = input_ids.shape[1]
        cos, sin = model.rotary_emb(x, torch.arange(width, device=x.device).unsqueeze(0))
        cos, sin = cos[0][packing.positions].unsqueeze(1), sin[0][packing.positions].unsqueeze(1)
        for layer in model.layers[: model.config.num_hidden_layers]:
            x = x + self._attention(layer.self_attn, layer.input_layernorm(x), cos, sin, packing)
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return packing.batch(model.norm(x))

    def _attention(
        self,
        attention: Any,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        packing: Packing,
    ) -> torch.Tensor:
        tokens = x.shape[0]
        q = attention.q_norm(attention.q_proj(x).view(tokens, self._heads, self._head))
        k = attention.k_norm(attention.k_proj(x).view(tokens, self._kv_heads, self._head))
        v = attention.v_proj(x).view(tokens, self._kv_heads, self._head)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        context: torch.Tensor = attention.o_proj(packing.attend(q, k, v, causal=True))
        return context

"""BERT-style sentence-transformers embedders (all-MiniLM-L6-v2 and kin)."""

from __future__ import annotations

import logging

import torch
from transformers import AutoModel

from embedserve.service.models.base import (
    DeviceSpec,
    EmbeddingAdapter,
    ModelLoadError,
    gather_last_token,
    layer_checkpoints,
    mean_pool,
)
from embedserve.service.models.folder import (
    load_config,
    load_weights,
    max_positions,
    read_sentence_transformers,
)
from embedserve.service.models.options import ModelOptions
from embedserve.service.models.packed_bert import PackedBertEncoder, unsupported_reason
from embedserve.service.models.packing import PackedBatch, rounds_tokens
from embedserve.service.models.quantization import apply_int8
from embedserve.service.models.tokenization import TextTokenizer

POOLINGS = ("mean", "cls", "last_token")

log = logging.getLogger(__name__)


class SentenceTransformerEmbedder(EmbeddingAdapter):
    family = "sentence-transformers"

    def __init__(self, options: ModelOptions, device: DeviceSpec) -> None:
        folder = options.folder
        config = load_config(folder)
        st = read_sentence_transformers(folder)
        pooling = options.pooling or (st.pooling if st else None)
        if pooling is None:
            raise ModelLoadError(
                f"{folder} has no sentence-transformers pooling config (1_Pooling/config.json); "
                f"pass --pooling ({', '.join(POOLINGS)})"
            )
        if pooling not in POOLINGS:
            raise ModelLoadError(f"pooling {pooling!r} is not one of {', '.join(POOLINGS)}")
        natural = max_positions(config)
        if st is not None and st.max_seq_length:
            natural = min(natural, st.max_seq_length)
        self.name = options.name
        self.device = device
        self.pooling = pooling
        self.tokenizer = TextTokenizer.from_folder(folder, max_tokens=options.input_limit(natural))
        self.dimensions = int(config.hidden_size)
        # Not matryoshka-trained unless the operator says so: full dimension only.
        self.min_dimensions = options.dimension_floor(self.dimensions, self.dimensions)
        query_prompt = st.query_prompt if st is not None else ""
        self.default_instruction = (
            query_prompt if options.default_instruction is None else options.default_instruction
        )
        self._model = load_weights(AutoModel, folder, device)
        self._packed: PackedBertEncoder | None = None
        if options.padding_free:
            reason = unsupported_reason(self._model)
            if reason is None:
                self._packed = PackedBertEncoder(self._model, round_tokens=rounds_tokens(device))
            else:
                log.info("padding-free forward unavailable", extra={"reason": reason})
        # After the packed encoder fused its projections: int8 converts the fused one too.
        apply_int8(device, self._model, *([self._packed.layers] if self._packed else []))
        log.info("forward", extra={"model": self.name, "padding_free": self.padding_free})

    @property
    def padding_free(self) -> bool:  # overrides the base's constant
        return self._packed is not None

    def query_prefix(self, instruction: str) -> str:
        # sentence-transformers prompts are plain prefixes.
        return instruction

    def thread_checkpoints(self) -> list[torch.nn.Module]:
        # BERT's attention output norm: Hugging Face's forward and the packed one (which
        # calls a layer's own submodules but not the BertLayer itself, packed_bert.py) both
        # call it once a layer.
        return layer_checkpoints(self._model, "attention.output.LayerNorm")

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self._packed is not None:
            return self._pool_packed(self._packed(input_ids, attention_mask))
        hidden: torch.Tensor = self._model(
            input_ids=input_ids, attention_mask=attention_mask
        ).last_hidden_state
        if self.pooling == "mean":
            return mean_pool(hidden, attention_mask)
        if self.pooling == "cls":
            return hidden[:, 0]
        return gather_last_token(hidden, attention_mask)

    def _pool_packed(self, packed: PackedBatch) -> torch.Tensor:
        if self.pooling == "mean":
            return packed.mean()
        if self.pooling == "cls":
            return packed.first()
        return packed.last()

"""Sequence-classification cross-encoders (BERT ms-marco style rerankers)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import AutoModelForSequenceClassification

from embedserve.service.models.base import (
    DeviceSpec,
    ModelLoadError,
    RerankerAdapter,
    RerankMethod,
    layer_checkpoints,
)
from embedserve.service.models.folder import load_config, load_weights, max_positions
from embedserve.service.models.options import ModelOptions
from embedserve.service.models.quantization import apply_int8
from embedserve.service.models.tokenization import TextTokenizer, TokenizedInput, Truncation


class CrossEncoderReranker(RerankerAdapter):
    family = "cross-encoder"
    method = RerankMethod.CROSS_ENCODER
    accepts_instruction = False
    default_instruction = ""

    def __init__(self, options: ModelOptions, device: DeviceSpec) -> None:
        config = load_config(options.folder)
        architectures = config.architectures or []
        if not any(arch.endswith("ForSequenceClassification") for arch in architectures):
            raise ModelLoadError(
                f"{options.folder}: a cross-encoder must be a *ForSequenceClassification "
                f"model (found {architectures or 'no architectures'})"
            )
        if int(config.num_labels or 0) != 1:
            raise ModelLoadError(
                f"{options.folder}: a cross-encoder reranker needs one output label "
                f"(found {config.num_labels})"
            )
        self.name = options.name
        self.device = device
        self.tokenizer = TextTokenizer.from_folder(
            options.folder, max_tokens=options.input_limit(max_positions(config))
        )
        self._model = load_weights(AutoModelForSequenceClassification, options.folder, device)
        # The encoder only: the one-row score head stays exact, and costs nothing.
        apply_int8(device, self._model.base_model)
        # BERT pairs need segment ids; derive them on the device from the first
        # separator rather than carrying them through the queue.
        self._separator = self.tokenizer.token_id("[SEP]")
        self._uses_segments = int(getattr(config, "type_vocab_size", 1)) > 1

    def tokenize_pairs(
        self, query: str, documents: Sequence[str], instruction: str, truncation: Truncation
    ) -> list[TokenizedInput]:
        return self.tokenizer.encode_pairs(query, documents, truncation)

    def thread_checkpoints(self) -> list[torch.nn.Module]:
        return layer_checkpoints(self._model, "attention.output.LayerNorm")

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if self._uses_segments and self._separator is not None:
            is_sep = (input_ids == self._separator).int()
            first_sep = is_sep.argmax(dim=1, keepdim=True)
            positions = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
            kwargs["token_type_ids"] = ((positions > first_sep) & attention_mask.bool()).long()
        logits = self._model(**kwargs).logits[:, 0].float()
        return torch.sigmoid(logits)

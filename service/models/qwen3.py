"""Qwen3-Embedding and Qwen3-Reranker: the published recipes, encoded once as data.

See docs/design.md and the model cards: last-token pooling for embeddings, and the
yes/no judgement prompt scored as sigmoid(logit_yes - logit_no) for reranking.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from transformers import AutoModel, AutoModelForCausalLM

from embedserve.service.models.base import (
    DeviceSpec,
    EmbeddingAdapter,
    ModelLoadError,
    RerankerAdapter,
    RerankMethod,
    gather_last_token,
    layer_checkpoints,
)
from embedserve.service.models.folder import (
    QWEN3_OPERATING_LENGTH,
    load_config,
    load_weights,
    max_positions,
)
from embedserve.service.models.options import ModelOptions
from embedserve.service.models.packed_qwen3 import PackedQwen3Decoder, unsupported_reason
from embedserve.service.models.packing import rounds_tokens
from embedserve.service.models.quantization import apply_int8
from embedserve.service.models.tokenization import TextTokenizer, TokenizedInput, Truncation

DEFAULT_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"
END_TOKEN = "<|endoftext|>"
MIN_MRL_DIMENSIONS = 32
RERANKER_PREFIX = (
    "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query "
    'and the Instruct provided. Note that the answer can only be "yes" or "no".<|im_end|>\n'
    "<|im_start|>user\n"
)
RERANKER_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"

log = logging.getLogger(__name__)


def _qwen3_tokenizer(options: ModelOptions) -> TextTokenizer:
    config = load_config(options.folder)
    if config.model_type != "qwen3":
        raise ModelLoadError(f"{options.folder} is a {config.model_type!r} model, not qwen3")
    natural = min(max_positions(config), QWEN3_OPERATING_LENGTH)
    return TextTokenizer.from_folder(options.folder, max_tokens=options.input_limit(natural))


def _padding_free(
    decoder: Any, options: ModelOptions, device: DeviceSpec
) -> PackedQwen3Decoder | None:
    """The padding-free forward of ``decoder`` (a Qwen3Model), where it applies: on the CPU.
    On CUDA the padded forward stays, the one CUDA graphs capture (``cuda_graphs.py``)."""
    if not options.padding_free or device.device.type != "cpu":
        return None
    reason = unsupported_reason(decoder)
    if reason is not None:
        log.info(
            "padding-free forward unavailable", extra={"model": options.name, "reason": reason}
        )
        return None
    return PackedQwen3Decoder(decoder, round_tokens=rounds_tokens(device))


class Qwen3Embedder(EmbeddingAdapter):
    family = "qwen3-embedding"
    pooling = "last_token"
    cuda_graphs = True  # bench/gpu_probe.py --only graphs; tests/test_cuda.py

    def __init__(self, options: ModelOptions, device: DeviceSpec) -> None:
        self.name = options.name
        self.device = device
        self.tokenizer = _qwen3_tokenizer(options)
        end = self.tokenizer.token_id(END_TOKEN)
        probe = self.tokenizer.encode_one("hello")
        if end is None or not probe or probe[-1] != end:
            # Without the end token the last-token pooling reads the wrong position and
            # quality silently degrades; refuse to serve rather than serve bad vectors.
            raise ModelLoadError(
                f"{options.folder}: the tokenizer does not append {END_TOKEN}; Qwen3-Embedding "
                "pools the end token's hidden state (check tokenizer.json's post_processor)"
            )
        self._model = load_weights(AutoModel, options.folder, device)
        apply_int8(device, self._model)
        self._packed = _padding_free(self._model, options, device)
        self.dimensions = int(self._model.config.hidden_size)
        self.min_dimensions = options.dimension_floor(
            min(MIN_MRL_DIMENSIONS, self.dimensions), self.dimensions
        )
        self.default_instruction = (
            DEFAULT_INSTRUCTION
            if options.default_instruction is None
            else options.default_instruction
        )

    @property
    def padding_free(self) -> bool:  # overrides the base's constant
        return self._packed is not None

    def query_prefix(self, instruction: str) -> str:
        return f"Instruct: {instruction}\nQuery:"

    def thread_checkpoints(self) -> list[torch.nn.Module]:
        # Called first in each layer by Hugging Face's forward and by the packed one.
        return layer_checkpoints(self._model, "input_layernorm")

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self._packed is not None:
            return self._packed(input_ids, attention_mask).last()
        hidden = self._model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return gather_last_token(hidden, attention_mask)


class Qwen3Reranker(RerankerAdapter):
    family = "qwen3-reranker"
    method = RerankMethod.YES_NO_LOGITS
    accepts_instruction = True
    cuda_graphs = True  # tests/test_cuda.py

    def __init__(self, options: ModelOptions, device: DeviceSpec) -> None:
        self.name = options.name
        self.device = device
        self.tokenizer = _qwen3_tokenizer(options)
        yes, no = self._answer_id("yes"), self._answer_id("no")
        self._prefix = self.tokenizer.encode_one(RERANKER_PREFIX, add_special_tokens=False)
        self._suffix = self.tokenizer.encode_one(RERANKER_SUFFIX, add_special_tokens=False)
        self._body_limit = self.tokenizer.max_tokens - len(self._prefix) - len(self._suffix)
        if self._body_limit < 16:
            raise ModelLoadError(f"{self.name}: max input tokens leave no room for the document")
        model = load_weights(AutoModelForCausalLM, options.folder, device)
        head = model.get_output_embeddings().weight
        # Only the logit difference matters: one row (w_yes - w_no) replaces the
        # vocabulary-sized LM head, a dot product per sequence.
        self._yes_minus_no = (head[yes].float() - head[no].float()).detach().clone()
        self._backbone = model.get_decoder()
        apply_int8(device, self._backbone)  # after the head's row was taken, in float
        self._packed = _padding_free(self._backbone, options, device)
        self.default_instruction = (
            DEFAULT_INSTRUCTION
            if options.default_instruction is None
            else options.default_instruction
        )

    def _answer_id(self, word: str) -> int:
        ids = self.tokenizer.encode_one(word, add_special_tokens=False)
        if len(ids) != 1:
            raise ModelLoadError(
                f"{self.name}: {word!r} is not a single token in this tokenizer ({ids}); "
                "not a Qwen3-Reranker tokenizer"
            )
        return ids[0]

    def tokenize_pairs(
        self, query: str, documents: Sequence[str], instruction: str, truncation: Truncation
    ) -> list[TokenizedInput]:
        head = f"<Instruct>: {instruction}\n<Query>: {query}\n<Document>: "
        bodies = self.tokenizer.encode_with_prefix(
            documents, head, truncation, limit=self._body_limit
        )
        return [TokenizedInput(self._prefix + b.ids + self._suffix, b.truncated) for b in bodies]

    def warmup_input(self) -> list[int]:
        return self.tokenize_pairs(
            "warm up", ["warm up " * self.max_input_tokens], "", Truncation.END
        )[0].ids

    @property
    def padding_free(self) -> bool:
        return self._packed is not None

    def thread_checkpoints(self) -> list[torch.nn.Module]:
        return layer_checkpoints(self._backbone, "input_layernorm")

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self._packed is not None:
            last = self._packed(input_ids, attention_mask).last()
        else:
            hidden = self._backbone(
                input_ids=input_ids, attention_mask=attention_mask
            ).last_hidden_state
            last = gather_last_token(hidden, attention_mask)
        return torch.sigmoid(last.float() @ self._yes_minus_no)

"""The small interface between the engine and a model family.

An adapter knows what one model family needs: how its inputs are templated and
tokenized, and how a padded batch of token ids becomes one output row a sequence
(a pooled embedding or a relevance score). It knows nothing about queues, requests
or gRPC.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from embedserve.service.models.tokenization import TextTokenizer, TokenizedInput, Truncation


class ModelKind(enum.Enum):
    EMBEDDING = "embedding"
    RERANKER = "reranker"


class RerankMethod(enum.Enum):
    CROSS_ENCODER = "cross_encoder"
    YES_NO_LOGITS = "yes_no_logits"
    EMBEDDING_SIMILARITY = "embedding_similarity"


class ModelLoadError(RuntimeError):
    """The model folder cannot be served; raised at start-up, never under traffic."""


@dataclass(frozen=True)
class DeviceSpec:
    """Where and in which precision a model runs."""

    device: torch.device
    dtype: torch.dtype  # of the activations, and of the weights unless ``int8_linears``
    # --dtype int8 (CPU): every linear layer's weights in int8, its input quantized per call
    # (models/quantization.py); the embeddings, norms and attention stay in ``dtype``.
    int8_linears: bool = False

    @property
    def dtype_name(self) -> str:
        if self.int8_linears:
            return "int8"
        return str(self.dtype).removeprefix("torch.")


class ModelAdapter(ABC):
    """What the engine needs from any model: a tokenizer and a batched forward pass."""

    name: str
    family: str
    kind: ModelKind
    tokenizer: TextTokenizer
    device: DeviceSpec
    # Whether ``forward`` may be captured into a CUDA graph (engine/cuda_graphs.py): no host
    # synchronisation, no shape that depends on the data. Set only where a capture was
    # checked against eager.
    cuda_graphs: bool = False

    @property
    def max_input_tokens(self) -> int:
        return self.tokenizer.max_tokens

    @property
    def pad_token_id(self) -> int:
        return self.tokenizer.pad_token_id

    @property
    def padding_free(self) -> bool:
        """Whether ``forward`` computes only the real tokens of a padded batch."""
        return False

    @abstractmethod
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Run one right-padded batch: one row a sequence (embedding) or one value (score)."""

    @abstractmethod
    def warmup_input(self) -> list[int]:
        """Token ids of a longest-possible sequence, used to warm up with a full-size batch."""

    def thread_checkpoints(self) -> Sequence[torch.nn.Module]:
        """Modules that every forward path of this model calls once a layer: where a CPU
        batch's thread count may change while it runs (``engine/runner.py``). None: the
        count is set once a batch."""
        return ()


class EmbeddingAdapter(ModelAdapter):
    kind = ModelKind.EMBEDDING
    dimensions: int
    min_dimensions: int
    default_instruction: str
    pooling: str

    @abstractmethod
    def query_prefix(self, instruction: str) -> str:
        """The text put before a query for this instruction (the model's prompt template)."""

    def tokenize(
        self, texts: Sequence[str], prefix: str, truncation: Truncation
    ) -> list[TokenizedInput]:
        """Called on the tokenizer thread; raises InputTooLongError under TRUNCATION ERROR."""
        return self.tokenizer.encode_with_prefix(texts, prefix, truncation)

    def warmup_input(self) -> list[int]:
        return self.tokenizer.longest_input()


class RerankerAdapter(ModelAdapter):
    kind = ModelKind.RERANKER
    method: RerankMethod
    default_instruction: str
    # Whether RerankRequest.instruction means anything to this model.
    accepts_instruction: bool

    @abstractmethod
    def tokenize_pairs(
        self, query: str, documents: Sequence[str], instruction: str, truncation: Truncation
    ) -> list[TokenizedInput]:
        """Called on the tokenizer thread; one sequence a document."""

    def warmup_input(self) -> list[int]:
        return self.tokenizer.longest_input()


def layer_checkpoints(model: torch.nn.Module, inner: str) -> list[torch.nn.Module]:
    """For ``thread_checkpoints``: the submodule ``inner`` of each of ``model``'s
    transformer layers (its longest ModuleList), or the layer itself where it has none."""
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
    if not lists:
        return []
    checkpoints = []
    for layer in max(lists, key=len):
        try:
            checkpoints.append(layer.get_submodule(inner))
        except AttributeError:  # another architecture: its layer, which Hugging Face calls
            checkpoints.append(layer)
    return checkpoints


def gather_last_token(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Hidden state of each sequence's last real token in a right-padded batch.

    Found by sequence length, never by searching for the pad id: Qwen3 uses the same id
    for its appended end token and for padding.
    """
    last = attention_mask.sum(dim=1) - 1
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)

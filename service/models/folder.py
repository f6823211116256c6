"""Reading a local model folder: configs, sentence-transformers metadata, weights.

Everything loads with ``local_files_only``: nothing is ever fetched from a hub.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import AutoConfig, PretrainedConfig, PreTrainedModel

from embedserve.service.models.base import DeviceSpec, ModelLoadError

# Qwen3 documents 8192 tokens as the operating length, although RoPE allows 32768.
QWEN3_OPERATING_LENGTH = 8192

_SUPPORTED_ST_MODULES = {
    "sentence_transformers.models.Transformer",
    "sentence_transformers.models.Pooling",
    "sentence_transformers.models.Normalize",
}
_POOLING_KEYS = {
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_cls_token": "cls",
    "pooling_mode_lasttoken": "last_token",
}


@dataclass(frozen=True)
class SentenceTransformersInfo:
    """What a sentence-transformers folder says about serving it."""

    pooling: str | None
    max_seq_length: int | None
    query_prompt: str


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} must hold a JSON object")
    return data


def load_config(folder: Path) -> PretrainedConfig:
    if not folder.is_dir():
        raise ModelLoadError(f"model folder {folder} does not exist or is not a directory")
    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"{folder} has no config.json: not a transformers model folder")
    try:
        config: PretrainedConfig = AutoConfig.from_pretrained(str(folder), local_files_only=True)
        return config
    except Exception as exc:  # transformers raises many types for a bad config
        raise ModelLoadError(f"cannot read the config in {folder}: {exc}") from exc


def read_sentence_transformers(folder: Path) -> SentenceTransformersInfo | None:
    """The pooling, max length and query prompt of a sentence-transformers folder, if it is one."""
    modules_file = folder / "modules.json"
    if not modules_file.is_file():
        return None
    modules = json.loads(modules_file.read_text(encoding="utf-8"))
    pooling: str | None = None
    for module in modules:
        kind = module.get("type", "")
        if kind not in _SUPPORTED_ST_MODULES:
            raise ModelLoadError(
                f"{folder}: sentence-transformers module {kind!r} is not supported "
                f"(supported: {', '.join(sorted(_SUPPORTED_ST_MODULES))})"
            )
        if kind.endswith(".Pooling"):
            pooling = _read_pooling(folder / module.get("path", "") / "config.json")
    max_seq_length = None
    bert_config = folder / "sentence_bert_config.json"
    if bert_config.is_file():
        value = read_json(bert_config).get("max_seq_length")
        max_seq_length = int(value) if value else None
    query_prompt = ""
    st_config = folder / "config_sentence_transformers.json"
    if st_config.is_file():
        prompts = read_json(st_config).get("prompts") or {}
        query_prompt = str(prompts.get("query", ""))
    return SentenceTransformersInfo(pooling, max_seq_length, query_prompt)


def _read_pooling(path: Path) -> str:
    config = read_json(path)
    enabled = [name for key, name in _POOLING_KEYS.items() if config.get(key)]
    unsupported = [
        key
        for key, value in config.items()
        if key.startswith("pooling_mode_") and value and key not in _POOLING_KEYS
    ]
    if unsupported or len(enabled) != 1:
        raise ModelLoadError(
            f"{path}: exactly one of mean, cls or last-token pooling must be enabled "
            f"(found {enabled + unsupported})"
        )
    return enabled[0]


def max_positions(config: PretrainedConfig) -> int:
    return int(getattr(config, "max_position_embeddings", 512))


def load_weights(model_class: type[PreTrainedModel] | Any, folder: Path, device: DeviceSpec) -> Any:
    """Load a transformers model from the folder onto the device, in eval mode."""
    try:
        model: Any = model_class.from_pretrained(
            str(folder),
            local_files_only=True,
            dtype=device.dtype,
            attn_implementation="sdpa",
        )
    except Exception as exc:
        raise ModelLoadError(f"cannot load the weights in {folder}: {exc}") from exc
    model.to(device.device)
    model.eval()
    return model

"""Operator overrides for one served model (from the command line)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from embedserve.service.models.base import ModelLoadError


@dataclass(frozen=True)
class ModelOptions:
    folder: Path
    name: str
    # Each None keeps what the model folder says.
    max_input_tokens: int | None = None
    min_dimensions: int | None = None
    default_instruction: str | None = None
    pooling: str | None = None
    # BERT embedders: run the real tokens only (models/packed_bert.py).
    padding_free: bool = True

    def input_limit(self, natural: int) -> int:
        """The served max input tokens: the model's own limit, or a lower override."""
        if self.max_input_tokens is None:
            return natural
        if not 1 <= self.max_input_tokens <= natural:
            raise ModelLoadError(
                f"{self.name}: max input tokens {self.max_input_tokens} must be between 1 "
                f"and the model's limit of {natural}"
            )
        return self.max_input_tokens

    def dimension_floor(self, natural: int, dimensions: int) -> int:
        """The smallest MRL dimension served."""
        floor = natural if self.min_dimensions is None else self.min_dimensions
        if not 1 <= floor <= dimensions:
            raise ModelLoadError(
                f"{self.name}: min dimensions {floor} must be between 1 and {dimensions}"
            )
        return floor

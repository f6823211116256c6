"""Turn request messages into typed options, collecting every field violation at once."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from embedserve.service.api.errors import FieldViolation, invalid_argument
from embedserve.service.engine.work import Lane
from embedserve.service.inference import EmbeddingModel, Reranker
from embedserve.service.models.tokenization import Truncation
from embedserve.v1 import common_pb2, embed_service_pb2, rerank_service_pb2

_TRUNCATION: dict[int, Truncation] = {
    common_pb2.TRUNCATION_POLICY_ERROR: Truncation.ERROR,
    common_pb2.TRUNCATION_POLICY_END: Truncation.END,
    common_pb2.TRUNCATION_POLICY_START: Truncation.START,
}
_LANE: dict[int, Lane] = {
    common_pb2.PRIORITY_INTERACTIVE: Lane.INTERACTIVE,
    common_pb2.PRIORITY_BULK: Lane.BULK,
}


@dataclass(frozen=True)
class EmbedOptions:
    instruction: str | None  # None: embed as documents
    dimensions: int | None
    normalize: bool
    truncation: Truncation
    encoding: int
    lane: Lane


@dataclass(frozen=True)
class RerankOptions:
    instruction: str | None
    top_n: int | None
    truncation: Truncation
    lane: Lane


class _EnumType(Protocol):
    def values(self) -> list[Any]: ...
    def keys(self) -> list[str]: ...


class _Checks:
    def __init__(self) -> None:
        self.violations: list[FieldViolation] = []

    def fail(self, field: str, description: str) -> None:
        self.violations.append(FieldViolation(field, description))

    def enum(self, field: str, value: int, wrapper: _EnumType) -> bool:
        if value not in wrapper.values():
            names = ", ".join(wrapper.keys())
            self.fail(field, f"unknown value {value} (known: {names})")
            return False
        return True

    def texts(self, field: str, texts: Sequence[str], limit: int, what: str) -> None:
        if not texts:
            self.fail(field, f"must contain at least one {what}")
            return
        if len(texts) > limit:
            self.fail(field, f"{len(texts)} {what}s is more than the limit of {limit}")
        for index, text in enumerate(texts):
            if not text:
                self.fail(f"{field}[{index}]", "must not be empty")

    def raise_if_any(self) -> None:
        if self.violations:
            raise invalid_argument(self.violations)


def _truncation(checks: _Checks, field: str, value: int, default: Truncation) -> Truncation:
    if value == common_pb2.TRUNCATION_POLICY_UNSPECIFIED:
        return default
    checks.enum(field, value, common_pb2.TruncationPolicy)
    return _TRUNCATION.get(value, default)


def _lane(checks: _Checks, field: str, value: int, default: Lane) -> Lane:
    if value == common_pb2.PRIORITY_UNSPECIFIED:
        return default
    checks.enum(field, value, common_pb2.Priority)
    return _LANE.get(value, default)


def embed_options(
    request: embed_service_pb2.EmbedRequest,
    model: EmbeddingModel,
    *,
    default_truncation: Truncation,
    default_lane: Lane,
    max_inputs: int,
    prefix: str = "",
) -> EmbedOptions:
    """Validate an EmbedRequest against the model. ``prefix`` names fields inside a stream item."""
    checks = _Checks()
    adapter = model.adapter
    checks.texts(f"{prefix}inputs", request.inputs, max_inputs, "input")
    instruction: str | None = request.instruction if request.HasField("instruction") else None
    if checks.enum(f"{prefix}input_type", request.input_type, embed_service_pb2.InputType):
        if request.input_type == embed_service_pb2.INPUT_TYPE_QUERY and instruction is None:
            instruction = adapter.default_instruction
        elif (
            request.input_type == embed_service_pb2.INPUT_TYPE_DOCUMENT and instruction is not None
        ):
            checks.fail(
                f"{prefix}instruction", "must be unset when input_type is INPUT_TYPE_DOCUMENT"
            )
    dimensions: int | None = None
    if request.HasField("dimensions"):
        dimensions = request.dimensions
        low, high = adapter.min_dimensions, adapter.dimensions
        if not low <= dimensions <= high:
            allowed = f"{high}" if low == high else f"between {low} and {high}"
            checks.fail(
                f"{prefix}dimensions",
                f"{dimensions} is not allowed for {adapter.name}: must be {allowed}",
            )
    checks.enum(f"{prefix}encoding", request.encoding, common_pb2.Encoding)
    truncation = _truncation(checks, f"{prefix}truncation", request.truncation, default_truncation)
    lane = _lane(checks, f"{prefix}priority", request.priority, default_lane)
    checks.raise_if_any()
    return EmbedOptions(
        instruction=instruction,
        dimensions=dimensions,
        normalize=request.normalize if request.HasField("normalize") else True,
        truncation=truncation,
        encoding=request.encoding,
        lane=lane,
    )


def rerank_options(
    request: rerank_service_pb2.RerankRequest,
    model: Reranker,
    *,
    default_truncation: Truncation,
    max_inputs: int,
) -> RerankOptions:
    checks = _Checks()
    if not request.query:
        checks.fail("query", "must not be empty")
    checks.texts("documents", request.documents, max_inputs, "document")
    top_n: int | None = None
    if request.HasField("top_n"):
        top_n = request.top_n
        if top_n <= 0:
            checks.fail("top_n", f"must be positive when set (got {top_n}); leave it unset for all")
    instruction: str | None = request.instruction if request.HasField("instruction") else None
    if instruction is not None and not model.accepts_instruction:
        checks.fail("instruction", f"{model.name} ({model.family}) does not take an instruction")
    truncation = _truncation(checks, "truncation", request.truncation, default_truncation)
    lane = _lane(checks, "priority", request.priority, Lane.INTERACTIVE)
    checks.raise_if_any()
    return RerankOptions(instruction=instruction, top_n=top_n, truncation=truncation, lane=lane)

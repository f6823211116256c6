"""Errors are part of the API: precise codes, messages that name the field, and
``google.rpc.Status`` details (BadRequest, RetryInfo, ErrorInfo) in the trailers."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2

from embedserve.service.engine.errors import (
    DeadlineExpired,
    EngineError,
    ForwardFailed,
    NotReady,
    Overloaded,
)
from embedserve.service.registry import UnknownModel

DOMAIN = "embedserve"
STATUS_DETAILS_KEY = "grpc-status-details-bin"


@dataclass(frozen=True)
class FieldViolation:
    field: str
    description: str


class ApiError(Exception):
    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        *,
        reason: str,
        violations: Sequence[FieldViolation] = (),
        retry_after_s: float | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = reason
        self.violations = tuple(violations)
        self.retry_after_s = retry_after_s
        self.metadata = dict(metadata or {})

    def to_status(self) -> status_pb2.Status:
        details: list[any_pb2.Any] = []
        info = error_details_pb2.ErrorInfo(
            reason=self.reason, domain=DOMAIN, metadata=self.metadata
        )
        details.append(_pack(info))
        if self.violations:
            bad = error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(
                        field=v.field, description=v.description
                    )
                    for v in self.violations
                ]
            )
            details.append(_pack(bad))
        if self.retry_after_s is not None:
            delay = duration_pb2.Duration()
            delay.FromNanoseconds(int(self.retry_after_s * 1e9))
            details.append(_pack(error_details_pb2.RetryInfo(retry_delay=delay)))
        return status_pb2.Status(code=self.code.value[0], message=self.message, details=details)

    def trailing_metadata(self) -> tuple[tuple[str, bytes], ...]:
        return ((STATUS_DETAILS_KEY, self.to_status().SerializeToString()),)


def _pack(message: object) -> any_pb2.Any:
    packed = any_pb2.Any()
    # Deterministic: ErrorInfo's metadata map must not change order between processes.
    packed.Pack(message, deterministic=True)  # type: ignore[arg-type]
    return packed


def invalid_argument(violations: Sequence[FieldViolation]) -> ApiError:
    message = "; ".join(f"{v.field}: {v.description}" for v in violations)
    return ApiError(
        grpc.StatusCode.INVALID_ARGUMENT, message, reason="INVALID_ARGUMENT", violations=violations
    )


def unavailable(message: str, reason: str) -> ApiError:
    return ApiError(grpc.StatusCode.UNAVAILABLE, message, reason=reason, retry_after_s=0.0)


def overloaded(
    message: str, retry_after_s: float, metadata: Mapping[str, str] | None = None
) -> ApiError:
    """Refused for load, before any work: retryable after ``retry_after_s``."""
    return ApiError(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        message,
        reason="OVERLOADED",
        retry_after_s=retry_after_s,
        metadata=metadata,
    )


def model_not_found(exc: UnknownModel, field: str) -> ApiError:
    return ApiError(
        grpc.StatusCode.NOT_FOUND,
        str(exc),
        reason="MODEL_NOT_FOUND",
        violations=[FieldViolation(field, str(exc))],
    )


def translate(exc: Exception) -> ApiError | None:
    """The API error for a known failure below the transport; None for a bug."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, UnknownModel):
        return model_not_found(exc, "model")
    if isinstance(exc, Overloaded):
        return overloaded(str(exc), exc.retry_after_s)
    if isinstance(exc, DeadlineExpired):
        return ApiError(grpc.StatusCode.DEADLINE_EXCEEDED, str(exc), reason="DEADLINE_EXCEEDED")
    if isinstance(exc, NotReady):
        return unavailable(str(exc), "NOT_READY")
    if isinstance(exc, ForwardFailed):
        return ApiError(grpc.StatusCode.INTERNAL, str(exc), reason="FORWARD_FAILED")
    if isinstance(exc, EngineError):
        return ApiError(grpc.StatusCode.INTERNAL, str(exc), reason="ENGINE_ERROR")
    return None

"""One small exception hierarchy for every failure the client reports.

Each carries the gRPC code, the server's message, and the details the server sent in
``google.rpc.Status``: the field violations, a reason with its domain and metadata, and a
retry hint.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import grpc
from google.rpc import error_details_pb2, status_pb2


@dataclass(frozen=True)
class FieldViolation:
    field: str
    description: str


class EmbedServeError(Exception):
    """Base class: ``code``, ``message``, ``violations``, ``reason``, ``retry_after``.

    ``reason``, ``domain`` and ``metadata`` come from the status's ``ErrorInfo``: e.g.
    ``OVERLOADED`` from ``embedserve`` with ``{"limit": "max_calls_in_flight",
    "max_calls_in_flight": "64"}`` when a replica's call limit refused the call.
    """

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        *,
        violations: tuple[FieldViolation, ...] = (),
        reason: str = "",
        retry_after: float | None = None,
        domain: str = "",
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.violations = violations
        self.reason = reason
        self.retry_after = retry_after
        self.domain = domain
        self.metadata: Mapping[str, str] = dict(metadata or {})

    def __reduce__(self) -> tuple[Any, ...]:
        # Exceptions copy and pickle through their args, which here is only the text.
        return (
            _rebuild,
            (
                type(self),
                self.code,
                self.message,
                {
                    "violations": self.violations,
                    "reason": self.reason,
                    "retry_after": self.retry_after,
                    "domain": self.domain,
                    "metadata": dict(self.metadata),
                },
            ),
        )


def _rebuild(
    cls: type[EmbedServeError], code: grpc.StatusCode, message: str, fields: dict[str, Any]
) -> EmbedServeError:
    return cls(code, message, **fields)


class InvalidArgumentError(EmbedServeError):
    """The request is wrong; ``violations`` name the fields. Never retried."""


class NotFoundError(EmbedServeError):
    """The model named in the request is not served."""


class OverloadedError(EmbedServeError):
    """RESOURCE_EXHAUSTED: the replica's queue is full. Retried."""


class UnavailableError(EmbedServeError):
    """UNAVAILABLE: unreachable, warming up or draining. Retried."""


class DeadlineExceededError(EmbedServeError):
    """The call's deadline passed (retries included).

    When the deadline cut a retry short, ``__cause__`` is the error that was being retried.
    """


class UnauthenticatedError(EmbedServeError):
    """UNAUTHENTICATED or PERMISSION_DENIED: check the credentials."""


class ServerError(EmbedServeError):
    """Any other code (INTERNAL, UNKNOWN, ...): a server-side problem."""


class BulkItemError(EmbedServeError):
    """One input of ``embed_bulk`` failed; ``index`` is its position in the input."""

    def __init__(self, index: int, cause: EmbedServeError) -> None:
        super().__init__(
            cause.code,
            f"input {index}: {cause.message}",
            violations=cause.violations,
            reason=cause.reason,
            retry_after=cause.retry_after,
            domain=cause.domain,
            metadata=cause.metadata,
        )
        self.index = index
        self.cause = cause


_BY_CODE: dict[grpc.StatusCode, type[EmbedServeError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.OUT_OF_RANGE: InvalidArgumentError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: OverloadedError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
    grpc.StatusCode.PERMISSION_DENIED: UnauthenticatedError,
}
_CODE_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}


def from_status(status: status_pb2.Status) -> EmbedServeError:
    """The exception for a ``google.rpc.Status`` (a trailer, or a stream item's error)."""
    code = _CODE_BY_NUMBER.get(status.code, grpc.StatusCode.UNKNOWN)
    violations: list[FieldViolation] = []
    reason = domain = ""
    metadata: dict[str, str] = {}
    retry_after: float | None = None
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            violations += [FieldViolation(v.field, v.description) for v in bad.field_violations]
        elif detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason, domain, metadata = info.reason, info.domain, dict(info.metadata)
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
            retry_after = retry.retry_delay.ToNanoseconds() / 1e9
    error_class = _BY_CODE.get(code, ServerError)
    return error_class(
        code,
        status.message,
        violations=tuple(violations),
        reason=reason,
        retry_after=retry_after,
        domain=domain,
        metadata=metadata,
    )


def from_rpc_error(error: grpc.RpcError) -> EmbedServeError:
    """The exception for a failed call, reading the status details from its trailers."""
    code: grpc.StatusCode = error.code()
    details: str = error.details() or ""
    trailers: Any = error.trailing_metadata() or ()
    for key, value in trailers:
        if key == "grpc-status-details-bin" and isinstance(value, bytes):
            status = status_pb2.Status.FromString(value)
            if status.code == code.value[0]:
                return from_status(status)
    return _BY_CODE.get(code, ServerError)(code, details)

"""What every RPC shares: the lifecycle gate, deadlines and error translation."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

import grpc

from embedserve.service import faults
from embedserve.service.api.errors import (
    ApiError,
    FieldViolation,
    invalid_argument,
    translate,
    unavailable,
)
from embedserve.service.lifecycle import Lifecycle, Phase
from embedserve.service.models.tokenization import InputTooLongError

log = logging.getLogger(__name__)
T = TypeVar("T")

if TYPE_CHECKING:
    Context = grpc.aio.ServicerContext[Any, Any]
else:
    Context = grpc.aio.ServicerContext


def absolute_deadline(context: Context) -> float | None:
    remaining = context.time_remaining()
    if remaining is None:
        return None
    return asyncio.get_running_loop().time() + remaining


def refusal(lifecycle: Lifecycle) -> ApiError | None:
    """Why a new call is refused now, if it is: warming up or draining (both retryable)."""
    if lifecycle.accepting:
        return None
    if lifecycle.phase is Phase.STARTING:
        return unavailable("the server is warming up", "WARMING_UP")
    return unavailable("the server is draining; retry on another replica", "DRAINING")


def unavailable_draining() -> ApiError:
    return unavailable(
        "the server is draining; resend the unanswered items to another replica", "DRAINING"
    )


def api_error(exc: Exception) -> ApiError:
    error = translate(exc)
    if error is None:
        log.exception("unexpected error while serving a call")
        error = ApiError(
            grpc.StatusCode.INTERNAL, "internal error; see the server log", reason="INTERNAL"
        )
    return error


def too_long(exc: InputTooLongError, list_field: str, fixed_field: str) -> ApiError:
    field = fixed_field if exc.index is None else f"{list_field}[{exc.index}]"
    return invalid_argument(
        [
            FieldViolation(
                field,
                f"{exc.tokens} tokens, more than the limit of {exc.limit}; shorten it or use "
                "TRUNCATION_POLICY_END or TRUNCATION_POLICY_START",
            )
        ]
    )


async def abort(context: Context, error: ApiError) -> None:
    # Called before any metadata or message is sent, so the status travels in the
    # headers (trailers-only) and a proxy can act on it.
    await context.abort(error.code, error.message, trailing_metadata=error.trailing_metadata())


async def unary(
    lifecycle: Lifecycle,
    context: Context,
    handler: Callable[[], Awaitable[T]],
) -> T:
    refused = refusal(lifecycle)
    if refused is not None:
        await abort(context, refused)
    lifecycle.enter()
    try:
        if (fault := await faults.before_call()) is not None:  # test-only hooks; off by default
            raise fault
        return await handler()
    except Exception as exc:
        await abort(context, api_error(exc))
        raise AssertionError("unreachable: abort raises") from exc
    finally:
        lifecycle.leave()

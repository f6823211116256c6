"""Test-only fault hooks: a slow replica, a replica that refuses every call.

They exist for the proxy tests (Envoy's balancing, retries and outlier ejection against real
replicas) and are off unless the environment says ``EMBEDSERVE_FAULT_HOOKS=1``. A fault
variable set without it stops the server at boot, so a stray variable in a production
environment can never slow or break a replica silently.

- ``EMBEDSERVE_FAULT_DELAY_MS``: sleep this long before handling each Embed/Rerank call (and
  before opening each EmbedStream): a slow replica.
- ``EMBEDSERVE_FAULT_UNAVAILABLE=1``: answer every Embed/Rerank call (and every EmbedStream at
  open) with ``UNAVAILABLE``, trailers-only, before anything is sent: a failing replica whose
  health check still says SERVING.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass

from embedserve.service.api.errors import ApiError, unavailable

log = logging.getLogger(__name__)

ENABLE = "EMBEDSERVE_FAULT_HOOKS"
DELAY_MS = "EMBEDSERVE_FAULT_DELAY_MS"
UNAVAILABLE = "EMBEDSERVE_FAULT_UNAVAILABLE"
FAULT_VARIABLES = (DELAY_MS, UNAVAILABLE)


@dataclass(frozen=True)
class Faults:
    delay_s: float = 0.0
    unavailable: bool = False


def from_environ(environ: Mapping[str, str]) -> Faults | None:
    """The faults the environment asks for; None when the hooks are off.

    Raises ValueError for a fault variable without ``EMBEDSERVE_FAULT_HOOKS=1``, or a bad value.
    """
    present = [name for name in FAULT_VARIABLES if environ.get(name, "").strip()]
    if environ.get(ENABLE, "").strip() != "1":
        if present:
            raise ValueError(
                f"{', '.join(present)} is a test-only fault hook and is refused unless "
                f"{ENABLE}=1 is set; remove it from the environment"
            )
        return None
    raw_delay = environ.get(DELAY_MS, "").strip() or "0"
    try:
        delay_ms = int(raw_delay)
    except ValueError:
        raise ValueError(f"{DELAY_MS}={raw_delay!r}: expected whole milliseconds") from None
    if delay_ms < 0:
        raise ValueError(f"{DELAY_MS}={raw_delay!r}: must not be negative")
    raw_unavailable = environ.get(UNAVAILABLE, "").strip().lower() or "0"
    if raw_unavailable not in {"0", "1", "true", "false"}:
        raise ValueError(f"{UNAVAILABLE}={raw_unavailable!r}: expected 1 or 0")
    return Faults(delay_s=delay_ms / 1000.0, unavailable=raw_unavailable in {"1", "true"})


_active: Faults | None = None


def configure(environ: Mapping[str, str] | None = None) -> Faults | None:
    """Read the hooks once, at boot (raises ValueError as ``from_environ`` does)."""
    global _active
    _active = from_environ(os.environ if environ is None else environ)
    if _active is not None:
        log.warning(
            "test-only fault hooks are on",
            extra={
                "fault_delay_ms": round(_active.delay_s * 1000),
                "fault_unavailable": _active.unavailable,
            },
        )
    return _active


async def before_call() -> ApiError | None:
    """Run before a call is handled: sleeps for a slow replica, and returns the error a failing
    replica answers with. A no-op (None at once) unless the hooks are on."""
    faults = _active
    if faults is None:
        return None
    if faults.delay_s > 0:
        await asyncio.sleep(faults.delay_s)
    if faults.unavailable:
        return unavailable("fault hook: this replica refuses every call", "FAULT_INJECTED")
    return None

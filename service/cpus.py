"""How many CPUs this process may really use: its affinity, capped by a cgroup CPU quota.

In a container limited to 1 CPU on a 2-core node, ``sched_getaffinity`` still says 2; torch
threads sized from it oversubscribe the quota and slow every forward pass (measured 4-6x
under contention, docs/benchmarks.md). The default ``--threads`` follows this instead.
"""

from __future__ import annotations

import math
import os
from pathlib import Path


def cgroup_cpu_limit(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """CPUs allowed by the cgroup quota (v2 ``cpu.max`` or v1 CFS files); None without one."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota_us = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((root / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota_us / period_us if quota_us > 0 and period_us > 0 else None


def has_amx_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether the CPU multiplies bfloat16 matrices in hardware (Intel AMX): there bfloat16
    weights are faster than float32, where elsewhere they are several times slower."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return False
    return any(
        line.startswith("flags") and "amx_bf16" in line.split() for line in text.splitlines()
    )


def available_cpus(root: Path = Path("/sys/fs/cgroup")) -> int:
    cpus = len(os.sched_getaffinity(0))
    limit = cgroup_cpu_limit(root)
    if limit is not None:
        cpus = min(cpus, max(1, math.ceil(limit)))
    return cpus

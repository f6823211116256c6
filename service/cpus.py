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


# CPU flags of hardware bfloat16 matrix multiplication, the fastest first. With either,
# bfloat16 weights ran faster than float32 here (docs/benchmarks.md: 1.65x the calls on an
# Intel CPU with AMX, 2.06x on an AMD EPYC with AVX512-BF16); without them, several times
# slower.
BF16_MATMUL_FLAGS = ("amx_bf16", "avx512_bf16")


def bf16_matmul_flag(cpuinfo: Path = Path("/proc/cpuinfo")) -> str | None:
    """The flag by which this CPU multiplies bfloat16 matrices in hardware, or None."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return None
    flags: set[str] = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.partition(":")[2].split())
    return next((flag for flag in BF16_MATMUL_FLAGS if flag in flags), None)


def available_cpus(root: Path = Path("/sys/fs/cgroup")) -> int:
    cpus = len(os.sched_getaffinity(0))
    limit = cgroup_cpu_limit(root)
    if limit is not None:
        cpus = min(cpus, max(1, math.ceil(limit)))
    return cpus

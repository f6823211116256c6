"""The default thread count follows the CPUs the process may really use."""

from __future__ import annotations

import os
import threading
from pathlib import Path

from harness import serving

from embedserve.service.cpus import available_cpus, bf16_matmul_flag, cgroup_cpu_limit


def test_cgroup_v2_quota(tmp_path: Path) -> None:
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert cgroup_cpu_limit(tmp_path) == 1.5
    assert available_cpus(tmp_path) == min(len(os.sched_getaffinity(0)), 2)
    (tmp_path / "cpu.max").write_text("50000 100000\n")
    assert available_cpus(tmp_path) == 1  # never below one


def test_no_quota_means_affinity(tmp_path: Path) -> None:
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_limit(tmp_path) is None
    assert available_cpus(tmp_path) == len(os.sched_getaffinity(0))
    assert cgroup_cpu_limit(tmp_path / "missing") is None


def test_cgroup_v1_quota(tmp_path: Path) -> None:
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("100000\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_cpu_limit(tmp_path) == 1.0
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert cgroup_cpu_limit(tmp_path) is None


def _nice_of(task: str) -> int:
    # Field 19 of /proc/PID/task/TID/stat; the command name (field 2) may hold spaces.
    stat = Path(f"/proc/self/task/{task}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[16])


def test_hardware_bfloat16_matmul_is_read_from_the_cpu_flags(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_vnni\n")
    assert bf16_matmul_flag(cpuinfo) is None  # AVX-512 without its BF16 dot products
    # AVX512-BF16's dot products (VDPBF16PS): bfloat16 ran 1.96x float32's calls on an EPYC.
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx512f avx512_bf16\n")
    assert bf16_matmul_flag(cpuinfo) == "avx512_bf16"
    # AMX's tiles come first where a CPU has both.
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx512_bf16 amx_bf16 amx_tile\n")
    assert bf16_matmul_flag(cpuinfo) == "amx_bf16"
    # A flag of the same prefix is not the flag, and a model name is not a flag line.
    cpuinfo.write_text("model name\t: amx_bf16 avx512_bf16\nflags\t\t: fpu amx_bf16x\n")
    assert bf16_matmul_flag(cpuinfo) is None
    assert bf16_matmul_flag(tmp_path / "missing") is None


def test_forward_thread_and_its_torch_workers_run_nicer(qwen3_embedding_folder: Path) -> None:
    base = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    wanted = min(19, base + 7)
    others_before = {t for t in os.listdir("/proc/self/task") if _nice_of(t) == wanted}
    with serving(model=qwen3_embedding_folder, forward_nice=7, threads=2) as server:
        (engine,) = server.engines
        workers = engine.workers.native_ids()
        # The parallel worker, and the engine's own two: two batches at once for two threads.
        assert len(workers) == 3
        assert all(_nice_of(str(worker)) == wanted for worker in workers)
        niced = {t for t in os.listdir("/proc/self/task") if _nice_of(t) == wanted}
        # The warm-up ran a forward pass with 2 torch threads on the first worker: its
        # OpenMP worker was started by that worker and inherited the nice value.
        assert len(niced - others_before) >= 3
        assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == base
        assert server.call(lambda: engine.drain_rate.tokens_per_s) is not None

"""How a rank's process runs on a CPU: how many compute threads it takes, and a malloc that keeps the memory
it frees for the next step."""

from __future__ import annotations

import ctypes
import os

import torch

from worker.engine.config import EngineConfig

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def setup_cpu_rank(config: EngineConfig) -> None:
    """Once, before a CPU rank builds its model; a GPU rank's process is left as it is."""
    if config.device.startswith("cuda"):
        return
    share_cores(config)
    keep_freed_memory()


def share_cores(config: EngineConfig) -> None:
    """A CPU rank's compute threads: `cpu_threads` where set; else one rank keeps torch's default (every
    core, or OMP_NUM_THREADS), and several, which compute at once, each take an equal share of the cores
    less one (`leave_a_core`): compute threads that outnumber the cores wait on each other's time slices,
    and every collective then waits for the slowest rank."""
    if config.device.startswith("cuda"):
        return
    if config.cpu_threads:
        torch.set_num_threads(config.cpu_threads)
    elif config.tensor_parallel_size > 1:
        leave_a_core(config.tensor_parallel_size)


def leave_a_core(ranks: int) -> None:
    """This process's compute threads: an equal share, among `ranks` processes computing at once, of the
    cores less one (left to rank 0's host work), never more than it has now."""
    share = ((os.cpu_count() or 1) - 1) // ranks
    torch.set_num_threads(max(1, min(torch.get_num_threads(), share)))


def keep_freed_memory() -> bool:
    """glibc's malloc keeps freed blocks of up to 32 MiB in the heap, and the heap's free top, for reuse.

    A step's activations (a prefill chunk's MLP output is tens of MiB) would otherwise each be a fresh
    mmap, freed back to the kernel, whose pages fault in again, zeroed, at the next step: that doubled the
    time of a prefill's largest matmuls (docs/BENCHMARKS.md). The cost is that the process keeps its peak
    heap. False where the C library has no mallopt (not glibc)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, 32 << 20)) and bool(mallopt(_M_TRIM_THRESHOLD, 1 << 30))

"""The kernels a process runs the model with, from the engine's config: set in every process that runs the
model (rank 0 and each other rank), before its model loads, since loading may run kernels (FP8)."""

from __future__ import annotations

from tokenq_kernels.dispatch import set_triton_enabled
from tokenq_kernels.gemv import set_gemv_enabled
from tokenq_kernels.pdl import set_pdl_enabled
from worker.engine.config import EngineConfig


def select_kernels(config: EngineConfig) -> None:
    set_triton_enabled(config.kernels == "triton")
    set_gemv_enabled(config.gemv == "triton")
    set_pdl_enabled(config.pdl)

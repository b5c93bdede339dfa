"""Engine settings, resolved once at start-up (never per step)."""

from __future__ import annotations

from dataclasses import dataclass


class ConfigError(ValueError):
    """A setting out of its range: `field` names it, `reason` says what it must be."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field} {reason}")
        self.field = field
        self.reason = reason


@dataclass
class EngineConfig:
    block_size: int = 16
    num_kv_blocks: int | None = None  # None: sized from kv_cache_memory_gb (CPU) or by profiling (CUDA)
    kv_cache_memory_gb: float = 2.0  # CPU budget for the KV cache when num_kv_blocks is None
    gpu_memory_utilization: float = 0.9  # share of the GPU's memory the engine may use, KV cache included
    max_num_seqs: int = 256  # sequences the scheduler may run at once
    max_num_batched_tokens: int = 2048  # the one token budget of a step: decodes + prefill chunks
    # Requests of a better priority that intake may pull at once while worse ones fill every slot (each
    # preempts one of them): an interactive request starts at once however much batch work runs.
    priority_headroom: int = 8
    # The latency guard: while requests of several priorities are in the engine, and for this many seconds
    # after, better-priority arrivals are likely, so each step is launched only once the one before it has
    # ended on the device (an arrival then waits for the step in flight alone, not also for one queued behind
    # it), and worse-priority prefill chunks share `guarded_prefill_tokens` a step (so no step is long).
    # 0 turns the guard off.
    latency_guard_s: float = 1.0
    guarded_prefill_tokens: int = 1024
    max_model_len: int | None = None  # None: the model's own context length
    enable_prefix_caching: bool = True
    dtype: str = "float32"  # "float32" | "bfloat16" | "float16"
    quantization: str | None = None  # "fp8": W8A8 linear layers (a checkpoint in FP8 is read as FP8 anyway)
    kv_cache_dtype: str = "auto"  # "auto": the model's dtype; "fp8": e4m3, twice the tokens in the same memory
    device: str = "cpu"
    tensor_parallel_size: int = 1  # ranks, one process (and one GPU) each; rank 0 is the engine's own
    # None: CUDA graphs for decode steps on CUDA, plain eager on CPU. False on a CPU runs the same padded
    # decode batches without capturing them (how the padding is tested without a GPU).
    enforce_eager: bool | None = None
    # With decode graphs, also graphs for a step that is one prefill chunk alone (a lone request's prefill).
    prefill_graphs: bool = True
    # "triton": our Triton kernels on CUDA (where triton imports); "torch": the torch references everywhere.
    kernels: str = "triton"
    # "triton": our GEMV for one-row matmuls on CUDA; "cublas": F.linear for them too.
    gemv: str = "triton"
    # Our kernels launch with programmatic dependent launch where the GPU has it (tokenq_kernels/pdl.py).
    pdl: bool = True
    # A CPU rank's compute threads. None: torch's default (every core, or OMP_NUM_THREADS) for one rank, an
    # equal share of the cores less one for each of several.
    cpu_threads: int | None = None

    def __post_init__(self) -> None:
        """Every setting in its range, so that a bad one stops the start with its name, not a worker that
        never schedules (max_num_seqs 0) or refuses every request (max_model_len 0)."""
        choices = {"kernels": ("triton", "torch"), "gemv": ("triton", "cublas"),
                   "dtype": ("float32", "bfloat16", "float16"), "kv_cache_dtype": ("auto", "fp8"),
                   "quantization": (None, "fp8")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                shown = " or ".join(str(a) for a in allowed)
                raise ConfigError(name, f"must be {shown}, got {getattr(self, name)!r}")
        if self.device != "cpu" and not self.device.startswith("cuda"):
            raise ConfigError("device", f"must be cpu or cuda (or cuda:N), got {self.device!r}")
        at_least = {"block_size": 1, "num_kv_blocks": 1, "max_num_seqs": 1, "max_num_batched_tokens": 1,
                    "max_model_len": 1, "tensor_parallel_size": 1, "priority_headroom": 0,
                    "latency_guard_s": 0, "guarded_prefill_tokens": 1, "cpu_threads": 1}
        for name, least in at_least.items():
            value = getattr(self, name)
            if value is not None and not value >= least:
                raise ConfigError(name, f"must be at least {least}, got {value}")
        if not self.kv_cache_memory_gb > 0:
            raise ConfigError("kv_cache_memory_gb", f"must be more than 0, got {self.kv_cache_memory_gb}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ConfigError("gpu_memory_utilization", f"must be more than 0 and at most 1, got "
                                                        f"{self.gpu_memory_utilization}")

    def rank_device(self, rank: int) -> str:
        """The device of a rank: cuda:<rank> among the visible GPUs under tensor parallelism."""
        if self.tensor_parallel_size > 1 and self.device.startswith("cuda"):
            return f"cuda:{rank}"
        return self.device

    def use_decode_graphs(self) -> bool:
        if self.enforce_eager is None:
            return self.device.startswith("cuda")
        return not self.enforce_eager

"""The engine's options as command-line flags, and the EngineConfig they make: one home for the worker,
`tokenq up` and the benchmarks that start engines or workers."""

from __future__ import annotations

import argparse

from tokenq.flag_checks import OptionError, require_cuda_if_asked


def add_engine_flags(p: argparse.ArgumentParser, *, device: str = "cpu") -> None:
    """device: the default of --device (the benchmarks that start workers take auto: cuda when present)."""
    choices = "auto (cuda when present), cpu or cuda" if device == "auto" else "cpu or cuda"
    p.add_argument("--device", default=device, help=f"{choices} (default {device})")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: float32 on CPU, "
                                                  "bfloat16 on CUDA)")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--kv-cache-gb", type=float, default=2.0, help="KV cache size on CPU")
    p.add_argument("--no-prefix-caching", action="store_true")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                   help="share of the GPU's memory for weights, activations and the KV cache")
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs (decode steps, lone prefills)")
    p.add_argument("--no-prefill-graphs", action="store_true",
                   help="CUDA graphs for decode steps only: a prefill chunk alone runs eagerly")
    p.add_argument("--cpu-threads", type=int, default=None,
                   help="compute threads of the engine (of each rank) on a CPU (default: every core, or "
                        "OMP_NUM_THREADS; with --tensor-parallel-size N, each rank an equal share less one)")
    p.add_argument("--latency-guard-s", type=float, default=1.0,
                   help="while requests of several priorities run, and this many seconds after, launch each step "
                        "only after the last one ends and keep batch prefill chunks short, so an interactive "
                        "arrival waits for one short step (default 1; 0 turns it off)")
    p.add_argument("--guarded-prefill-tokens", type=int, default=1024,
                   help="prefill tokens a step gives worse-priority work while the latency guard holds")
    add_quantization_flags(p)
    add_tensor_parallel_flag(p)


def add_tensor_parallel_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                   help="ranks (one process and one GPU each) the model is split over (default 1)")


def add_quantization_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quantization", choices=["fp8"], default=None,
                   help="fp8: FP8 weights (a scale per output channel) and per-token FP8 activations; a 16/32-bit "
                        "checkpoint is quantized while it loads (an FP8 checkpoint is read as FP8 without this)")
    p.add_argument("--kv-cache-dtype", choices=["auto", "fp8"], default="auto",
                   help="fp8: the KV cache in e4m3 with a scale per layer, twice the tokens in the same memory")


def engine_flags_argv(args: argparse.Namespace) -> list[str]:
    """The engine flags of args as a command line, for a `tokenq worker` child with the same settings."""
    argv = ["--device", args.device, "--max-num-seqs", str(args.max_num_seqs),
            "--max-num-batched-tokens", str(args.max_num_batched_tokens), "--block-size", str(args.block_size),
            "--kv-cache-gb", str(args.kv_cache_gb), "--gpu-memory-utilization", str(args.gpu_memory_utilization)]
    argv += ["--dtype", args.dtype] if args.dtype else []
    argv += ["--max-model-len", str(args.max_model_len)] if args.max_model_len else []
    argv += ["--no-prefix-caching"] if args.no_prefix_caching else []
    argv += ["--no-prefill-graphs"] if args.no_prefill_graphs else []
    argv += ["--quantization", args.quantization] if args.quantization else []
    argv += ["--kv-cache-dtype", args.kv_cache_dtype]
    argv += ["--tensor-parallel-size", str(args.tensor_parallel_size)]
    argv += ["--cpu-threads", str(args.cpu_threads)] if args.cpu_threads else []
    argv += ["--latency-guard-s", str(args.latency_guard_s), "--guarded-prefill-tokens",
             str(args.guarded_prefill_tokens)]
    return argv + (["--enforce-eager"] if args.enforce_eager else [])


def kernel_choices() -> dict[str, str | bool]:
    """EngineConfig's kernel fields (kernels, gemv, pdl) from the environment (TOKENQ_KERNELS, TOKENQ_GEMV,
    TOKENQ_PDL)."""
    from tokenq.settings import Settings

    settings = Settings.from_env()
    return {"kernels": settings.kernels, "gemv": settings.gemv, "pdl": settings.pdl}


# EngineConfig's fields by the flag that sets them (where the two names differ beyond - and _).
_FLAG_OF = {"kv_cache_memory_gb": "--kv-cache-gb"}


def engine_config_from(args: argparse.Namespace):  # -> EngineConfig (import kept lazy: torch is heavy)
    """The engine's config from the flags, and its kernel choices from the environment; OptionError names
    the flag whose value is out of range, or a CUDA device that this machine's torch does not see."""
    from worker.engine.config import ConfigError

    require_cuda_if_asked(args.device)
    try:
        return _engine_config(args)
    except ConfigError as e:
        raise flag_error(e) from None


def flag_error(e) -> OptionError:  # e: ConfigError
    """The engine's ConfigError said with the flag that sets its field."""
    flag = _FLAG_OF.get(e.field, "--" + e.field.replace("_", "-"))
    return OptionError(f"{flag} {e.reason}")


def _engine_config(args: argparse.Namespace):  # -> EngineConfig
    from worker.engine.config import EngineConfig

    dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    return EngineConfig(
        block_size=args.block_size, kv_cache_memory_gb=args.kv_cache_gb, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=args.max_model_len,
        enable_prefix_caching=not args.no_prefix_caching, dtype=dtype, device=args.device,
        gpu_memory_utilization=args.gpu_memory_utilization, enforce_eager=True if args.enforce_eager else None,
        prefill_graphs=not args.no_prefill_graphs, quantization=args.quantization,
        kv_cache_dtype=args.kv_cache_dtype, tensor_parallel_size=args.tensor_parallel_size,
        cpu_threads=args.cpu_threads, latency_guard_s=args.latency_guard_s,
        guarded_prefill_tokens=args.guarded_prefill_tokens, **kernel_choices(),
    )

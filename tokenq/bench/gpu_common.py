"""What the random-weight benchmarks share: flags, a model of a named shape, an engine around it, random
prompts, timed runs that record when each request got its first and last token, and the transformers peer.

torch is imported inside functions, so `tokenq --help` stays fast.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def add_flags(p: argparse.ArgumentParser, *, max_num_seqs: int, max_num_batched_tokens: int) -> None:
    """Flags of every random-weight benchmark; defaults differ per benchmark where the workload does."""
    from tokenq.flag_checks import MODEL_SHAPES, bench_device, count, natural, number, show_defaults

    p.add_argument("--model-shape", choices=MODEL_SHAPES, metavar="SHAPE", default="llama3-8b",
                   help="llama3-8b, llama3-70b (with --quantization fp8 on one H200), small or tiny (CPU smoke test)")
    p.add_argument("--device", type=bench_device, default="auto",
                   help="auto (cuda when present), cpu, cuda or cuda:N (default auto)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="default bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--seed", type=natural, default=0)
    p.add_argument("--max-num-seqs", type=count, default=max_num_seqs)
    p.add_argument("--max-num-batched-tokens", type=count, default=max_num_batched_tokens)
    p.add_argument("--max-model-len", type=count, default=None, help="default: what the workload needs")
    p.add_argument("--block-size", type=count, default=16)
    p.add_argument("--gpu-memory-utilization", type=number(above=0, at_most=1), default=0.9)
    p.add_argument("--num-kv-blocks", type=count, default=None,
                   help="default: profiled on CUDA, enough for the whole workload on CPU")
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    p.add_argument("--no-prefill-graphs", action="store_true", help="CUDA graphs for decode steps only")
    p.add_argument("--gemv", choices=["triton", "cublas"], default="triton",
                   help="matmuls at decode batch sizes: our Triton GEMV where it is faster, or always cuBLAS")
    from tokenq.engine_options import add_quantization_flags

    add_quantization_flags(p)
    show_defaults(p)


def standalone(configure: Callable[[argparse.ArgumentParser], argparse.ArgumentParser],
               main: Callable[[argparse.Namespace], int]) -> None:
    """`python -m tokenq.bench.NAME ...`: the benchmark alone, where only torch and transformers exist."""
    from tokenq.bench.launch import launch
    from tokenq.flag_checks import OptionError

    parser = configure(argparse.ArgumentParser(description=sys.modules["__main__"].__doc__))
    args = parser.parse_args()
    try:
        sys.exit(launch(Path(sys.argv[0]).stem, main, args))
    except OptionError as e:
        sys.exit(f"error: {e}")


@dataclass
class Setup:
    """A random model on its device and the engine settings for it."""

    shape: str
    config: dict[str, Any]  # Hugging Face style
    model: Any  # worker.models.llama.LlamaForCausalLM
    model_cfg: Any  # worker.models.config.ModelConfig
    device: str
    dtype: str
    seconds_to_build: float


def resolve_device(name: str) -> str:
    import torch

    from tokenq.flag_checks import require_cuda_if_asked

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    require_cuda_if_asked(name)
    return name


def build_model(args: argparse.Namespace) -> Setup:
    import torch

    from worker.engine.config import EngineConfig
    from worker.engine.kernel_choice import select_kernels
    from worker.engine.llm_engine import DTYPES
    from worker.models.random_weights import random_model, shape_config

    select_kernels(EngineConfig(**kernel_options(args)))  # before the model is built: FP8 quantizes it
    if args.quantization and not getattr(args, "skip_peer", True):
        print("--quantization: no transformers peer (it would run other weights); the 16-bit run of this "
              "command is the reference")
        args.skip_peer = True
    device = resolve_device(args.device)
    dtype = args.dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    config = shape_config(args.model_shape)
    t0 = time.perf_counter()
    model, model_cfg = random_model(config, DTYPES[dtype], device, seed=args.seed, quantization=args.quantization)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return Setup(args.model_shape, config, model, model_cfg, device, dtype, time.perf_counter() - t0)


def kernel_options(args: argparse.Namespace) -> dict[str, str]:
    """The kernels from the environment (TOKENQ_KERNELS); the GEMV from --gemv, for A/B runs."""
    from tokenq.engine_options import kernel_choices

    return {**kernel_choices(), "gemv": args.gemv}


def engine_config(args: argparse.Namespace, setup: Setup, max_model_len: int, kv_tokens: int, **overrides: Any):
    """EngineConfig for a workload of at most max_model_len tokens a sequence and kv_tokens in all
    (used only on a CPU, where the cache is sized to the workload instead of profiled)."""
    from worker.engine.config import EngineConfig

    blocks = args.num_kv_blocks
    if blocks is None and not setup.device.startswith("cuda"):
        blocks = -(-kv_tokens // args.block_size) + 2 * -(-max_model_len // args.block_size)
    values = dict(
        block_size=args.block_size, num_kv_blocks=blocks, gpu_memory_utilization=args.gpu_memory_utilization,
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len or max_model_len, dtype=setup.dtype, device=setup.device,
        enforce_eager=True if args.enforce_eager else None, prefill_graphs=not args.no_prefill_graphs,
        quantization=args.quantization, kv_cache_dtype=args.kv_cache_dtype, **kernel_options(args),
    )
    return EngineConfig(**{**values, **overrides})


def make_engine(setup: Setup, cfg):
    from worker.engine.llm_engine import LLMEngine

    t0 = time.perf_counter()
    engine = LLMEngine.from_model(setup.model, setup.model_cfg, cfg)
    return engine, time.perf_counter() - t0


def graph_buckets(engine) -> dict[str, dict]:
    """Each kind of CUDA graph's replay time per bucket (ms) and the buckets kept (the others were slower
    than a larger bucket, whose graph their steps replay instead); printed as one line."""
    report = {kind: {"times_ms": graphs.times, "kept": graphs.sizes}
              for kind, graphs in engine.runner.graph_sets.items() if graphs.times}
    dropped = [f"{kind} {size} ({r['times_ms'][size]:.2f} ms)" for kind, r in report.items()
               for size in sorted(set(r["times_ms"]) - set(r["kept"]))]
    if report:
        print("graph buckets dropped, slower than a larger bucket: " + (", ".join(dropped) or "none"))
    return report


def free_engine(engine) -> None:
    """Drop an engine's KV cache and graphs (the model stays), so the next engine or peer gets the memory."""
    import torch

    close = getattr(engine, "close", None)
    if close is not None:
        close()  # its other tensor-parallel ranks, if any
    engine.runner.release()
    del engine
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def random_prompts(n: int, lo: int, hi: int, vocab: int, seed: int) -> list[list[int]]:
    """n prompts of uniform random length in [lo, hi] and uniform random token ids."""
    import numpy as np

    rng = np.random.default_rng(seed)
    lengths = rng.integers(lo, hi + 1, size=n)
    return [rng.integers(0, vocab, size=int(k)).tolist() for k in lengths]


@dataclass
class Timing:
    """One request's clock: added, first token, finished (perf_counter seconds)."""

    added: float
    first: float | None = None
    done: float | None = None
    tokens: list[int] = field(default_factory=list)

    @property
    def ttft(self) -> float:
        assert self.first is not None
        return self.first - self.added

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first."""
        if self.done is None or self.first is None or len(self.tokens) < 2:
            return None
        return (self.done - self.first) / (len(self.tokens) - 1)

    @property
    def e2e(self) -> float:
        assert self.done is not None
        return self.done - self.added


def run_timed(engine, prompts: list[list[int]], params, arrivals: list[float] | None = None,
              tag: str = "r") -> tuple[list[Timing], float]:
    """Runs prompts to completion, each added at its arrival offset (all at once by default); returns
    per-request timings in prompt order and the wall time. A step ends with the sampled ids on the host,
    so a step's clock reading is when its tokens exist."""
    n = len(prompts)
    offsets = arrivals or [0.0] * n
    order = sorted(range(n), key=offsets.__getitem__)
    timings: dict[str, Timing] = {}
    ids = [f"{tag}-{time.monotonic_ns()}-{i}" for i in range(n)]
    index = {rid: i for i, rid in enumerate(ids)}
    nxt = 0
    t0 = time.perf_counter()
    while nxt < n or engine.has_unfinished_requests():
        now = time.perf_counter()
        while nxt < n and offsets[order[nxt]] <= now - t0:
            i = order[nxt]
            timings[ids[i]] = Timing(added=time.perf_counter())
            engine.add_request(ids[i], prompts[i], params)
            nxt += 1
        if not engine.has_unfinished_requests():
            time.sleep(max(0.0, offsets[order[nxt]] - (time.perf_counter() - t0)))
            continue
        outs = engine.step()
        now = time.perf_counter()
        for out in outs:
            t = timings[out.request_id]
            if out.new_token_ids and t.first is None:
                t.first = now
            t.tokens.extend(out.new_token_ids)
            if out.finished:
                t.done = now
    wall = time.perf_counter() - t0
    return [timings[rid] for rid in sorted(timings, key=index.__getitem__)], wall


def stats(values: list[float], scale: float = 1000.0) -> dict[str, float]:
    """mean, p50, p90, p99 (in ms by default)."""
    import numpy as np

    if not values:
        return {}
    a = np.asarray(values, dtype=np.float64) * scale
    return {"mean": float(a.mean()), "p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)),
            "p99": float(np.percentile(a, 99))}


def warm_up(engine, vocab: int, prompt_len: int, num: int = 4, new_tokens: int = 8) -> None:
    """A few short requests, so kernel compilation and first-call costs stay out of the measurement."""
    from protocol.sampling import SamplingParams

    prompts = random_prompts(num, prompt_len, prompt_len, vocab, seed=10_000)
    engine.generate(prompts, SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True))
    engine.block_manager.reset_prefix_cache()


def memory_bandwidth(device: str, gib: float = 2.0, repeats: int = 20) -> float:
    """Achievable device memory bandwidth in bytes/s: a large device-to-device copy (reads + writes),
    CUDA events, median of `repeats`. The floor of a decode step is the bytes it must read over this."""
    import statistics

    import torch

    x = torch.empty(int(gib * 2**30), dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    y.copy_(x)
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        y.copy_(x)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    del x, y
    torch.cuda.empty_cache()
    return 2 * gib * 2**30 / statistics.median(times)


def weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


# ---- the transformers peer -----------------------------------------------------------------------------


def transformers_version() -> str:
    import transformers

    return transformers.__version__


def peer_generate_batch(hf, prompts: list[list[int]], max_new_tokens: int) -> dict[str, Any]:
    """transformers' continuous batching (`generate_batch`, paged KV cache) on the same prompts, greedy,
    exactly max_new_tokens each (eos -1 never matches). `seconds` runs from the first request's creation
    to the last one's finish, leaving out the manager's own set-up and warm-up, which `call_seconds` keeps."""
    from transformers import GenerationConfig

    def config(n: int) -> GenerationConfig:
        return GenerationConfig(max_new_tokens=n, do_sample=False, eos_token_id=-1, pad_token_id=0)

    extra = {}
    if hf.device.type == "cpu":
        # Sized from free memory by default: on a CPU that means zeroing gigabytes for a smoke test.
        from transformers import ContinuousBatchingConfig

        tokens = sum(len(p) for p in prompts) + len(prompts) * max_new_tokens
        extra["continuous_batching_config"] = ContinuousBatchingConfig(num_blocks=tokens // 256 + 4,
                                                                       max_batch_tokens=512)
    else:  # first-call costs (kernel selection, allocator growth) stay out of the measurement
        hf.generate_batch(inputs=[p[:32] for p in prompts[:2]], generation_config=config(4), progress_bar=False)
    t0 = time.perf_counter()
    results = hf.generate_batch(inputs=prompts, generation_config=config(max_new_tokens), progress_bar=False,
                                **extra)
    call = time.perf_counter() - t0
    outs = list(results.values())
    created = [getattr(o, "created_time", None) for o in outs]
    finished = [getattr(o, "lifespan", (None, None))[1] for o in outs]
    seconds = call
    if all(isinstance(c, float) for c in created) and all(isinstance(f, float) and f > 0 for f in finished):
        seconds = max(finished) - min(created)  # type: ignore[type-var, operator]
    lengths = [len(o.generated_tokens) for o in outs]
    return {"num_requests": len(prompts), "returned": len(outs), "seconds": seconds, "call_seconds": call,
            "output_tokens": sum(lengths), "output_tokens_per_s": sum(lengths) / seconds,
            "all_lengths_ok": len(outs) == len(prompts) and all(n == max_new_tokens for n in lengths),
            "attn_implementation": hf.config._attn_implementation, "transformers": transformers_version()}


class _TokenClock:
    """A generate() streamer that notes when each new token reaches the host."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value) -> None:
        if not self._prompt_seen:  # generate() first hands over the prompt
            self._prompt_seen = True
            return
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def peer_generate_one(hf, prompt: list[int], max_new_tokens: int, device: str) -> Timing:
    """transformers' plain `generate` (dynamic KV cache) on one prompt, greedy, exactly max_new_tokens."""
    import torch

    ids = torch.tensor([prompt], device=device)
    clock = _TokenClock()
    sync(device)
    t = Timing(added=time.perf_counter())
    with torch.inference_mode():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                          min_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0, streamer=clock)
    sync(device)
    t.done = time.perf_counter()
    t.first = clock.times[0] if clock.times else t.done
    t.tokens = out[0, len(prompt):].tolist()
    return t

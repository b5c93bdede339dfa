"""The one command, `tokenq`: up, gateway, worker, webhooks, keys, bench, models. Flags default from TOKENQ_* variables."""

from __future__ import annotations

import argparse
import sys

from tokenq import settings


def add_engine_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
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
    add_quantization_flags(p)


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
    return argv + (["--enforce-eager"] if args.enforce_eager else [])


def engine_config_from(args: argparse.Namespace):  # -> EngineConfig (import kept lazy: torch is heavy)
    from worker.engine.config import EngineConfig

    dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    return EngineConfig(
        block_size=args.block_size, kv_cache_memory_gb=args.kv_cache_gb, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=args.max_model_len,
        enable_prefix_caching=not args.no_prefix_caching, dtype=dtype, device=args.device,
        gpu_memory_utilization=args.gpu_memory_utilization, enforce_eager=True if args.enforce_eager else None,
        prefill_graphs=not args.no_prefill_graphs, quantization=args.quantization,
        kv_cache_dtype=args.kv_cache_dtype,
    )


def cmd_up(args: argparse.Namespace) -> int:
    from tokenq.model_store import resolve_model
    from tokenq.supervisor import UpOptions, run_up

    resolve_model(args.model)  # fetch before the children start, with its progress shown here
    return run_up(UpOptions(redis_url=args.redis_url, model=args.model, host=args.host, port=args.port,
                            worker_args=engine_flags_argv(args),
                            worker_metrics_port=args.worker_metrics_port or args.port + 1,
                            webhooks_metrics_port=args.webhooks_metrics_port or args.port + 2))


def cmd_gateway(args: argparse.Namespace) -> int:
    from gateway.server import run

    run(host=args.host, port=args.port, redis_url=_require_redis(args))
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from tokenq.model_store import resolve_model
    from worker.engine.llm_engine import LLMEngine
    from worker.service import serve

    name, path = resolve_model(args.model)
    if args.served_name:
        name = args.served_name
    engine = LLMEngine(path, engine_config_from(args))
    serve(_require_redis(args), name, engine, engine.model_card(name), metrics_port=args.metrics_port)
    return 0


def cmd_webhooks(args: argparse.Namespace) -> int:
    from worker.webhooks.service import run_webhooks

    return run_webhooks(_require_redis(args), metrics_port=args.metrics_port)


def cmd_models(args: argparse.Namespace) -> int:
    from tokenq.model_store import KNOWN_MODELS, is_model_dir, models_dir, pull_model

    if args.models_cmd == "pull":
        if is_model_dir(models_dir() / args.name) and not args.force:
            print(f"{args.name} is already in {models_dir() / args.name} (--force pulls it again)")
            return 0
        pull_model(args.name)
        return 0
    if args.models_cmd == "random":
        from worker.models.random_weights import write_random_model_dir

        path = write_random_model_dir(args.shape, args.dir, seed=args.seed)
        print(f"random-weight {args.shape} model in {path}: tokenq worker --model {path} --device cuda")
        return 0
    for name in sorted(KNOWN_MODELS):
        state = "pulled" if is_model_dir(models_dir() / name) else "not pulled"
        print(f"{name}\t{state}\t{models_dir() / name}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from tokenq.bench import run_bench

    return run_bench(args)


def cmd_bench_module(args: argparse.Namespace) -> int:
    """Benchmarks whose module holds both its parser (add_parser) and its run (main)."""
    import importlib

    return importlib.import_module(args.bench_module).main(args)


def _require_redis(args: argparse.Namespace) -> str:
    if not args.redis_url:
        sys.exit("error: --redis-url (or TOKENQ_REDIS_URL) is required: no `tokenq up` has recorded an embedded "
                 f"Redis under TOKENQ_HOME ({settings.tokenq_home()})")
    return args.redis_url


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokenq", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)

    up = sub.add_parser("up", help="run Redis (embedded unless --redis-url), a worker and the gateway")
    up.add_argument("--redis-url", default=settings.explicit_redis_url())
    up.add_argument("--model", default=settings.model_name())
    up.add_argument("--host", default="127.0.0.1")
    up.add_argument("--port", type=int, default=8000)
    up.add_argument("--worker-metrics-port", type=int, default=None, help="the worker's Prometheus metrics "
                    "(default: --port + 1)")
    up.add_argument("--webhooks-metrics-port", type=int, default=None, help="the webhook deliverer's "
                    "Prometheus metrics (default: --port + 2)")
    add_engine_flags(up)
    up.set_defaults(func=cmd_up)

    gw = sub.add_parser("gateway", help="run the HTTP gateway")
    gw.add_argument("--redis-url", default=settings.redis_url())
    gw.add_argument("--host", default="127.0.0.1")
    gw.add_argument("--port", type=int, default=8000)
    gw.set_defaults(func=cmd_gateway)

    wk = sub.add_parser("worker", help="run one engine worker")
    wk.add_argument("--redis-url", default=settings.redis_url())
    wk.add_argument("--model", default=settings.model_name(), help="a known model name or a HF directory")
    wk.add_argument("--served-name", default=None, help="name clients use (default: the model's)")
    wk.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus metrics on this port")
    add_engine_flags(wk)
    wk.set_defaults(func=cmd_worker)

    wh = sub.add_parser("webhooks", help="deliver webhooks of finished jobs (outbox relay + arq worker)")
    wh.add_argument("--redis-url", default=settings.redis_url())
    wh.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus metrics on this port")
    wh.set_defaults(func=cmd_webhooks)

    from tokenq.keys import add_parser as add_keys_parser

    add_keys_parser(sub, settings.redis_url())

    models = sub.add_parser("models", help="list or pull models into TOKENQ_HOME/models")
    msub = models.add_subparsers(dest="models_cmd")
    pull = msub.add_parser("pull", help="fetch and convert a model")
    pull.add_argument("name", nargs="?", default=settings.DEFAULT_MODEL)
    pull.add_argument("--force", action="store_true", help="fetch and convert again")
    msub.add_parser("list")
    rnd = msub.add_parser("random", help="a directory that serves a named shape with seeded random weights "
                          "(made at load time) and a synthetic tokenizer: the stack on any GPU, no download")
    rnd.add_argument("shape", help="llama3-8b, llama3-70b, small or tiny")
    rnd.add_argument("dir")
    rnd.add_argument("--seed", type=int, default=0)
    models.set_defaults(func=cmd_models)

    bench = sub.add_parser("bench", help="benchmarks (each prints a table and writes JSON)")
    bsub = bench.add_subparsers(dest="bench_cmd", required=True)
    eng = bsub.add_parser("engine", help="offline engine throughput vs Hugging Face generate, same prompts")
    eng.add_argument("--model", default=settings.model_name())
    eng.add_argument("--num-prompts", type=int, default=64)
    eng.add_argument("--min-prompt-len", type=int, default=64)
    eng.add_argument("--max-prompt-len", type=int, default=256)
    eng.add_argument("--output-len", type=int, default=128)
    eng.add_argument("--seed", type=int, default=0)
    eng.add_argument("--skip-peer", action="store_true", help="run only our engine")
    eng.add_argument("--out", default="bench-engine.json")
    add_engine_flags(eng)
    from tokenq.bench.queue import add_queue_parser

    add_queue_parser(bsub)
    import importlib

    for name in ("throughput", "latency", "prefix", "serve", "fp8_accuracy"):
        module = f"tokenq.bench.{name}"
        importlib.import_module(module).add_parser(bsub).set_defaults(func=cmd_bench_module, bench_module=module)
    bench.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    sys.exit(args.func(args))

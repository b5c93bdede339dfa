"""The one command, `tokenq`: up, gateway, worker, webhooks, keys, status, bench, models. Flags default from TOKENQ_* variables."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from jobstore.connect import is_cluster_url
from tokenq import settings
from tokenq.engine_options import add_engine_flags, engine_config_from, engine_flags_argv, flag_error
from tokenq.flag_checks import (
    EXIT_SETTINGS,
    MAX_PORT,
    MODEL_SHAPES,
    OptionError,
    check_host,
    check_port_free,
    count,
    natural,
    output_file,
    port,
    show_defaults,
)
from tokenq.redis_command import check_redis, redacted, require_redis_url


def cmd_up(args: argparse.Namespace) -> int:
    from batches.settings import BatchSettings
    from tokenq.model_store import resolve_model
    from tokenq.supervisor import UpOptions, run_up

    # Whatever would stop a role is checked here, not in a child restarted again and again.
    settings.Settings.from_env()  # each role reads its TOKENQ_* variables from these two
    BatchSettings.from_env()
    if args.redis_url is not None:
        require_redis_url(args.redis_url)
        if is_cluster_url(args.redis_url):
            raise OptionError(f"--redis-url {redacted(args.redis_url)}: `tokenq up` runs the batch feeder and the "
                              "webhook deliverer, which need a single Redis; on a cluster run the roles one by one "
                              "(docs/redis-cluster.md)")
    worker_metrics_port = args.worker_metrics_port or _port_after(args.port, 1, "--worker-metrics-port")
    webhooks_metrics_port = args.webhooks_metrics_port or _port_after(args.port, 2, "--webhooks-metrics-port")
    batches_metrics_port = args.batches_metrics_port or _port_after(args.port, 3, "--batches-metrics-port")
    check_host(args.host)
    engine_config_from(args)
    resolve_model(args.model)  # fetch before the children start, with its progress shown here
    return run_up(UpOptions(redis_url=args.redis_url, model=args.model, host=args.host, port=args.port,
                            worker_args=engine_flags_argv(args), worker_metrics_port=worker_metrics_port,
                            webhooks_metrics_port=webhooks_metrics_port, batches_metrics_port=batches_metrics_port,
                            device=args.device))


def _port_after(base: int, offset: int, flag: str) -> int:
    """A port's default of --port + offset, which must be a port too."""
    if base + offset > MAX_PORT:
        raise OptionError(f"--port {base}: {flag} defaults to --port + {offset}, above {MAX_PORT}; pass {flag}")
    return base + offset


def cmd_gateway(args: argparse.Namespace) -> int:
    from gateway.server import run

    url = require_redis_url(args.redis_url)
    check_redis(url, "gateway")
    check_host(args.host)
    run(host=args.host, port=args.port, redis_url=url)
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from tokenq.model_store import resolve_model
    from worker.engine.config import ConfigError
    from worker.engine_process import EngineSpec
    from worker.service import serve

    # A bad flag stops the start before the model is fetched and loaded.
    url = require_redis_url(args.redis_url)
    check_redis(url, "worker")
    check_port_free("--metrics-port", args.metrics_port, args.metrics_host)
    config = engine_config_from(args)
    name, path = resolve_model(args.model)
    if args.served_name:
        name = args.served_name
    # The engine runs in its own process; this one imports no torch and keeps to Redis.
    spec = EngineSpec(str(path), config, name)
    try:
        return serve(url, name, spec, metrics_port=args.metrics_port, metrics_host=args.metrics_host)
    except ConfigError as e:  # a setting only the engine can check (its KV cache against max_model_len)
        raise flag_error(e) from None


def cmd_webhooks(args: argparse.Namespace) -> int:
    from worker.webhooks.service import run_webhooks

    url = require_redis_url(args.redis_url)
    check_redis(url, "webhooks")
    check_port_free("--metrics-port", args.metrics_port, args.metrics_host)
    queue_url = settings.Settings.from_env().webhook_queue_url or url
    if queue_url != url:
        check_redis(queue_url, "webhooks")
    return _refusing_cluster(queue_url, lambda: run_webhooks(url, metrics_port=args.metrics_port,
                                                                 metrics_host=args.metrics_host))


def cmd_batches(args: argparse.Namespace) -> int:
    from batches.service import run_batches

    url = require_redis_url(args.redis_url)
    check_redis(url, "batches")
    check_port_free("--metrics-port", args.metrics_port, args.metrics_host)
    return _refusing_cluster(url, lambda: run_batches(url, metrics_port=args.metrics_port,
                                                      metrics_host=args.metrics_host))


def _refusing_cluster(url: str, run: Callable[[], int]) -> int:
    """run(), whose service refuses a Redis Cluster URL with a ValueError as it starts: said as one line."""
    try:
        return run()
    except ValueError as e:
        if isinstance(e, settings.SettingError) or not is_cluster_url(url):
            raise
        sys.exit(f"error: {e}")


def cmd_models(args: argparse.Namespace) -> int:
    from tokenq.model_store import KNOWN_MODELS, is_model_dir, models_dir, pull_model

    if args.models_cmd == "pull":
        if "/" in args.name or args.name.startswith("."):
            sys.exit(f"error: models pull takes a model's name ({', '.join(sorted(KNOWN_MODELS))}), not a path; a "
                     f"directory of weights is served as it is: tokenq worker --model {args.name}")
        if is_model_dir(models_dir() / args.name) and not args.force:
            print(f"{args.name} is already in {models_dir() / args.name} (--force pulls it again)")
            return 0
        pull_model(args.name)
        return 0
    if args.models_cmd == "random":
        from worker.models.random_weights import write_random_model_dir

        target = Path(args.dir)
        if target.is_dir() and any(target.iterdir()) and not args.force:
            sys.exit(f"error: {target} is not empty; name a new directory (or --force to write over what is there)")
        try:
            path = write_random_model_dir(args.shape, args.dir, seed=args.seed)
        except OSError as e:
            sys.exit(f"error: cannot make the model directory {args.dir}: {e.strerror or e}")
        print(f"random-weight {args.shape} model in {path}: tokenq worker --model {path} --device cuda")
        return 0
    for name in sorted(KNOWN_MODELS):
        state = "pulled" if is_model_dir(models_dir() / name) else "not pulled"
        print(f"{name}\t{state}\t{models_dir() / name}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from tokenq.bench import run_bench
    from tokenq.bench.launch import launch

    return launch(args.bench_cmd, run_bench, args)


def cmd_bench_module(args: argparse.Namespace) -> int:
    """Benchmarks whose module holds both its parser (add_parser) and its run (main)."""
    import importlib

    from tokenq.bench.launch import launch

    return launch(args.bench_cmd, importlib.import_module(args.bench_module).main, args)


METRICS_HOST_HELP = ("the address the metrics listen on (default every one, for a Prometheus elsewhere; `tokenq up` "
                     "gives 127.0.0.1, its gateway's /metrics carries them)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokenq", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)

    up = sub.add_parser("up", help="run Redis (embedded unless --redis-url), a worker, the webhook deliverer, "
                                   "the batch feeder and the gateway")
    up.add_argument("--redis-url", default=settings.explicit_redis_url())
    up.add_argument("--model", default=settings.model_name())
    up.add_argument("--host", default="127.0.0.1")
    up.add_argument("--port", type=port, default=8000)
    up.add_argument("--worker-metrics-port", type=port, default=None, help="the worker's Prometheus metrics "
                    "(default: --port + 1)")
    up.add_argument("--webhooks-metrics-port", type=port, default=None, help="the webhook deliverer's "
                    "Prometheus metrics (default: --port + 2)")
    up.add_argument("--batches-metrics-port", type=port, default=None, help="the batch feeder's "
                    "Prometheus metrics (default: --port + 3)")
    add_engine_flags(up)
    up.set_defaults(func=cmd_up)

    gw = sub.add_parser("gateway", help="run the HTTP gateway")
    gw.add_argument("--redis-url", default=settings.redis_url())
    gw.add_argument("--host", default="127.0.0.1")
    gw.add_argument("--port", type=port, default=8000)
    gw.set_defaults(func=cmd_gateway)

    wk = sub.add_parser("worker", help="run one engine worker")
    wk.add_argument("--redis-url", default=settings.redis_url())
    wk.add_argument("--model", default=settings.model_name(), help="a known model name or a HF directory")
    wk.add_argument("--served-name", default=None, help="name clients use (default: the model's)")
    wk.add_argument("--metrics-port", type=port, default=None, help="serve Prometheus metrics on this port")
    wk.add_argument("--metrics-host", default="0.0.0.0", help=METRICS_HOST_HELP)
    add_engine_flags(wk)
    wk.set_defaults(func=cmd_worker)

    wh = sub.add_parser("webhooks", help="deliver webhooks of finished jobs (outbox relay + arq worker)")
    wh.add_argument("--redis-url", default=settings.redis_url())
    wh.add_argument("--metrics-port", type=port, default=None, help="serve Prometheus metrics on this port")
    wh.add_argument("--metrics-host", default="0.0.0.0", help=METRICS_HOST_HELP)
    wh.set_defaults(func=cmd_webhooks)

    bf = sub.add_parser("batches", help="feed batches (/v1/batches) into the batch lane, write their results")
    bf.add_argument("--redis-url", default=settings.redis_url())
    bf.add_argument("--metrics-port", type=port, default=None, help="serve Prometheus metrics on this port")
    bf.add_argument("--metrics-host", default="0.0.0.0", help=METRICS_HOST_HELP)
    bf.set_defaults(func=cmd_batches)

    from batches.cli import add_parser as add_batch_parser

    add_batch_parser(sub)

    from tokenq.keys import add_parser as add_keys_parser

    add_keys_parser(sub, settings.redis_url())
    from tokenq.cache import add_parser as add_cache_parser

    add_cache_parser(sub, settings.redis_url())
    from tokenq.status import add_parser as add_status_parser

    add_status_parser(sub, settings.redis_url())

    models = sub.add_parser("models", help="list or pull models into TOKENQ_HOME/models")
    msub = models.add_subparsers(dest="models_cmd")
    pull = msub.add_parser("pull", help="fetch and convert a model")
    pull.add_argument("name", nargs="?", default=settings.model_name(), help="default: TOKENQ_MODEL, the model "
                      "the workers of a deployment serve")
    pull.add_argument("--force", action="store_true", help="fetch and convert again")
    msub.add_parser("list", help="the models `pull` knows, and whether each is pulled")
    rnd = msub.add_parser("random", help="a directory that serves a named shape with seeded random weights "
                          "(made at load time) and a synthetic tokenizer: the stack on any GPU, no download")
    rnd.add_argument("shape", choices=MODEL_SHAPES, metavar="shape", help="%(choices)s")
    rnd.add_argument("dir", help="a new (or empty) directory")
    rnd.add_argument("--seed", type=int, default=0, help="the weights' seed (default 0)")
    rnd.add_argument("--force", action="store_true", help="write into a directory that is not empty")
    models.set_defaults(func=cmd_models)

    bench = sub.add_parser("bench", help="benchmarks (each prints a table and writes JSON)")
    bsub = bench.add_subparsers(dest="bench_cmd", required=True)
    eng = bsub.add_parser("engine", help="offline engine throughput vs Hugging Face generate, same prompts")
    eng.add_argument("--model", default=settings.model_name())
    eng.add_argument("--num-prompts", type=count, default=64)
    eng.add_argument("--min-prompt-len", type=count, default=64)
    eng.add_argument("--max-prompt-len", type=count, default=256)
    eng.add_argument("--output-len", type=count, default=128)
    eng.add_argument("--seed", type=natural, default=0)
    eng.add_argument("--chat", action="store_true",
                     help="equal-length chat prompts (the model's template) instead of random token ids")
    eng.add_argument("--chat-words", type=count, default=24, help="words in each --chat user message")
    eng.add_argument("--skip-peer", action="store_true", help="run only our engine")
    eng.add_argument("--out", type=output_file, default="bench-engine.json")
    add_engine_flags(eng)
    show_defaults(eng)
    from tokenq.bench.queue import add_queue_parser

    add_queue_parser(bsub)
    import importlib

    for name in ("throughput", "latency", "prefix", "serve", "fp8_accuracy", "chat", "batch", "cache"):
        module = f"tokenq.bench.{name}"
        importlib.import_module(module).add_parser(bsub).set_defaults(func=cmd_bench_module, bench_module=module)
    bench.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> None:
    from tokenq.model_store import ModelNotFound, PullFailed

    args = build_parser().parse_args(argv)
    try:
        sys.exit(args.func(args))
    except (ModelNotFound, PullFailed) as e:
        sys.exit(f"error: {e}")
    except (OptionError, settings.SettingError) as e:  # a flag or a TOKENQ_* variable, as argparse says a bad flag
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_SETTINGS)
    except KeyboardInterrupt:  # Ctrl-C in a command that does not handle it (a benchmark): a line, not a trace
        print("interrupted", file=sys.stderr)
        sys.exit(130)

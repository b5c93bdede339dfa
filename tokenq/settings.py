"""Options every role reads from its environment, in one place: each TOKENQ_* variable, its type and its
default. A role reads them once when it starts (`Settings.from_env()`), never at import time, so tests
and the supervisor can set the environment of a process before it starts.

The kernel choices (TOKENQ_KERNELS, TOKENQ_GEMV) travel in the engine's config to each process that runs
the model, which sets them in tokenq_kernels/ (kernels import nothing above them); the gateway's uvicorn workers
receive their Redis URL through the environment from the gateway's launcher.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from tokenq.home_lock import running_gateway

DEFAULT_MODEL = "smollm2-135m-instruct"
DEFAULT_GATEWAY_URL = "http://127.0.0.1:8000"
METRICS_PEERS_ENV = "TOKENQ_METRICS_PEERS"  # set by `tokenq up` for its gateway
_YES = ("1", "true", "yes", "on")
_NO = ("0", "false", "no", "off")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class SettingError(ValueError):
    """A TOKENQ_* variable whose value cannot be read, said with the variable's name and what it must be."""


def optional_float(env: Mapping[str, str], name: str) -> float | None:
    """The variable as a number, None when unset; a bad value is an error that names the variable."""
    raw = env.get(name)
    try:
        return float(raw) if raw else None
    except ValueError:
        raise SettingError(f"{name}={raw!r} is not a number") from None


def env_float(env: Mapping[str, str], name: str, default: float) -> float:
    value = optional_float(env, name)
    return default if value is None else value


def _positive_float(env: Mapping[str, str], name: str, default: float) -> float:
    value = env_float(env, name, default)
    if not value > 0:  # also refuses nan
        raise SettingError(f"{name}={env.get(name)!r} must be more than 0")
    return value


def env_int(env: Mapping[str, str], name: str, default: int) -> int:
    """A whole number (1e6 and 100000.0 are whole too); anything else is an error naming the variable."""
    value = env_float(env, name, default)
    if value != int(value):
        raise SettingError(f"{name}={env.get(name)!r} is not a whole number")
    return int(value)


def _seconds_list(env: Mapping[str, str], name: str) -> tuple[float, ...] | None:
    """Comma-separated seconds, None when unset."""
    raw = (env.get(name) or "").strip()
    if not raw:
        return None
    try:
        return tuple(float(x) for x in raw.split(",") if x.strip())
    except ValueError:
        raise SettingError(f"{name}={raw!r} is not a comma-separated list of seconds") from None


def _log_level(env: Mapping[str, str]) -> str:
    """One of LOG_LEVELS, in any case; anything else is an error naming the variable and the levels."""
    raw = env.get("TOKENQ_LOG_LEVEL") or "INFO"
    if raw.strip().upper() not in LOG_LEVELS:
        raise SettingError(f"TOKENQ_LOG_LEVEL={raw!r} is not a log level: it must be one of {', '.join(LOG_LEVELS)} "
                           "(any case)")
    return raw.strip().upper()


def _home(env: Mapping[str, str]) -> Path:
    return Path(env.get("TOKENQ_HOME") or Path.home() / ".tokenq").expanduser()


def _redis_url(env: Mapping[str, str]) -> str | None:
    return env.get("TOKENQ_REDIS_URL") or None


def _model(env: Mapping[str, str]) -> str:
    return env.get("TOKENQ_MODEL") or DEFAULT_MODEL


HOT_LOOP_MIN_CORES = 8  # cores to spare for the gateway's and the worker's polling loops


def _usable_cores() -> int:
    """The cores this process may run on (its affinity, where the platform has one: Linux)."""
    affinity = getattr(os, "sched_getaffinity", None)
    return len(affinity(0)) if affinity is not None else os.cpu_count() or 1


def hot_loop_env(device: str, env: Mapping[str, str] | None = None) -> dict[str, str]:
    """TOKENQ_HOT_LOOP for the gateway and the worker that `tokenq up` starts (and `tokenq bench serve`, which
    measures the stack as `up` runs it): on where the engine runs on a GPU (`device` cuda, or auto with one
    present) and this host has HOT_LOOP_MIN_CORES usable cores, where it takes a lone request's first token
    sooner (docs/BENCHMARKS.md); a setting of the user's stands."""
    env = os.environ if env is None else env
    if env.get("TOKENQ_HOT_LOOP") or _usable_cores() < HOT_LOOP_MIN_CORES or device == "cpu":
        return {}
    if device == "auto":
        from tokenq.flag_checks import cuda_available

        on_gpu = cuda_available()
    else:
        on_gpu = device.startswith("cuda")
    return {"TOKENQ_HOT_LOOP": "1"} if on_gpu else {}


def _flag(env: Mapping[str, str], name: str, default: bool) -> bool:
    """A yes/no variable: 1, true, yes, on (any case) or 0, false, no, off; anything else: `default`."""
    raw = (env.get(name) or "").strip().lower()
    return True if raw in _YES else False if raw in _NO else default


@dataclass(frozen=True)
class Settings:
    home: Path  # TOKENQ_HOME: models and the embedded Redis's data
    redis_url: str | None  # TOKENQ_REDIS_URL; None: `tokenq up` starts an embedded Redis
    model: str  # TOKENQ_MODEL
    log_level: str  # TOKENQ_LOG_LEVEL: one of LOG_LEVELS, the least severe a role's lines show
    drain_grace_s: float  # TOKENQ_DRAIN_GRACE_S: how long a stopping worker lets running jobs finish
    lease_s: float  # TOKENQ_LEASE_S: a running entry idle this long is another worker's to claim
    max_deliveries: int  # TOKENQ_MAX_DELIVERIES: deliveries before an entry is dead-lettered
    max_queue_depth: int  # TOKENQ_MAX_QUEUE_DEPTH: queued jobs the gateway admits (0: no limit)
    gateway_workers: int  # TOKENQ_GATEWAY_WORKERS: gateway processes on the one port
    webhook_retry_delays: tuple[float, ...] | None  # TOKENQ_WEBHOOK_RETRY_DELAYS: comma-separated seconds
    # TOKENQ_WEBHOOK_QUEUE_URL: a single-node Redis for arq's delivery queue when TOKENQ_REDIS_URL is a cluster
    # (arq speaks to one node); None: TOKENQ_REDIS_URL's.
    webhook_queue_url: str | None = None
    kernels: str = "triton"  # TOKENQ_KERNELS=torch: the torch references instead of every Triton kernel
    gemv: str = "triton"  # TOKENQ_GEMV=cublas: one-row matmuls on cuBLAS instead of our GEMV
    pdl: bool = True  # TOKENQ_PDL=0: our kernels without programmatic dependent launch (Hopper and later)
    throughput_log_s: float = 30.0  # TOKENQ_THROUGHPUT_LOG_S: a worker's throughput line this often (0: never)
    # TOKENQ_WEBHOOK_GONE_DISABLE_S: how long a 410 disables a tenant's URL; None: the retry policy's default
    webhook_gone_disable_s: float | None = None
    require_auth: bool = False  # TOKENQ_REQUIRE_AUTH: the gateway has auth on whatever Redis holds
    access_log: bool = True  # TOKENQ_ACCESS_LOG=0: no gateway line per request
    # TOKENQ_GATEWAY_LIBRARY_PATH: submissions through FastAPI and redis-py alone (`tokenq bench queue`)
    gateway_library_path: bool = False
    metrics_peers: str = ""  # TOKENQ_METRICS_PEERS: role=url,... whose metrics the gateway's /metrics adds
    # TOKENQ_METRICS_TOKEN: the bearer token the gateway's /metrics asks for (its series name tenants); None: open
    metrics_token: str | None = None
    # TOKENQ_METRICS_TOKEN_FILE: a file that keeps that token, made with a random one if missing
    # (gateway/metrics_token.py); TOKENQ_METRICS_TOKEN wins
    metrics_token_file: str | None = None
    gateway_url: str | None = None  # TOKENQ_URL: the gateway that clients such as `tokenq batch` call
    api_key: str | None = None  # TOKENQ_API_KEY (else OPENAI_API_KEY): the key those clients send
    # TOKENQ_HOT_LOOP: the gateway and the worker poll instead of sleeping while a job runs (a core each
    # meanwhile; protocol/hot_loop.py); `tokenq up` turns it on for a GPU host (hot_loop_env)
    hot_loop: bool = False
    # TOKENQ_WEBHOOK_ALLOW: CIDRs or host names that webhooks may reach though not public (protocol/urlguard.py)
    webhook_allow: str = ""
    # TOKENQ_ENGINE_STALL_S: an engine with requests in it that reports nothing this long is hung (a rank stopped,
    # or stuck in a collective): its worker kills it and exits, its jobs go to another worker (engine_process.py)
    engine_stall_s: float = 120.0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        return cls(
            home=_home(env),
            redis_url=_redis_url(env),
            model=_model(env),
            log_level=_log_level(env),
            drain_grace_s=env_float(env, "TOKENQ_DRAIN_GRACE_S", 10.0),
            lease_s=env_float(env, "TOKENQ_LEASE_S", 30.0),
            max_deliveries=env_int(env, "TOKENQ_MAX_DELIVERIES", 3),
            max_queue_depth=env_int(env, "TOKENQ_MAX_QUEUE_DEPTH", 100_000),
            gateway_workers=env_int(env, "TOKENQ_GATEWAY_WORKERS", 1),
            webhook_retry_delays=_seconds_list(env, "TOKENQ_WEBHOOK_RETRY_DELAYS"),
            webhook_queue_url=env.get("TOKENQ_WEBHOOK_QUEUE_URL") or None,
            kernels="torch" if (env.get("TOKENQ_KERNELS") or "").lower() == "torch" else "triton",
            gemv="cublas" if (env.get("TOKENQ_GEMV") or "").lower() == "cublas" else "triton",
            pdl=_flag(env, "TOKENQ_PDL", True),
            throughput_log_s=env_float(env, "TOKENQ_THROUGHPUT_LOG_S", 30.0),
            webhook_gone_disable_s=optional_float(env, "TOKENQ_WEBHOOK_GONE_DISABLE_S"),
            require_auth=_flag(env, "TOKENQ_REQUIRE_AUTH", False),
            access_log=_flag(env, "TOKENQ_ACCESS_LOG", True),
            gateway_library_path=_flag(env, "TOKENQ_GATEWAY_LIBRARY_PATH", False),
            metrics_peers=env.get(METRICS_PEERS_ENV) or "",
            metrics_token=env.get("TOKENQ_METRICS_TOKEN") or None,
            metrics_token_file=env.get("TOKENQ_METRICS_TOKEN_FILE") or None,
            gateway_url=env.get("TOKENQ_URL") or None,
            api_key=env.get("TOKENQ_API_KEY") or env.get("OPENAI_API_KEY") or None,
            hot_loop=_flag(env, "TOKENQ_HOT_LOOP", False),
            webhook_allow=env.get("TOKENQ_WEBHOOK_ALLOW") or "",
            engine_stall_s=_positive_float(env, "TOKENQ_ENGINE_STALL_S", 120.0),
        )


# The accessors below read their one variable alone: the parser's defaults come from them, and a bad value
# of another variable must not break `tokenq --help` (a command that needs that one says so when it starts).
def tokenq_home() -> Path:
    return _home(os.environ)


def embedded_redis_dir() -> Path:
    """Where `tokenq up`'s embedded Redis keeps its append-only file and its recorded address."""
    return tokenq_home() / "redis"


def embedded_redis_address_file() -> Path:
    return embedded_redis_dir() / "address"


def explicit_redis_url() -> str | None:
    """TOKENQ_REDIS_URL; None tells `tokenq up` to start its embedded Redis."""
    return _redis_url(os.environ)


def redis_url() -> str | None:
    """TOKENQ_REDIS_URL, else the address `tokenq up` recorded for its embedded Redis under TOKENQ_HOME
    (so `tokenq keys` and a second worker find it by themselves), else None."""
    explicit = explicit_redis_url()
    if explicit:
        return explicit
    try:
        return embedded_redis_address_file().read_text().strip() or None
    except OSError:
        return None


def gateway_url(settings: Settings | None = None) -> str:
    """TOKENQ_URL, else the gateway of the `tokenq up` running on TOKENQ_HOME, else DEFAULT_GATEWAY_URL."""
    settings = settings or Settings.from_env()
    return settings.gateway_url or running_gateway(settings.home) or DEFAULT_GATEWAY_URL


def model_name() -> str:
    return _model(os.environ)

"""Prometheus metrics of one worker process, in the vLLM spirit: requests, latencies, tokens, engine load."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0)

REQUESTS_STARTED = Counter(
    "tokenq_worker_requests_started_total", "Jobs handed to the engine.", ["model", "lane"]
)
REQUESTS_FINISHED = Counter(
    "tokenq_worker_requests_finished_total", "Jobs finished by this worker, by finish reason.",
    ["model", "reason"],
)
DUPLICATE_FINALS = Counter(
    "tokenq_duplicate_final_writes_total", "Final writes dropped because the job was already final.", ["model"],
)
RECLAIMED = Counter(
    "tokenq_worker_reclaimed_entries_total", "Stream entries claimed from a worker whose lease lapsed.", ["model"],
)
DEAD_LETTERED = Counter(
    "tokenq_worker_dead_lettered_total", "Entries moved to tokenq:dead after too many deliveries (job failed).",
    ["model"],
)
RELEASED = Counter(
    "tokenq_worker_released_entries_total", "Unfinished entries handed back to the group on drain.", ["model"],
)
MALFORMED_ENTRIES = Counter(
    "tokenq_worker_malformed_entries_total", "Stream entries that could not be parsed.", ["model"]
)
ENGINE_ERRORS = Counter(
    "tokenq_worker_engine_errors_total", "Engine steps that raised (their requests failed).", ["model"]
)
QUEUE_TIME = Histogram(
    "tokenq_worker_queue_time_seconds", "From enqueue at the gateway to start on this worker.",
    ["model", "lane"], buckets=_LATENCY_BUCKETS,
)
TIME_TO_FIRST_TOKEN = Histogram(
    "tokenq_worker_time_to_first_token_seconds", "From enqueue at the gateway to the first output token.",
    ["model", "lane"], buckets=_LATENCY_BUCKETS,
)
TIME_PER_OUTPUT_TOKEN = Histogram(
    "tokenq_worker_time_per_output_token_seconds", "Decode time per output token after the first.",
    ["model"], buckets=_TPOT_BUCKETS,
)
PROMPT_TOKENS = Counter("tokenq_worker_prompt_tokens_total", "Prompt tokens processed.", ["model"])
CACHED_PROMPT_TOKENS = Counter(
    "tokenq_worker_cached_prompt_tokens_total", "Prompt tokens served by the prefix cache.", ["model"]
)
GENERATION_TOKENS = Counter("tokenq_worker_generation_tokens_total", "Output tokens generated.", ["model"])
QUEUE_DEPTH = Gauge(
    "tokenq_queue_depth", "Jobs on the lane's streams, queued or running, summed over every tenant's stream "
    "(each worker reports the same total: aggregate with max). What autoscaling watches.", ["model", "lane"],
)
RUNNING = Gauge("tokenq_worker_running_requests", "Requests the engine is running.", ["model"])
WAITING = Gauge("tokenq_worker_waiting_requests", "Requests waiting inside the engine.", ["model"])
KV_USAGE = Gauge("tokenq_worker_kv_cache_usage_ratio", "Share of KV-cache blocks in use (0..1).", ["model"])
PREFIX_HIT_RATE = Gauge(
    "tokenq_worker_prefix_cache_hit_rate", "Share of prompt tokens found in the prefix cache.", ["model"]
)


def observe_engine_stats(model: str, stats: dict) -> None:
    RUNNING.labels(model).set(stats.get("running", 0))
    WAITING.labels(model).set(stats.get("waiting", 0))
    KV_USAGE.labels(model).set(stats.get("kv_usage", 0.0))
    PREFIX_HIT_RATE.labels(model).set(stats.get("prefix_hit_rate", 0.0))


def start_metrics_server(port: int, addr: str = "0.0.0.0") -> None:
    """Serve /metrics from a daemon thread (prometheus-client's own HTTP server)."""
    start_http_server(port, addr=addr)

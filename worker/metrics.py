"""Prometheus metrics of one worker process, in the vLLM spirit: requests, latencies, tokens, engine load.

docs/metrics.md says what each one means and which alerts read it; the Grafana dashboard's test checks
that every name it queries is defined here or in the gateway's or webhook service's metrics."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, disable_created_metrics, start_http_server

from worker.engine_loop import STEP_ERRORS_STAT
from worker.engine_process import REPORT_SEND_STAT

# No `*_created` series beside each counter and histogram (as vLLM): they doubled the series and nothing reads them.
disable_created_metrics()

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0)
_LENGTH_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)

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
    "tokenq_worker_dead_lettered_total", "Entries moved to their model's dead-letter stream after too many deliveries (job failed).",
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
    ["model", "lane", "tenant"], buckets=_LATENCY_BUCKETS,
)
E2E_LATENCY = Histogram(
    "tokenq_worker_e2e_request_latency_seconds", "From enqueue at the gateway to the job's final write.",
    ["model", "lane"], buckets=_LATENCY_BUCKETS,
)
PROMPT_LENGTH = Histogram(
    "tokenq_worker_request_prompt_tokens", "Prompt length of each finished job, in tokens.", ["model"],
    buckets=_LENGTH_BUCKETS,
)
GENERATION_LENGTH = Histogram(
    "tokenq_worker_request_generation_tokens", "Output length of each finished job, in tokens.", ["model"],
    buckets=_LENGTH_BUCKETS,
)
TIME_TO_FIRST_TOKEN = Histogram(
    "tokenq_worker_time_to_first_token_seconds", "From enqueue at the gateway to the first output token.",
    ["model", "lane"], buckets=_LATENCY_BUCKETS,
)
TIME_PER_OUTPUT_TOKEN = Histogram(
    "tokenq_worker_time_per_output_token_seconds", "Decode time per output token after the first.",
    ["model", "lane"], buckets=_TPOT_BUCKETS,
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
# The engine keeps lifetime totals; they become counters here by their increments, so that rate() over
# any window gives the recent hit rate (a lifetime ratio hides a cache that stopped hitting).
PREFIX_CACHE_QUERIES = Counter(
    "tokenq_worker_prefix_cache_queries_total", "Prompt tokens looked up in the prefix cache.", ["model"]
)
PREFIX_CACHE_HITS = Counter(
    "tokenq_worker_prefix_cache_hits_total", "Prompt tokens found in the prefix cache.", ["model"]
)
PREEMPTIONS = Counter(
    "tokenq_worker_preemptions_total", "Sequences preempted (recomputed later) because KV blocks ran out.",
    ["model"],
)
KV_BLOCKS = Gauge("tokenq_worker_kv_cache_blocks", "KV-cache blocks the engine holds in all.", ["model"])
ENGINE_REPORT_SEND = Counter(
    "tokenq_worker_engine_report_send_seconds", "Seconds the engine process spent handing its step reports to "
    "the worker process. It grows fast only when the worker reads behind and the pipe is full, and while a "
    "report waits no step is launched: the worker's Redis side is then what limits throughput.", ["model"],
)

ENGINE_STEPS = Counter("tokenq_worker_engine_steps", "Steps the engine launched.", ["model"])
ENGINE_PREFILL_STEPS = Counter(
    "tokenq_worker_engine_prefill_steps", "Steps the engine launched that carried a prompt chunk.", ["model"])
ENGINE_STEP_TOKENS = Counter(
    "tokenq_worker_engine_step_tokens", "Tokens the engine's launched steps computed (prompt and output).",
    ["model"])

_ENGINE_TOTALS = {"prefix_queries_tokens": PREFIX_CACHE_QUERIES, "prefix_hit_tokens": PREFIX_CACHE_HITS,
                  "num_preemptions": PREEMPTIONS, REPORT_SEND_STAT: ENGINE_REPORT_SEND,
                  "launched_steps": ENGINE_STEPS, "launched_prefill_steps": ENGINE_PREFILL_STEPS,
                  "launched_step_tokens": ENGINE_STEP_TOKENS, STEP_ERRORS_STAT: ENGINE_ERRORS}
_last_totals: dict[tuple[str, str], float] = {}


def observe_engine_stats(model: str, stats: dict) -> None:
    RUNNING.labels(model).set(stats.get("running", 0))
    WAITING.labels(model).set(stats.get("waiting", 0))
    KV_USAGE.labels(model).set(stats.get("kv_usage", 0.0))
    if "num_blocks" in stats:
        KV_BLOCKS.labels(model).set(stats["num_blocks"])
    for field, counter in _ENGINE_TOTALS.items():
        child = counter.labels(model)  # exported from the first beat, at 0 until the engine reports one
        if field not in stats:
            continue
        total = float(stats[field])
        # A smaller total means a new engine (restarted): count its total from zero.
        last = _last_totals.get((model, field), 0.0)
        child.inc(max(0.0, total - last) if total >= last else total)
        _last_totals[(model, field)] = total


def observe_finished(model: str, lane: str, enqueued_at: float, prompt_tokens: int, output_tokens: int,
                     now: float) -> None:
    E2E_LATENCY.labels(model, lane).observe(max(0.0, now - enqueued_at))
    PROMPT_LENGTH.labels(model).observe(prompt_tokens)
    GENERATION_LENGTH.labels(model).observe(output_tokens)


# Counted rarely (a failure, a recovery): their series exist at 0 from the worker's start, so that the first
# event is an increase an alert sees (a series born at 1 has none: rules.yaml's TokenqDeadLetters).
_RARE = (DUPLICATE_FINALS, RECLAIMED, DEAD_LETTERED, RELEASED, MALFORMED_ENTRIES)  # engine errors: a total


def start_series(model: str) -> None:
    """The rare counters' series for this worker's model, at 0."""
    for counter in _RARE:
        counter.labels(model)


def start_metrics_server(port: int, addr: str = "0.0.0.0") -> None:
    """Serve /metrics from a daemon thread (prometheus-client's own HTTP server)."""
    start_http_server(port, addr=addr)

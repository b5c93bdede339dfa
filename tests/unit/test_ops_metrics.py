"""The operator-facing pieces that need no services: engine totals become counters, throughput from the
worker's counters, the access log line, the peers' metrics merged into one scrape, the serve plot."""

from __future__ import annotations

import asyncio
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from prometheus_client import REGISTRY, CollectorRegistry, Counter, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs

from gateway.access_log import logged
from gateway.metrics_peers import PeerMetrics, parse_peers
from tests.fakes import LogLines
from worker import metrics
from worker.throughput import Throughput


def _value(name: str, model: str) -> float:
    return REGISTRY.get_sample_value(name, {"model": model}) or 0.0


def test_engine_totals_become_counters_and_survive_an_engine_restart():
    model = "totals-test"

    def totals(queried: int, hits: int, preempted: int, steps: int, prefill_steps: int, tokens: int) -> dict:
        return {"prefix_queries_tokens": queried, "prefix_hit_tokens": hits, "num_preemptions": preempted,
                "launched_steps": steps, "launched_prefill_steps": prefill_steps, "launched_step_tokens": tokens}

    metrics.observe_engine_stats(model, totals(100, 40, 2, 10, 2, 900))
    metrics.observe_engine_stats(model, totals(150, 40, 3, 25, 3, 960))
    assert _value("tokenq_worker_prefix_cache_queries_total", model) == 150
    assert _value("tokenq_worker_prefix_cache_hits_total", model) == 40
    assert _value("tokenq_worker_preemptions_total", model) == 3
    assert _value("tokenq_worker_engine_steps_total", model) == 25
    assert _value("tokenq_worker_engine_prefill_steps_total", model) == 3
    assert _value("tokenq_worker_engine_step_tokens_total", model) == 960
    metrics.observe_engine_stats(model, totals(10, 5, 0, 4, 1, 100))
    assert _value("tokenq_worker_prefix_cache_queries_total", model) == 160  # a new engine counts from zero
    assert _value("tokenq_worker_prefix_cache_hits_total", model) == 45
    assert _value("tokenq_worker_engine_steps_total", model) == 29


def test_throughput_is_the_rate_of_the_generation_counter():
    model = "throughput-test"
    meter = Throughput(model, log_every_s=5.0)
    assert meter.sample(now=100.0)["generation_tokens_per_s"] == 0.0
    metrics.GENERATION_TOKENS.labels(model).inc(50)
    metrics.PROMPT_TOKENS.labels(model).inc(200)
    rates = meter.sample(now=102.0)
    assert rates["generation_tokens_per_s"] == pytest.approx(25.0)
    assert rates["prompt_tokens_per_s"] == pytest.approx(100.0)
    assert rates["generation_tokens"] == 50
    with capture_logs() as logs:
        assert not meter.maybe_log(rates, {"running": 1}, now=meter._last_log + 1)
        assert meter.maybe_log(rates, {"running": 1, "kv_usage": 0.5}, now=meter._last_log + 6)
    assert logs[0]["event"] == "throughput" and logs[0]["generation_tokens_per_s"] == 25.0


def test_access_log_line_per_request():
    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 202, "headers": []})
        await send({"type": "http.response.body", "body": b"hello"})

    sent = []

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/v1/jobs", "query_string": b"key=secret",
             "client": ("10.0.0.7", 5555)}
    with capture_logs() as logs:
        asyncio.run(logged(app, scope, None, send))
    assert len(sent) == 2
    (line,) = logs
    assert line["event"] == "request" and line["status"] == 202 and line["bytes"] == 5
    assert line["path"] == "/v1/jobs" and line["client"] == "10.0.0.7" and "secret" not in str(line)



def test_access_log_tells_a_client_that_left_from_a_failure():
    async def left(scope, receive, send):
        return None  # what a route does when its client disconnects before the answer

    async def failed(scope, receive, send):
        raise RuntimeError("boom")

    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "client": None}
    with capture_logs() as logs:
        asyncio.run(logged(left, scope, None, None))
        with pytest.raises(RuntimeError):
            asyncio.run(logged(failed, scope, None, None))
    assert [line["status"] for line in logs] == [499, 500]

def test_access_log_keeps_a_passing_health_probe_out_of_info():
    """`tokenq up` probes /readyz every 0.3 s while its worker starts, a load balancer every few seconds."""
    def answering(status):
        async def app(scope, receive, send):
            await send({"type": "http.response.start", "status": status, "headers": []})
            await send({"type": "http.response.body", "body": b"{}"})
        return app

    async def send(message):
        pass

    with capture_logs() as logs:
        for path, status in (("/readyz", 200), ("/healthz", 200), ("/readyz", 503), ("/v1/models", 200)):
            scope = {"type": "http", "method": "GET", "path": path, "client": None}
            asyncio.run(logged(answering(status), scope, None, send))
    info = [(line["path"], line["status"]) for line in logs if line["log_level"] == "info"]
    assert info == [("/readyz", 503), ("/v1/models", 200)]


def _serve(text: bytes) -> tuple[ThreadingHTTPServer, str]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            self.send_response(200)
            self.end_headers()
            self.wfile.write(text)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/metrics"


def test_peers_metrics_merge_into_one_valid_exposition():
    registry = CollectorRegistry()
    Counter("shared_events", "in both peers", ["kind"], registry=registry).labels("x").inc(3)
    text = generate_latest(registry)
    a, url_a = _serve(text)
    b, url_b = _serve(text)
    try:
        peers = PeerMetrics(parse_peers(f"worker={url_a}, webhooks={url_b}, gone=http://127.0.0.1:1/metrics"))
        out = asyncio.run(peers.render()).decode()
    finally:
        a.shutdown()
        b.shutdown()
    families = [f for f in text_string_to_metric_families(out) if f.name == "shared_events"]
    assert len(families) == 1, out  # one family, two roles: a valid exposition for Prometheus
    roles = {s.labels["role"]: s.value for s in families[0].samples if s.name == "shared_events_total"}
    assert roles == {"worker": 3.0, "webhooks": 3.0}


def test_peers_spec_errors_name_the_variable():
    with pytest.raises(ValueError, match="TOKENQ_METRICS_PEERS"):
        parse_peers("worker")


def test_serve_plot_draws_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    from tokenq.bench.plot import plot_serve, timeline

    xs, ys = timeline([[0.0, 2.0, 20], [1.0, 2.0, 10]])
    assert xs == [0.5, 1.5, 2.5] and ys == pytest.approx([10.0, 20.0, 0.0])  # 20 over 0-2 s, 10 over 1-2 s
    phase = {"ttft_ms": {"p50": 10, "p90": 20, "p99": 30}, "e2e_ms": {"p50": 100, "p90": 150, "p99": 200},
             "tpot_ms": {"p50": 5}, "output_tokens_per_s": 30, "requests_per_s": 2}
    result = {"model": "m", "device": "cpu", "phases": [
        {**phase, "rate": 1.0, "requests": [[0.0, 2.0, 20]]},
        {**phase, "rate": float("inf"), "requests": [[0.1, 1.0, 10]]}]}
    out = plot_serve(result, tmp_path / "serve.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_serve_plot_of_an_all_at_once_run_alone_draws_its_latencies(tmp_path, monkeypatch):
    """`--rate inf` alone has no offered-load axis: its percentiles are lines across, with a legend."""
    pytest.importorskip("matplotlib")
    import warnings

    import matplotlib.pyplot as plt

    from tokenq.bench.plot import plot_serve

    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    phase = {"ttft_ms": {"p50": 10, "p90": 20, "p99": 30}, "e2e_ms": {"p50": 100, "p90": 150, "p99": 200},
             "tpot_ms": {"p50": 5}, "output_tokens_per_s": 30, "requests_per_s": 2}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib warns of a legend with nothing labelled
        plot_serve({"model": "m", "device": "cpu", "phases": [{**phase, "rate": float("inf"), "requests": []}]},
                   tmp_path / "serve.png")
    ttft, e2e, _ = figures[0].axes
    assert sorted(line.get_ydata()[0] for line in ttft.lines) == [5, 10, 20, 30]  # TPOT p50 too
    assert len(e2e.lines) == 3 and ttft.get_legend() is not None
    monkeypatch.undo()
    plt.close(figures[0])


def test_bench_serve_takes_plot():
    from tokenq.cli import build_parser

    args = build_parser().parse_args(["bench", "serve", "--plot", "x.png"])
    assert args.plot == "x.png"


def test_engine_report_send_time_becomes_a_counter():
    model = "report-send-test"
    metrics.observe_engine_stats(model, {"report_send_seconds": 0.25})
    metrics.observe_engine_stats(model, {"report_send_seconds": 1.5})
    assert _value("tokenq_worker_engine_report_send_seconds_total", model) == pytest.approx(1.5)


def test_an_engine_step_that_raises_counts_as_an_engine_error():
    """The driver fails the step's requests and counts the step; the worker's counter follows that total
    (tokenq_worker_engine_errors_total, which the TokenqEngineErrors alert reads)."""
    from worker.engine_loop import EngineDriver

    class Broken:
        def step(self):
            raise RuntimeError("CUDA error: an illegal memory access")

        def abort_request(self, rid: str) -> None:
            pass

        def stats(self) -> dict:
            return {"running": 0, "waiting": 0, "kv_usage": 0.0}

    model = "engine-errors-test"
    driver = EngineDriver(Broken())
    driver.live.add("job-1")
    metrics.observe_engine_stats(model, driver.stats())
    assert REGISTRY.get_sample_value("tokenq_worker_engine_errors_total", {"model": model}) == 0.0  # not absent
    failed = driver.step()
    assert [(o.request_id, o.finish_reason) for o in failed] == [("job-1", "error")]
    metrics.observe_engine_stats(model, driver.stats())
    assert _value("tokenq_worker_engine_errors_total", model) == 1


def test_the_rare_counters_exist_at_zero_from_the_start():
    """A series born at 1 shows no increase() to an alert; started at 0, the first dead letter fires it."""
    model = "rare-series-test"
    metrics.start_series(model)
    for name in ("tokenq_worker_dead_lettered_total", "tokenq_worker_reclaimed_entries_total",
                 "tokenq_worker_released_entries_total", "tokenq_worker_malformed_entries_total",
                 "tokenq_duplicate_final_writes_total"):
        assert REGISTRY.get_sample_value(name, {"model": model}) == 0.0, name  # None when absent


def test_an_idle_workers_throughput_line_is_debug(monkeypatch):
    import worker.throughput

    log = LogLines()
    monkeypatch.setattr(worker.throughput, "log", log)
    meter = Throughput("idle-throughput-test", log_every_s=5.0)
    idle = meter.sample(now=100.0)
    assert meter.maybe_log(idle, {"running": 0, "waiting": 0}, now=meter._last_log + 6)
    assert meter.maybe_log(idle, {"running": 1, "waiting": 0}, now=meter._last_log + 6)
    assert [level for level, _ in log.lines] == ["debug", "info"]

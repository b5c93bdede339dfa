"""The alert rules, the autoscaling trigger and the Grafana dashboard query metrics by name: every name
they use must be one that the worker, the webhook service or the gateway exports, or the alert never
fires, the scaler never scales and the panel stays empty. Where promtool is installed (`make deploy-tools`),
the rules, the operator's copy of them and compose's Prometheus config pass its checks, and the alerts
fire as deploy/prometheus/rules_test.yaml says they do."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client import REGISTRY

import batches.metrics  # noqa: F401  (and the batch feeder's)
import worker.metrics  # noqa: F401  (registers the worker's metrics)
import worker.webhooks.metrics  # noqa: F401  (and the webhook service's)
from gateway.metrics import GatewayMetrics
from jobstore.memory import RedisMemory

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy/grafana/dashboards/tokenq.json"
RULES = ROOT / "deploy/prometheus/rules.yaml"
SCALER = ROOT / "deploy/k8s/base/scaledobject.yaml"
OPERATOR_RULE = ROOT / "deploy/k8s/components/monitoring/prometheusrule.yaml"

SUFFIXES = {"counter": ["_total"], "gauge": [""], "histogram": ["_bucket", "_sum", "_count"],
            "summary": ["_sum", "_count", ""]}
METRIC = re.compile(r"\btokenq_[a-z0-9_]+\b")


def exported() -> set[str]:
    """Series names as Prometheus scrapes them, including those of labelled metrics with no sample yet."""
    names: set[str] = set()
    gateway = GatewayMetrics()
    gateway.backlog.memory = RedisMemory(used_memory=1, maxmemory=0, maxmemory_policy="noeviction")  # INFO answered
    for registry in (REGISTRY, gateway.registry):
        for metric in registry.collect():
            names.update(metric.name + suffix for suffix in SUFFIXES.get(metric.type, [""]))
    return names


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every target of every panel, rows' nested panels and variables included."""
    dash = json.loads(DASHBOARD.read_text())
    out = []

    def walk(panels: list[dict]) -> None:
        for panel in panels:
            walk(panel.get("panels", []))
            out.extend((panel["title"], t["expr"]) for t in panel.get("targets", []))

    walk(dash["panels"])
    out.extend((f"variable {v['name']}", v["definition"]) for v in dash["templating"]["list"])
    return out


def rule_queries(groups: list[dict] | None = None) -> list[tuple[str, str]]:
    groups = groups if groups is not None else yaml.safe_load(RULES.read_text())["groups"]
    return [(r["alert"], r["expr"]) for g in groups for r in g["rules"]]


def operator_rule_queries() -> list[tuple[str, str]]:
    return rule_queries(yaml.safe_load(OPERATOR_RULE.read_text())["spec"]["groups"])


def scaler_queries() -> list[tuple[str, str]]:
    obj = yaml.safe_load(SCALER.read_text())
    return [("keda", t["metadata"]["query"]) for t in obj["spec"]["triggers"] if t["type"] == "prometheus"]


def _missing(queries: list[tuple[str, str]]) -> list[str]:
    names = exported()
    return sorted({f"{where}: {m}" for where, expr in queries for m in METRIC.findall(expr) if m not in names})


def test_every_dashboard_panel_queries_only_exported_metrics():
    queries = dashboard_queries()
    panels = [p for p in json.loads(DASHBOARD.read_text())["panels"] if p["type"] != "row"]
    assert panels and all(p.get("targets") for p in panels), "a panel without a query"
    assert not _missing(queries), f"dashboard queries metrics that nothing exports: {_missing(queries)}"


def test_dashboard_covers_the_serving_metrics():
    used = {m for _, expr in dashboard_queries() for m in METRIC.findall(expr)}
    for name in ("tokenq_worker_time_to_first_token_seconds_bucket", "tokenq_worker_time_per_output_token_seconds_bucket",
                 "tokenq_worker_e2e_request_latency_seconds_bucket", "tokenq_worker_queue_time_seconds_bucket",
                 "tokenq_worker_kv_cache_usage_ratio", "tokenq_worker_preemptions_total",
                 "tokenq_worker_prefix_cache_hits_total", "tokenq_worker_prefix_cache_queries_total",
                 "tokenq_webhook_deliveries_total", "tokenq_gateway_cache_hits_total", "tokenq_queue_waiting_jobs"):
        assert name in used, name


def test_alerts_and_scaler_query_only_exported_metrics():
    queries = rule_queries() + operator_rule_queries() + scaler_queries()
    assert not _missing(queries), f"deploy/ queries metrics that nothing exports: {_missing(queries)}"


def test_the_check_catches_a_misspelled_metric():
    assert _missing([("x", "sum(tokenq_worker_kv_cache_usage)")]) == ["x: tokenq_worker_kv_cache_usage"]


def test_no_worker_alert_and_scaler_read_the_gateways_backlog():
    """Both must work with zero workers, so neither may depend on a series only workers export."""
    worker_only = {n for n in exported() if n.startswith("tokenq_worker_")} | {"tokenq_queue_depth"}
    no_workers = dict(rule_queries())["TokenqNoWorkers"]
    for where, expr in [("TokenqNoWorkers", no_workers), *scaler_queries()]:
        assert not set(METRIC.findall(expr)) & worker_only, where
    assert "unless" in no_workers  # absent worker series must not silence it (`and ... == 0` would)


def promtool(*args: str, cwd: Path = ROOT) -> str:
    if shutil.which("promtool") is None:
        pytest.skip("promtool is not installed (make deploy-tools)")
    done = subprocess.run(["promtool", *args], capture_output=True, text=True, cwd=cwd)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_promtool_accepts_the_rules_and_the_operators_copy(tmp_path):
    spec = tmp_path / "operator-rules.yaml"
    spec.write_text(yaml.safe_dump(yaml.safe_load(OPERATOR_RULE.read_text())["spec"]))
    out = promtool("check", "rules", str(RULES), str(spec))
    assert out.count(f"SUCCESS: {len(rule_queries())} rules found") == 2


def test_promtool_accepts_composes_prometheus_config(tmp_path):
    """The config names the rules where compose mounts them (/etc/prometheus): here, beside a copy."""
    config = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    assert config["rule_files"] == ["/etc/prometheus/rules.yaml"]
    config["rule_files"] = ["rules.yaml"]
    for job in config["scrape_configs"]:  # the gateway's token file, made by the gateway at its first start
        if "authorization" in job:
            job["authorization"]["credentials_file"] = "metrics-token"
    (tmp_path / "metrics-token").write_text("token\n")
    (tmp_path / "rules.yaml").write_text(RULES.read_text())
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    promtool("check", "config", "prometheus.yml", cwd=tmp_path)


def test_the_alerts_fire_when_their_tests_say():
    """Among them: TokenqNoWorkers fires with no worker series at all (scaled to zero)."""
    promtool("test", "rules", "deploy/prometheus/rules_test.yaml")

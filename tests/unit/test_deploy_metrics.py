"""The alert rules and the autoscaling trigger query metrics by name: every name they use must be one
that the worker or the gateway exports, or the alert never fires and the scaler never scales."""

from __future__ import annotations

import re
from pathlib import Path

from prometheus_client import REGISTRY

import worker.metrics  # noqa: F401  (registers the worker's metrics)
from gateway.metrics import GatewayMetrics

ROOT = Path(__file__).resolve().parents[2]
FILES = [ROOT / "deploy/prometheus/rules.yaml", ROOT / "deploy/k8s/worker.yaml"]


SUFFIXES = {"counter": ["_total"], "gauge": [""], "histogram": ["_bucket", "_sum", "_count"],
            "summary": ["_sum", "_count", ""]}


def _exported() -> set[str]:
    """Series names as Prometheus scrapes them, including those of labelled metrics with no sample yet."""
    names: set[str] = set()
    for registry in (REGISTRY, GatewayMetrics().registry):
        for metric in registry.collect():
            names.update(metric.name + suffix for suffix in SUFFIXES.get(metric.type, [""]))
    return names


def test_deploy_files_query_only_exported_metrics():
    used = {name for f in FILES for name in re.findall(r"\btokenq_[a-z_]+\b", f.read_text())}
    used -= {"tokenq_worker", "tokenq_jobs"}  # not metrics: a deployment name, a key prefix in a comment
    assert {"tokenq_queue_depth", "tokenq_worker_running_requests"} <= used
    missing = sorted(n for n in used if n not in _exported())
    assert not missing, f"metrics queried in deploy/ that nothing exports: {missing}"

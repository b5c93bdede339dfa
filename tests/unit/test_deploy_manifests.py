"""The Kubernetes manifests as an operator applies them: each kustomization renders (`kubectl kustomize`,
skipped where kubectl is missing; the base's and the monitoring component's files are validated on their
own either way), every resource passes the Kubernetes schema strictly (kubernetes-validate; the KEDA and
Prometheus-operator objects, whose CRDs it does not know, field by field here), and what the deployment
needs is there: GPUs requested, --device cuda, probes, drain time, disruption budgets, scaling from zero,
the alerts compose's Prometheus loads, and commands the CLI accepts."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from tokenq.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy/k8s"
KUSTOMIZATIONS = ["base", "overlays/cpu", "overlays/external-redis", "overlays/prometheus-operator"]
MONITORING = K8S / "components/monitoring"
RULES = ROOT / "deploy/prometheus/rules.yaml"
DURATION = re.compile(r"^([0-9]+(ms|s|m|h|d|w|y))+$")  # Prometheus's duration
K8S_VERSION = "1.30.0"


def render(kustomization: str) -> list[dict]:
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl (with its built-in kustomize) is not installed")
    out = subprocess.run(["kubectl", "kustomize", str(K8S / kustomization)], check=True, capture_output=True,
                         text=True).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def files_of(folder: Path) -> list[dict]:
    docs = []
    for path in sorted(folder.glob("*.yaml")):
        if path.name != "kustomization.yaml":
            docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def validate(doc: dict) -> None:
    checks = {"ScaledObject": check_scaled_object, "PrometheusRule": check_prometheus_rule,
              "PodMonitor": check_pod_monitor}
    if doc["kind"] in checks:
        checks[doc["kind"]](doc)
        return
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def check_prometheus_rule(doc: dict) -> None:
    """The operator's PrometheusRule CRD: groups of named rules, each an alert or a recording rule with a
    PromQL string, durations in Prometheus's syntax, string labels and annotations."""
    assert doc["apiVersion"] == "monitoring.coreos.com/v1" and doc["metadata"]["name"]
    assert set(doc["spec"]) == {"groups"}
    names = [g["name"] for g in doc["spec"]["groups"]]
    assert len(names) == len(set(names)), "group names are unique"
    for group in doc["spec"]["groups"]:
        assert set(group) <= {"name", "interval", "rules", "limit", "partial_response_strategy"}, set(group)
        for rule in group["rules"]:
            assert set(rule) <= {"alert", "record", "expr", "for", "keep_firing_for", "labels", "annotations"}
            assert ("alert" in rule) != ("record" in rule), rule
            assert isinstance(rule["expr"], str) and rule["expr"].strip()
            for key in ("for", "keep_firing_for"):
                assert key not in rule or DURATION.match(rule[key]), rule[key]
            for key in ("labels", "annotations"):
                assert all(isinstance(v, str) for v in rule.get(key, {}).values()), rule[key]


def check_pod_monitor(doc: dict) -> None:
    """The operator's PodMonitor CRD: a pod selector and endpoints by container port name."""
    assert doc["apiVersion"] == "monitoring.coreos.com/v1" and doc["metadata"]["name"]
    assert set(doc["spec"]) <= {"selector", "podMetricsEndpoints", "namespaceSelector", "jobLabel"}
    assert set(doc["spec"]["selector"]) <= {"matchLabels", "matchExpressions"}
    for endpoint in doc["spec"]["podMetricsEndpoints"]:
        assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout", "relabelings", "metricRelabelings"}
        assert endpoint["port"] and endpoint["path"].startswith("/")


def check_scaled_object(doc: dict) -> None:
    """KEDA's CRD is not in kubernetes-validate's schemas: the fields KEDA requires, by hand."""
    assert doc["apiVersion"] == "keda.sh/v1alpha1"
    spec = doc["spec"]
    assert spec["scaleTargetRef"]["name"]
    for trigger in spec["triggers"]:
        assert trigger["type"] and isinstance(trigger["metadata"], dict)
        assert all(isinstance(v, str) for v in trigger["metadata"].values()), "KEDA metadata values are strings"


def by_kind(docs: list[dict], kind: str, name: str) -> dict:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"].startswith(name)]
    assert found, f"no {kind} {name}"
    return found[0]


def containers(deployment: dict) -> list[dict]:
    spec = deployment["spec"]["template"]["spec"]
    return spec.get("initContainers", []) + spec["containers"]


def test_the_validator_rejects_a_misspelled_field():
    bad = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "x"},
           "spec": {"replicas": 1, "selector": {"matchLabels": {"a": "b"}},
                    "template": {"metadata": {"labels": {"a": "b"}},
                                 "spec": {"containers": [{"name": "c", "image": "i", "argz": []}]}}}}
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(bad)


def test_base_and_component_files_validate_without_kustomize():
    docs = files_of(K8S / "base") + files_of(MONITORING)
    assert {d["kind"] for d in docs} >= {"Deployment", "StatefulSet", "Service", "PodDisruptionBudget",
                                         "PersistentVolumeClaim", "ScaledObject", "PrometheusRule", "PodMonitor"}
    for doc in docs:
        validate(doc)


def test_the_crd_checks_reject_what_the_operator_would():
    rule = {"apiVersion": "monitoring.coreos.com/v1", "kind": "PrometheusRule", "metadata": {"name": "x"},
            "spec": {"groups": [{"name": "g", "rules": [{"alert": "A", "expr": "up == 0", "for": "5 minutes"}]}]}}
    with pytest.raises(AssertionError):
        validate(rule)
    monitor = {"apiVersion": "monitoring.coreos.com/v1", "kind": "PodMonitor", "metadata": {"name": "x"},
               "spec": {"selector": {}, "podMetricsEndpoints": [{"prot": "metrics", "path": "/metrics"}]}}
    with pytest.raises(AssertionError):
        validate(monitor)


def test_the_prometheus_rule_carries_the_alerts_compose_loads():
    """One source: deploy/prometheus/rules.yaml; `make prometheus-rule` writes the operator's copy."""
    rule = by_kind(files_of(MONITORING), "PrometheusRule", "tokenq")
    assert rule["spec"] == yaml.safe_load(RULES.read_text()), "run `make prometheus-rule`"


def test_prometheus_operator_overlay_monitors_every_role():
    docs = render("overlays/prometheus-operator")
    assert {d["metadata"].get("namespace") for d in docs if d["kind"] != "Namespace"} == {"tokenq"}
    monitor = by_kind(docs, "PodMonitor", "tokenq")["spec"]
    ports = {e["port"] for e in monitor["podMetricsEndpoints"]}
    selected = set(monitor["selector"]["matchExpressions"][0]["values"])
    for deployment in (d for d in docs if d["kind"] == "Deployment"):
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        named = {p["name"] for c in deployment["spec"]["template"]["spec"]["containers"] for p in c.get("ports", [])}
        annotated = deployment["spec"]["template"]["metadata"].get("annotations", {}).get("prometheus.io/scrape")
        # What the annotations ask a plain Prometheus to scrape, the PodMonitor scrapes under the operator.
        assert (labels["app"] in selected and bool(named & ports)) == (annotated == "true"), labels["app"]
    trigger = by_kind(docs, "ScaledObject", "tokenq-worker")["spec"]["triggers"][0]["metadata"]
    assert trigger["serverAddress"].startswith("http://prometheus-operated.")


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_every_rendered_manifest_validates(kustomization):
    docs = render(kustomization)
    for doc in docs:
        validate(doc)
    for deployment in (d for d in docs if d["kind"] == "Deployment"):
        for c in containers(deployment):
            assert ":" in c["image"] and not c["image"].endswith(":latest"), c["image"]
            assert c["args"][0] == "tokenq"
            build_parser().parse_args(c["args"][1:])  # exits (fails the test) on a flag the CLI lacks
        assert deployment["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True


def test_gpu_workers_request_gpus_drain_and_scale_from_zero():
    docs = render("base")
    worker = by_kind(docs, "Deployment", "tokenq-worker")
    spec = worker["spec"]["template"]["spec"]
    main = spec["containers"][0]
    assert main["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert main["args"][main["args"].index("--device") + 1] == "cuda"
    assert main["startupProbe"] and main["livenessProbe"]
    config = by_kind(docs, "ConfigMap", "tokenq")["data"]
    assert spec["terminationGracePeriodSeconds"] > float(config["TOKENQ_DRAIN_GRACE_S"])
    assert config["TOKENQ_REQUIRE_AUTH"] == "1"
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["models"]["persistentVolumeClaim"]["claimName"] == "tokenq-models"
    assert spec["initContainers"][0]["args"] == ["tokenq", "models", "pull"]
    scaler = by_kind(docs, "ScaledObject", "tokenq-worker")["spec"]
    assert scaler["minReplicaCount"] == 0 and scaler["scaleTargetRef"]["name"] == "tokenq-worker"
    assert scaler["triggers"][0]["metadata"]["activationThreshold"] == "0"
    for name in ("tokenq-gateway", "tokenq-worker", "tokenq-webhooks"):
        by_kind(docs, "PodDisruptionBudget", name)
    gateway = by_kind(docs, "Deployment", "tokenq-gateway")["spec"]["template"]["spec"]
    assert gateway["containers"][0]["readinessProbe"] and gateway["containers"][0]["lifecycle"]["preStop"]
    assert gateway["initContainers"][0]["args"][-1] == "--if-none"
    # The generated Secret's hashed name is what every pod reads.
    secret = by_kind(docs, "Secret", "tokenq")["metadata"]["name"]
    refs = {e["valueFrom"]["secretKeyRef"]["name"] for d in docs if d["kind"] == "Deployment"
            for c in containers(d) for e in c.get("env", []) if "valueFrom" in e}
    assert refs == {secret}


def test_every_role_tokenq_up_runs_has_a_deployment():
    from tests.unit.test_compose_file import up_roles

    args = {c["args"][1] for d in render("base") if d["kind"] == "Deployment"
            for c in d["spec"]["template"]["spec"]["containers"]}
    assert up_roles() <= args, f"no Deployment runs {up_roles() - args}"


def test_keda_owns_the_worker_replicas_and_scales_the_configured_model():
    docs = render("base")
    # A replicas field would be applied again on every `kubectl apply`, draining KEDA's workers.
    assert "replicas" not in by_kind(docs, "Deployment", "tokenq-worker")["spec"]
    model = by_kind(docs, "ConfigMap", "tokenq")["data"]["TOKENQ_MODEL"]
    scaler = by_kind(docs, "ScaledObject", "tokenq-worker")["spec"]
    assert set(re.findall(r'model="([^"]+)"', scaler["triggers"][0]["metadata"]["query"])) == {model}
    # The first worker publishes the model card (jobs queue only for a model some worker has served):
    # KEDA must not scale it away before its startup probe gives up on it.
    probe = by_kind(docs, "Deployment", "tokenq-worker")["spec"]["template"]["spec"]["containers"][0]["startupProbe"]
    assert scaler["initialCooldownPeriod"] >= probe["periodSeconds"] * probe["failureThreshold"]


def test_cpu_overlay_runs_cpu_workers_without_gpus():
    docs = render("overlays/cpu")
    assert by_kind(docs, "Deployment", "tokenq-worker")["spec"]["replicas"] == 1  # no KEDA there
    main = by_kind(docs, "Deployment", "tokenq-worker")["spec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in main["resources"]["limits"]
    assert main["args"][main["args"].index("--device") + 1] == "cpu"
    assert not [d for d in docs if d["kind"] == "ScaledObject"]


def test_external_redis_overlay_drops_the_bundled_redis():
    docs = render("overlays/external-redis")
    assert not [d for d in docs if d["kind"] == "StatefulSet"]
    assert not [d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == "tokenq-redis"]

"""The Kubernetes manifests as an operator applies them: each kustomization renders (`kubectl kustomize`,
skipped where kubectl is missing; the base's files are validated on their own either way), every
resource passes the Kubernetes schema strictly (kubernetes-validate), and what the deployment needs is
there: GPUs requested, --device cuda, probes, drain time, disruption budgets, scaling from zero, and
commands the CLI accepts."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from tokenq.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy/k8s"
KUSTOMIZATIONS = ["base", "overlays/cpu", "overlays/external-redis"]
K8S_VERSION = "1.30.0"


def render(kustomization: str) -> list[dict]:
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl (with its built-in kustomize) is not installed")
    out = subprocess.run(["kubectl", "kustomize", str(K8S / kustomization)], check=True, capture_output=True,
                         text=True).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def base_files() -> list[dict]:
    docs = []
    for path in sorted((K8S / "base").glob("*.yaml")):
        if path.name != "kustomization.yaml":
            docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def validate(doc: dict) -> None:
    if doc["kind"] == "ScaledObject":
        check_scaled_object(doc)
        return
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


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


def test_base_files_validate_without_kustomize():
    docs = base_files()
    assert {d["kind"] for d in docs} >= {"Deployment", "StatefulSet", "Service", "PodDisruptionBudget",
                                         "PersistentVolumeClaim", "ScaledObject"}
    for doc in docs:
        validate(doc)


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


def test_cpu_overlay_runs_cpu_workers_without_gpus():
    docs = render("overlays/cpu")
    main = by_kind(docs, "Deployment", "tokenq-worker")["spec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in main["resources"]["limits"]
    assert main["args"][main["args"].index("--device") + 1] == "cpu"
    assert not [d for d in docs if d["kind"] == "ScaledObject"]


def test_external_redis_overlay_drops_the_bundled_redis():
    docs = render("overlays/external-redis")
    assert not [d for d in docs if d["kind"] == "StatefulSet"]
    assert not [d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == "tokenq-redis"]

"""docker-compose.yml as an operator runs it: it parses (`docker compose config` where a compose CLI is
installed, YAML with its references checked everywhere), and what the stack needs is there: Redis with
AOF and a health check, every role including the webhook deliverer, keys required, a GPU profile that
reserves GPUs, restart policies, Prometheus scraping every role's port, Grafana provisioned. The images
themselves: test_docker_images.py."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tokenq.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
INIT_STEPS = {"models", "keys"}


def up_roles() -> set[str]:
    """The roles `tokenq up` runs (tokenq/supervisor.py spawns each as `tokenq ROLE ...`)."""
    roles = set(re.findall(r'_spawn\(\s*\[\s*"(\w+)"', (ROOT / "tokenq/supervisor.py").read_text()))
    assert {"gateway", "worker", "webhooks"} <= roles, roles
    return roles


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def services() -> dict[str, dict]:
    return compose()["services"]


def compose_cli() -> list[str] | None:
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


@pytest.mark.parametrize("profile", [[], ["--profile", "gpu"]])
def test_compose_config_accepts_it(profile):
    cli = compose_cli()
    if cli is None:
        pytest.skip("no docker compose CLI installed")
    done = subprocess.run([*cli, "-f", str(COMPOSE), *profile, "config", "-q"], capture_output=True, text=True,
                          cwd=ROOT)
    assert done.returncode == 0, done.stderr


def test_every_tokenq_command_is_one_the_cli_accepts():
    tokenq = {name: s for name, s in services().items() if s.get("command", [""])[0] == "tokenq"}
    assert set(tokenq) >= {"worker-gpu", *up_roles(), *INIT_STEPS}, "a role `tokenq up` runs is missing"
    for service in tokenq.values():
        build_parser().parse_args(service["command"][1:])  # exits (fails) on an unknown flag
        assert service["environment"]["TOKENQ_REDIS_URL"].startswith("redis://redis:")


def test_references_resolve():
    doc = compose()
    svcs = doc["services"]
    for name, service in svcs.items():
        for dep in service.get("depends_on", {}):
            assert dep in svcs, f"{name} depends on unknown {dep}"
            condition = service["depends_on"][dep]["condition"] if isinstance(service["depends_on"], dict) else None
            if condition == "service_healthy":
                assert "healthcheck" in svcs[dep], f"{name} waits for {dep} to be healthy; it has no healthcheck"
            if condition == "service_completed_successfully":
                assert dep in INIT_STEPS
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), f"{name} mounts missing {source}"
            else:
                assert source in doc["volumes"], f"{name} uses undeclared volume {source}"


def test_redis_keeps_an_append_only_file_and_reports_health():
    redis = services()["redis"]
    assert "--appendonly" in redis["command"] and redis["command"][redis["command"].index("--appendonly") + 1] == "yes"
    assert redis["healthcheck"]["test"][-1] == "ping"


def test_long_running_services_restart_and_init_steps_do_not():
    for name, service in services().items():
        assert service.get("restart") == ("no" if name in INIT_STEPS else "unless-stopped"), name


def test_only_the_gateway_is_published_beyond_this_host_and_workers_drain_before_the_kill():
    for name, service in services().items():
        for port in service.get("ports", []):
            assert name == "gateway" or port.startswith("127.0.0.1:"), f"{name} publishes {port} to every address"
    for name in ("worker", "worker-gpu"):
        service = services()[name]
        grace = float(service["stop_grace_period"].removesuffix("s"))
        assert grace > float(service["environment"]["TOKENQ_DRAIN_GRACE_S"]), name


def test_keys_are_required():
    svcs = services()
    assert svcs["keys"]["command"][1:4] == ["keys", "create", "--tenant"] and "--if-none" in svcs["keys"]["command"]
    assert svcs["gateway"]["depends_on"]["keys"]["condition"] == "service_completed_successfully"
    assert svcs["gateway"]["environment"]["TOKENQ_REQUIRE_AUTH"] == "1"


def test_model_pulled_once_onto_the_volume_workers_share(monkeypatch):
    svcs = services()
    assert svcs["models"]["command"] == ["tokenq", "models", "pull"]
    store = "models:/var/lib/tokenq/models"
    for name in ("models", "worker", "worker-gpu"):
        assert store in svcs[name]["volumes"], name
    for name in ("worker", "worker-gpu"):
        assert svcs[name]["depends_on"]["models"]["condition"] == "service_completed_successfully"
    # The init step pulls the model the workers serve: `models pull` without a name reads TOKENQ_MODEL.
    monkeypatch.setenv("TOKENQ_MODEL", "another-model")
    assert build_parser().parse_args(svcs["models"]["command"][1:]).name == "another-model"


def test_gpu_profile_reserves_gpus_and_runs_cuda():
    gpu = services()["worker-gpu"]
    assert gpu["profiles"] == ["gpu"]
    assert gpu["command"][gpu["command"].index("--device") + 1] == "cuda"
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]
    assert gpu["shm_size"] == "8gb"  # as the Kubernetes worker's /dev/shm
    assert gpu["build"]["dockerfile"] == "Dockerfile.cuda" and (ROOT / "Dockerfile.cuda").exists()


def test_prometheus_scrapes_every_role_on_its_port():
    svcs = services()
    config = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    targets = {t for job in config["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]}
    for name in ("worker", "worker-gpu", "webhooks"):
        cmd = svcs[name]["command"]
        assert f"{name}:{cmd[cmd.index('--metrics-port') + 1]}" in targets
    gateway = svcs["gateway"]["command"]
    assert f"gateway:{gateway[gateway.index('--port') + 1]}" in targets
    assert config["rule_files"] == ["/etc/prometheus/rules.yaml"]


def test_prometheus_reads_the_token_the_gateways_metrics_ask_for():
    """Port 8000 is public and /metrics names tenants: the gateway makes a token in a file on a volume that
    Prometheus mounts, and sends it on the gateway's job alone."""
    svcs = services()
    config = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    gateway_file = Path(svcs["gateway"]["environment"]["TOKENQ_METRICS_TOKEN_FILE"])
    gateway_mounts = {v.split(":")[0]: v.split(":")[1] for v in svcs["gateway"]["volumes"]}
    prometheus_mounts = {v.split(":")[0]: v.split(":")[1] for v in svcs["prometheus"]["volumes"]}
    volume = next(name for name, at in gateway_mounts.items() if at == str(gateway_file.parent))
    assert volume in yaml.safe_load((ROOT / "docker-compose.yml").read_text())["volumes"]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    credentials = Path(jobs["tokenq-gateway"]["authorization"]["credentials_file"])
    assert prometheus_mounts[volume] == str(credentials.parent) and credentials.name == gateway_file.name
    assert all("authorization" not in job for name, job in jobs.items() if name != "tokenq-gateway")
    for dockerfile in ("Dockerfile", "Dockerfile.cuda"):  # the volume takes the image folder's owner
        assert str(gateway_file.parent) in (ROOT / dockerfile).read_text()


def test_grafana_is_provisioned_with_the_dashboard():
    grafana = services()["grafana"]
    mounts = dict(v.split(":")[:2] for v in grafana["volumes"])
    provider = yaml.safe_load((ROOT / "deploy/grafana/provisioning/dashboards/tokenq.yml").read_text())
    dashboards_in_container = provider["providers"][0]["options"]["path"]
    assert mounts["./deploy/grafana/dashboards"] == dashboards_in_container
    assert (ROOT / "deploy/grafana/dashboards/tokenq.json").exists()
    datasource = yaml.safe_load((ROOT / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text())
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"


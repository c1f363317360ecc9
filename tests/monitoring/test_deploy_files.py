"""The deployment files, checked offline (no Docker engine or cluster runs here).

- deploy/k8s: rendered like `kustomize build` does for what the kustomization uses (resources,
  configMapGenerator with its name hash, labels, images; `render_kustomization` below, since no kustomize
  binary is available), then every manifest validated against the Kubernetes schemas bundled by
  kubernetes-validate.
- docker-compose.yml: validated against the Compose Specification's JSON schema (vendored in
  tests/monitoring/schemas/), and its Prometheus wiring checked.
- Prometheus' config (`promtool check config`), Alertmanager's (`amtool check-config`), the Grafana
  dashboard and its provisioning.
"""

import copy
import hashlib
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from django.conf import settings

from datacollector.config import load_config
from tests.monitoring.test_alert_rules import exported_names

BASE = Path(settings.BASE_DIR)
K8S = BASE / "deploy" / "k8s"
KUBERNETES_VERSION = "1.30.0"


def render_kustomization(root: Path) -> list[dict[str, Any]]:
    """The manifests `kustomize build root` outputs, for the fields this kustomization uses."""
    kustomization = yaml.safe_load((root / "kustomization.yaml").read_text())
    unknown = set(kustomization) - {"apiVersion", "kind", "labels", "resources", "configMapGenerator", "images"}
    assert not unknown, f"render_kustomization does not implement {unknown}"
    docs = [
        doc
        for resource in kustomization["resources"]
        for doc in yaml.safe_load_all((root / resource).read_text())
        if doc is not None
    ]
    renamed = {}
    for generator in kustomization.get("configMapGenerator", []):
        data = {Path(name).name: (root / name).read_text() for name in generator["files"]}
        config_map = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": generator["name"]}, "data": data}
        # kustomize appends a hash of the content, so a changed config rolls the pods that mount it.
        digest = hashlib.sha256(json.dumps(config_map, sort_keys=True).encode()).hexdigest()[:10]
        renamed[generator["name"]] = config_map["metadata"]["name"] = f"{generator['name']}-{digest}"
        docs.append(config_map)
    images = {image["name"]: f"{image['newName']}:{image['newTag']}" for image in kustomization.get("images", [])}
    for doc in docs:
        for pairs in kustomization.get("labels", []):
            doc["metadata"].setdefault("labels", {}).update(pairs["pairs"])
        pod = pod_spec(doc)
        if pod is None:
            continue
        for volume in pod.get("volumes", []):
            if "configMap" in volume:
                volume["configMap"]["name"] = renamed.get(volume["configMap"]["name"], volume["configMap"]["name"])
        for container in pod["containers"]:
            container["image"] = images.get(container["image"], container["image"])
            for source in container.get("envFrom", []):
                if "configMapRef" in source:
                    source["configMapRef"]["name"] = renamed.get(source["configMapRef"]["name"])
    return docs


def pod_spec(doc: dict[str, Any]) -> dict[str, Any] | None:
    if doc["kind"] in {"Deployment", "Job", "StatefulSet", "DaemonSet"}:
        return doc["spec"]["template"]["spec"]
    return None


@pytest.fixture(scope="module")
def manifests() -> dict[tuple[str, str], dict[str, Any]]:
    return {(doc["kind"], doc["metadata"]["name"]): doc for doc in render_kustomization(K8S)}


def test_every_rendered_manifest_is_valid_against_the_kubernetes_schemas(manifests) -> None:
    assert {kind for kind, _name in manifests} == {
        "Deployment",
        "Service",
        "Job",
        "PodDisruptionBudget",
        "ConfigMap",
    }
    for doc in manifests.values():
        # strict: unknown fields (a typo such as `readinessprobe`) are errors too.
        kubernetes_validate.validate(copy.deepcopy(doc), KUBERNETES_VERSION, strict=True)


def test_a_misspelt_field_is_caught_by_the_validation(manifests) -> None:
    broken = copy.deepcopy(manifests[("Deployment", "datacollector-web")])
    broken["spec"]["template"]["spec"]["containers"][0]["readinessprobe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def test_the_web_is_probed_on_health_and_ready_and_served_by_a_service(manifests) -> None:
    web = manifests[("Deployment", "datacollector-web")]
    container = web["spec"]["template"]["spec"]["containers"][0]
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert container["readinessProbe"]["httpGet"]["path"] == "/health/ready"
    service = manifests[("Service", "datacollector-web")]
    assert service["spec"]["selector"].items() <= web["spec"]["template"]["metadata"]["labels"].items()
    assert service["spec"]["ports"][0]["targetPort"] == container["ports"][0]["name"]


def test_schedulers_run_replicas_under_a_disruption_budget_and_expose_metrics(manifests) -> None:
    scheduler = manifests[("Deployment", "datacollector-scheduler")]
    budget = manifests[("PodDisruptionBudget", "datacollector-scheduler")]
    assert scheduler["spec"]["replicas"] >= 2
    assert budget["spec"]["minAvailable"] < scheduler["spec"]["replicas"]
    labels = scheduler["spec"]["template"]["metadata"]["labels"]
    assert budget["spec"]["selector"]["matchLabels"].items() <= labels.items()
    container = scheduler["spec"]["template"]["spec"]["containers"][0]
    assert "--metrics-port=9100" in container["command"]
    assert "--metrics-address=0.0.0.0" in container["command"]
    assert {"name": "metrics", "containerPort": 9100} in container["ports"]


def test_every_pod_requests_resources_reads_the_secret_and_mounts_the_generated_config(manifests) -> None:
    config_maps = [name for kind, name in manifests if kind == "ConfigMap"]
    assert len(config_maps) == 1
    assert re.fullmatch(r"collector-config-[0-9a-f]{10}", config_maps[0])
    pods = [pod_spec(doc) for doc in manifests.values() if pod_spec(doc) is not None]
    assert len(pods) == 3  # web, scheduler, migration Job
    for pod in pods:
        assert {"name": "collector-config", "configMap": {"name": config_maps[0]}} in pod["volumes"]
        for container in pod["containers"]:
            assert container["resources"]["requests"].keys() == {"cpu", "memory"}
            assert {"secretRef": {"name": "datacollector"}} in container["envFrom"]
            assert container["image"] == "ghcr.io/example/datacollector:latest"
    job = manifests[("Job", "datacollector-migrate")]
    assert job["spec"]["template"]["spec"]["containers"][0]["command"][-2:] == ["migrate", "--noinput"]


def test_the_cluster_collector_config_loads() -> None:
    config = load_config(K8S / "collector.yaml")
    assert config.scheduler.workers >= 1


def test_docker_compose_follows_the_compose_specification() -> None:
    schema = json.loads((Path(__file__).parent / "schemas" / "compose-spec.json").read_text())
    validator = jsonschema.Draft7Validator(schema)  # the schema's own draft
    compose = yaml.safe_load((BASE / "docker-compose.yml").read_text())

    validator.validate(compose)
    # The same check refuses what the specification does not know, e.g. a misspelt key.
    assert not validator.is_valid({**compose, "services": {"web": {"image": "x", "restart_policy": "always"}}})


def test_docker_compose_runs_the_monitoring_and_schedulers_expose_metrics() -> None:
    compose = yaml.safe_load((BASE / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"prometheus", "alertmanager", "grafana", "web", "scheduler"} <= services.keys()
    assert "--metrics-port 9100" in services["scheduler"]["command"]
    assert "--metrics-address 0.0.0.0" in services["scheduler"]["command"]
    mounts = " ".join(services["prometheus"]["volumes"])
    assert "./deploy/prometheus/alerts.yml:/etc/prometheus/alerts.yml" in mounts
    assert "./deploy/prometheus/prometheus.yml:/etc/prometheus/prometheus.yml" in mounts
    prometheus = yaml.safe_load((BASE / "deploy" / "prometheus" / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in prometheus["scrape_configs"]}
    assert jobs["web"]["static_configs"][0]["targets"] == ["web:8000"]
    assert jobs["scheduler"]["dns_sd_configs"][0] == {
        "names": ["scheduler"],
        "type": "A",
        "port": 9100,
        "refresh_interval": "30s",
    }


def test_the_prometheus_config_is_valid(tmp_path) -> None:
    result = subprocess.run(
        ["promtool", "check", "config", str(BASE / "deploy" / "prometheus" / "prometheus.yml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.skipif(shutil.which("amtool") is None, reason="amtool (Debian prometheus-alertmanager) not installed")
def test_the_alertmanager_config_is_valid() -> None:
    result = subprocess.run(
        ["amtool", "check-config", str(BASE / "deploy" / "alertmanager" / "alertmanager.yml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_alertmanager_config_routes_to_defined_receivers() -> None:
    config = yaml.safe_load((BASE / "deploy" / "alertmanager" / "alertmanager.yml").read_text())
    receivers = {receiver["name"] for receiver in config["receivers"]}
    routes = [config["route"], *config["route"].get("routes", [])]
    assert all(route["receiver"] in receivers for route in routes)


@pytest.mark.django_db
def test_the_grafana_dashboard_is_provisioned_and_plots_exported_metrics() -> None:
    grafana = BASE / "deploy" / "grafana"
    dashboard = json.loads((grafana / "dashboards" / "datacollector.json").read_text())
    provider = yaml.safe_load((grafana / "provisioning" / "dashboards" / "datacollector.yml").read_text())
    datasource = yaml.safe_load((grafana / "provisioning" / "datasources" / "prometheus.yml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
    uid = datasource["datasources"][0]["uid"]

    titles = " ".join(panel["title"] for panel in dashboard["panels"]).lower()
    for subject in ("candles stored", "budget use", "429", "freshness", "failing jobs", "run durations"):
        assert subject in titles
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    referenced = {name for expr in exprs for name in re.findall(r"\b(?:dc|data_collector)_[a-z_]+", expr)}
    exported = exported_names()
    assert {re.sub(r"_(bucket|count|sum)$", "", name) for name in referenced} - exported == set()
    assert all(panel["datasource"]["uid"] == uid for panel in dashboard["panels"])

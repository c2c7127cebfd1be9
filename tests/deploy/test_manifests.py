"""deploy/ checks that run offline, with no cluster.

No Kubernetes or Ray cluster can run here, so these tests validate the files instead:
- every Kubernetes manifest against the official OpenAPI-derived JSON schemas bundled in
  the `kubernetes-validate` package (strict: unknown fields fail), for an old and the latest
  bundled Kubernetes version, plus consistency checks (selectors, ports, probes, GPUs,
  the CLI commands the containers run);
- the Ray cluster launcher YAML parses and places the roles on distinct node types
  (and validates against Ray's own schema when Ray is installed);
- the Grafana dashboard is valid JSON and references only the metrics splitserve exports;
- the Dockerfile has the expected shape.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"

HISTOGRAMS = {
    "splitserve_time_to_first_token_seconds",
    "splitserve_inter_token_latency_seconds",
    "splitserve_e2e_latency_seconds",
}
COUNTERS = {"splitserve_requests_total", "splitserve_prefill_decisions_total"}
GAUGES = {"splitserve_requests_in_flight", "splitserve_requests_queued", "splitserve_kv_cache_usage"}
METRIC_LABELS = {"status", "kind", "worker", "le", "job", "instance"}
SERIES = COUNTERS | GAUGES | {h + s for h in HISTOGRAMS for s in ("_bucket", "_sum", "_count")}


def k8s_docs() -> list[tuple[str, dict]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                docs.append((path.name, doc))
    return docs


def by_kind(kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for _, d in k8s_docs() if d["kind"] == kind}


# ------------------------------------------------------------------ Kubernetes
def test_manifest_set_is_complete():
    kinds = {(d["kind"], d.get("metadata", {}).get("name")) for _, d in k8s_docs()}
    assert {
        ("StatefulSet", "etcd"), ("Service", "etcd"), ("Service", "etcd-headless"),
        ("Deployment", "splitserve-frontend"), ("Service", "splitserve-frontend"),
        ("Deployment", "splitserve-prefill"), ("Deployment", "splitserve-decode"),
        ("ConfigMap", "splitserve-config"),
    } <= kinds
    kustomization = next(d for _, d in k8s_docs() if d["kind"] == "Kustomization")
    listed = set(kustomization["resources"])
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk


@pytest.mark.parametrize("k8s_version", ["1.29.0", "latest"])
def test_manifests_match_kubernetes_schemas(k8s_version):
    kv = pytest.importorskip(
        "kubernetes_validate", reason="kubernetes-validate (PyPI) bundles the schemas used here"
    )
    from kubernetes_validate.utils import latest_version

    version = latest_version() if k8s_version == "latest" else k8s_version
    checked = 0
    for name, doc in k8s_docs():
        if doc["kind"] == "Kustomization":  # a kustomize file, not an API object
            continue
        try:
            kv.validate(doc, version, strict=True)
        except kv.ValidationError as exc:
            pytest.fail(f"{name}: {doc['kind']}/{doc['metadata']['name']} invalid for k8s {version}: {exc.message} at {list(exc.path)}")
        checked += 1
    assert checked >= 8


def test_services_select_their_pods():
    workloads = {**by_kind("Deployment"), **by_kind("StatefulSet")}
    for name, svc in by_kind("Service").items():
        selector = svc["spec"]["selector"]
        targets = [w for w in workloads.values()
                   if selector.items() <= w["spec"]["template"]["metadata"]["labels"].items()]
        assert targets, f"Service {name} selects no pods"
        ports = {p["name"] for w in targets for c in w["spec"]["template"]["spec"]["containers"] for p in c["ports"]}
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in ports, f"Service {name} targets unknown port {port['targetPort']}"
    for name, w in workloads.items():
        assert w["spec"]["selector"]["matchLabels"].items() <= w["spec"]["template"]["metadata"]["labels"].items(), name


def _container(name: str) -> dict:
    return by_kind("Deployment")[name]["spec"]["template"]["spec"]["containers"][0]


def test_frontend_runs_the_cli_and_probes_health():
    c = _container("splitserve-frontend")
    assert c["args"] == ["frontend", "--discovery", "etcd://etcd:2379", "--host", "0.0.0.0", "--port", "8000"]
    for probe in ("readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"]["path"] == "/health"
        assert c[probe]["httpGet"]["port"] == "http"
    assert by_kind("Service")["etcd"]["spec"]["ports"][0]["port"] == 2379


@pytest.mark.parametrize("role", ["prefill", "decode"])
def test_workers_request_gpus_and_probe_grpc_port(role):
    c = _container(f"splitserve-{role}")
    assert c["args"] == ["worker", "--role", role, "--discovery", "etcd://etcd:2379",
                         "--host", "0.0.0.0", "--port", "9000"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert c["resources"]["requests"]["nvidia.com/gpu"] == 1
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["tcpSocket"]["port"] == "grpc"
    assert {"name": "grpc", "containerPort": 9000} in c["ports"]
    assert c["envFrom"] == [{"configMapRef": {"name": "splitserve-config"}}]
    spec = by_kind("Deployment")[f"splitserve-{role}"]["spec"]["template"]["spec"]
    assert spec["terminationGracePeriodSeconds"] >= 60  # room for the SIGTERM drain


def test_config_map_references_exist():
    maps = set(by_kind("ConfigMap"))
    for _, doc in k8s_docs():
        if doc["kind"] not in ("Deployment", "StatefulSet"):
            continue
        for c in doc["spec"]["template"]["spec"]["containers"]:
            for ref in c.get("envFrom", []):
                assert ref["configMapRef"]["name"] in maps


# ------------------------------------------------------------------ Ray
def test_ray_cluster_yaml():
    cfg = yaml.safe_load((DEPLOY / "ray" / "cluster.yaml").read_text())
    assert cfg["cluster_name"] and cfg["provider"]["type"]
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    assert "GPU" not in types[cfg["head_node_type"]]["resources"]
    roles = {}
    for name, node in types.items():
        for role in ("prefill", "decode"):
            if node["resources"].get(f"splitserve_{role}"):
                roles[role] = name
                assert node["resources"]["GPU"] >= 1
        assert 0 <= node["min_workers"] <= node["max_workers"]
    assert set(roles) == {"prefill", "decode"} and roles["prefill"] != roles["decode"]
    assert sum(n["max_workers"] for n in types.values()) <= cfg["max_workers"]
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        assert all(isinstance(c, str) for c in cfg[key])
    assert any("ray start --head" in c for c in cfg["head_start_ray_commands"])
    assert any("etcd" in c for c in cfg["head_start_ray_commands"])


def test_ray_cluster_yaml_matches_rays_schema():
    ray_autoscaler = pytest.importorskip("ray.autoscaler", reason="Ray not installed: its cluster schema ships with it")
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((Path(ray_autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(yaml.safe_load((DEPLOY / "ray" / "cluster.yaml").read_text()), schema)


# ------------------------------------------------------------------ Grafana
def _dashboard() -> dict:
    return json.loads((DEPLOY / "grafana" / "splitserve-dashboard.json").read_text())


def _exprs(dash: dict) -> list[str]:
    exprs = []
    for panel in dash["panels"]:
        for sub in [panel, *panel.get("panels", [])]:
            exprs += [t["expr"] for t in sub.get("targets", [])]
    return exprs


def test_dashboard_references_only_known_metrics():
    dash = _dashboard()
    assert dash["title"] and dash["uid"]
    exprs = _exprs(dash)
    assert exprs
    used = {m for e in exprs for m in re.findall(r"\bsplitserve_[a-z0-9_]+", e)}
    unknown = used - SERIES
    assert not unknown, f"dashboard uses metrics splitserve does not export: {sorted(unknown)}"
    base = {m.removesuffix("_bucket").removesuffix("_sum").removesuffix("_count") for m in used}
    assert HISTOGRAMS | COUNTERS | GAUGES <= base, "every exported metric has a panel"
    for e in exprs:
        for group in re.findall(r"\bby\s*\(([^)]*)\)", e):
            labels = {x.strip() for x in group.split(",") if x.strip()}
            assert labels <= METRIC_LABELS, (e, labels)
        assert e.count("(") == e.count(")"), e
    for panel in dash["panels"]:
        assert {"x", "y", "w", "h"} <= panel["gridPos"].keys()
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))


# ------------------------------------------------------------------ Docker
def test_dockerfile_shape():
    text = (DEPLOY / "docker" / "Dockerfile").read_text()
    assert re.search(r"^FROM \S+ AS build$", text, re.M)
    assert re.search(r'^ENTRYPOINT \["splitserve"\]$', text, re.M)
    assert re.search(r"^EXPOSE 8000 9000$", text, re.M)
    assert re.search(r"^USER 1000$", text, re.M)
    assert (DEPLOY / "docker" / "Dockerfile.dockerignore").read_text().count(".venv")

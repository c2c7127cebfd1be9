"""Connectors: registry, dry-run, Kubernetes against a fake AppsV1Api."""

from __future__ import annotations

import importlib.util
import json
from types import SimpleNamespace

import pytest

from splitserve.planner.connectors import CONNECTORS, Connector, ConnectorError, create_connector
from splitserve.planner.connectors.dry_run import DryRunConnector
from splitserve.planner.connectors.kubernetes import KubernetesConnector
from splitserve.planner.types import Decision


def decision(p, d, t=0.0):
    return Decision(
        timestamp=t,
        prefill_replicas=p,
        decode_replicas=d,
        predicted_rps=1.0,
        headroom=1.0,
        predicted_isl=100.0,
        predicted_osl=10.0,
        wanted_prefill=p,
        wanted_decode=d,
        prefill_correction=1.0,
        decode_correction=1.0,
        feasible=True,
        reason="test",
    )


def test_registry():
    assert {"dry-run", "kubernetes", "local"} <= set(CONNECTORS)
    c = create_connector("dry-run", prefill_replicas=2, decode_replicas=3)
    assert isinstance(c, DryRunConnector) and isinstance(c, Connector)
    assert c.current() == (2, 3)
    with pytest.raises(ConnectorError, match="unknown connector 'nope'; available: dry-run, kubernetes"):
        create_connector("nope")
    with pytest.raises(TypeError):
        CONNECTORS["x"] = "y"  # read-only


def test_dry_run_records_jsonl(tmp_path):
    path = tmp_path / "sub" / "decisions.jsonl"
    c = DryRunConnector(prefill_replicas=1, decode_replicas=1, record_path=path)
    c.apply(decision(3, 2, t=30.0))
    c.apply(decision(0, 0, t=60.0))
    assert c.current() == (0, 0)
    assert [d.prefill_replicas for d in c.decisions] == [3, 0]
    c.close()
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert [(x["before"], x["prefill_replicas"], x["decode_replicas"]) for x in lines] == [
        ([1, 1], 3, 2),
        ([3, 2], 0, 0),
    ]
    assert lines[0]["timestamp"] == 30.0 and lines[0]["reason"] == "test"
    with pytest.raises(ValueError):
        DryRunConnector(prefill_replicas=-1)


class FakeAppsV1Api:
    """The two AppsV1Api methods the connector uses, over an in-memory namespace."""

    def __init__(self, replicas):
        self.replicas = dict(replicas)  # (namespace, name) -> replicas
        self.patches = []

    def read_namespaced_deployment_scale(self, name, namespace):
        if (namespace, name) not in self.replicas:
            raise RuntimeError(f"404 {namespace}/{name}")
        return SimpleNamespace(spec=SimpleNamespace(replicas=self.replicas[(namespace, name)]))

    def patch_namespaced_deployment_scale(self, name, namespace, body):
        self.patches.append((namespace, name, body))
        self.replicas[(namespace, name)] = body["spec"]["replicas"]


def test_kubernetes_patches_only_changed_deployments():
    api = FakeAppsV1Api({("llm", "pf"): 2, ("llm", "dec"): 1})
    c = KubernetesConnector(namespace="llm", prefill_deployment="pf", decode_deployment="dec", api=api)
    assert c.current() == (2, 1)
    c.apply(decision(2, 4))
    assert api.patches == [("llm", "dec", {"spec": {"replicas": 4}})]
    c.apply(decision(0, 0))
    assert c.current() == (0, 0)
    assert len(api.patches) == 3


def test_kubernetes_errors_propagate_and_names_are_checked():
    api = FakeAppsV1Api({})
    c = KubernetesConnector(namespace="llm", prefill_deployment="pf", decode_deployment="dec", api=api)
    with pytest.raises(RuntimeError, match="404"):
        c.current()
    with pytest.raises(ValueError):
        KubernetesConnector(prefill_deployment="same", decode_deployment="same", api=api)


@pytest.mark.skipif(importlib.util.find_spec("kubernetes") is not None, reason="kubernetes client installed")
def test_kubernetes_without_client_says_what_to_install():
    with pytest.raises(ConnectorError, match="pip install kubernetes"):
        create_connector("kubernetes")

"""`kubernetes` connector: sets the replicas of two Deployments through their scale subresource.

Uses the official `kubernetes` Python client (`pip install kubernetes`), imported only when
the connector is built without an injected API object. Configuration comes from the
in-cluster service account when running in a pod, else from the local kubeconfig.

How it was tested: no cluster runs in this repository's CI or on the development machine,
so tests inject a fake `AppsV1Api`-shaped object (the two methods used below) and check the
calls; it has not yet been run against a live cluster.
"""

from __future__ import annotations

import logging
from typing import Any

from splitserve.planner.connectors.base import ConnectorError
from splitserve.planner.types import Decision

log = logging.getLogger(__name__)


def _default_apps_api() -> Any:
    try:
        from kubernetes import client, config  # type: ignore[import-not-found]
    except ImportError as exc:
        raise ConnectorError(
            "the kubernetes connector needs the official client: pip install kubernetes"
        ) from exc
    try:
        config.load_incluster_config()
    except config.ConfigException:
        try:
            config.load_kube_config()
        except (config.ConfigException, OSError) as exc:
            raise ConnectorError(f"no in-cluster config and no usable kubeconfig: {exc}") from exc
    return client.AppsV1Api()


class KubernetesConnector:
    """Patches `spec.replicas` of the prefill and decode Deployments in one namespace."""

    def __init__(
        self,
        *,
        namespace: str = "default",
        prefill_deployment: str = "splitserve-prefill",
        decode_deployment: str = "splitserve-decode",
        api: Any | None = None,
    ) -> None:
        if not namespace or not prefill_deployment or not decode_deployment:
            raise ValueError("namespace and both deployment names must be non-empty")
        if prefill_deployment == decode_deployment:
            raise ValueError("prefill and decode must be different Deployments")
        self.namespace = namespace
        self.deployments = {"prefill": prefill_deployment, "decode": decode_deployment}
        self._api = api if api is not None else _default_apps_api()

    def _replicas(self, name: str) -> int:
        scale = self._api.read_namespaced_deployment_scale(name=name, namespace=self.namespace)
        spec = scale.spec if not isinstance(scale, dict) else scale.get("spec", {})
        value = spec.replicas if not isinstance(spec, dict) else spec.get("replicas")
        return int(value or 0)

    def current(self) -> tuple[int, int]:
        return self._replicas(self.deployments["prefill"]), self._replicas(self.deployments["decode"])

    def apply(self, decision: Decision) -> None:
        want = {"prefill": decision.prefill_replicas, "decode": decision.decode_replicas}
        have = dict(zip(("prefill", "decode"), self.current()))
        for pool, name in self.deployments.items():
            if want[pool] == have[pool]:
                continue
            log.info("kubernetes: %s/%s replicas %d -> %d", self.namespace, name, have[pool], want[pool])
            self._api.patch_namespaced_deployment_scale(
                name=name, namespace=self.namespace, body={"spec": {"replicas": int(want[pool])}}
            )

    def close(self) -> None:
        pass

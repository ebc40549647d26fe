"""What the ingress knows of its model replicas, from Serve's controller (never from a forward
pass): how many run now, per model, cached for a second so that probes and `/info` cost one
controller call a second at most."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from ray import serve

STATUS_TTL_S = 1.0
# A deployment in these states with no running replica has scaled to zero on purpose.
_SCALING_OR_HEALTHY = ("HEALTHY", "UPSCALING", "DOWNSCALING")


@dataclass(frozen=True)
class ModelReplicas:
    running: int
    status: str  # Serve's deployment status: HEALTHY, UPDATING, UPSCALING, UNHEALTHY, ...

    def ready(self, min_replicas: int) -> bool:
        """Serving now: a running replica, or none on purpose (min_replicas 0, scaled to zero;
        the next request starts one)."""
        if self.running > 0:
            return True
        return min_replicas == 0 and self.status in _SCALING_OR_HEALTHY


class ReplicaStatus:
    """Running replicas of each model deployment of this app, cached for `STATUS_TTL_S`."""

    def __init__(self, app_name: str, deployments: list[str]):
        self.app_name, self.deployments = app_name, deployments
        self._cached: dict[str, ModelReplicas] = {}
        self._fetched_at = float("-inf")
        self._lock = asyncio.Lock()

    async def get(self) -> dict[str, ModelReplicas]:
        async with self._lock:  # one controller call at a time, whatever the probe rate
            if time.monotonic() - self._fetched_at > STATUS_TTL_S:
                self._cached = await asyncio.to_thread(self._fetch)
                self._fetched_at = time.monotonic()
        return self._cached

    def _fetch(self) -> dict[str, ModelReplicas]:
        app = serve.status().applications.get(self.app_name)
        found = app.deployments if app else {}
        replicas = {}
        for name in self.deployments:
            deployment = found.get(name)
            if deployment is None:
                replicas[name] = ModelReplicas(0, "NOT_DEPLOYED")
                continue
            states = {_value(state): n for state, n in deployment.replica_states.items()}
            replicas[name] = ModelReplicas(states.get("RUNNING", 0), _value(deployment.status))
        return replicas


def _value(enum_or_str: object) -> str:
    """Serve's status enums are str enums; `str()` of one is its class-qualified name."""
    return str(getattr(enum_or_str, "value", enum_or_str))

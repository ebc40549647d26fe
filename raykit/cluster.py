"""Connecting to Ray: join the cluster you are on, or start a local one big enough for the job."""

from __future__ import annotations

import math
import os

import ray


def init_ray(min_cpus: float = 0) -> None:
    """Connect to a running cluster, or start a local instance with at least `min_cpus` + 2 CPUs.

    Inside `ray job submit` (RAY_ADDRESS set) or next to a `ray start --head` this joins that
    cluster and never starts a second one. A local instance gets logical CPUs for every training
    worker plus two for Ray Data reads and Tune's trial drivers: on a 2-core laptop two workers
    and a read task would otherwise wait for each other forever.
    """
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init()
        return
    try:
        ray.init(address="auto")
    except ConnectionError:
        # Workers that import torch on a busy laptop can take over Ray Train's default 60 s to
        # start; the local instance's processes inherit this environment.
        os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "600")
        ray.init(num_cpus=max(os.cpu_count() or 1, math.ceil(min_cpus) + 2))

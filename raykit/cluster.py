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


@ray.remote(num_cpus=0)
class RunLock:
    """A named actor that the driver of a run holds for as long as it runs. It is owned by that
    driver, so Ray removes it together with the driver's other actors when the driver dies."""

    def __init__(self, holder: str):
        self.holder = holder

    def describe(self) -> str:
        return self.holder


def hold_run_lock(run_key: str, what: str, wait_s: float = 300.0) -> ray.actor.ActorHandle:
    """Take the cluster-wide lock of one run (its storage path and name) before training.

    A second live driver of the same run is refused: two controllers would write one run's
    checkpoints. A driver that was killed (Ctrl-C twice, SIGKILL, a lost job) leaves its
    controller, workers and placement group behind until Ray has noticed and cleaned them up,
    which takes seconds on a busy machine; a re-run waits for that instead of starting beside
    them.
    """
    import hashlib
    import socket
    import time

    name = "raykit-run-" + hashlib.sha1(run_key.encode()).hexdigest()[:20]
    holder = f"pid {os.getpid()} on {socket.gethostname()}"
    deadline = time.time() + wait_s
    waiting = False
    while True:
        try:
            return RunLock.options(name=name, namespace="raykit").remote(holder)
        except ValueError:  # the name is taken: by a live driver, or one being cleaned up
            pass
        try:
            other = ray.get(ray.get_actor(name, namespace="raykit").describe.remote(), timeout=30)
        except (ValueError, ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            other = None  # gone meanwhile, or its driver died: Ray is cleaning it up
        if other is not None:
            from raykit.errors import ConfigError

            raise ConfigError(
                f"run_name: {what} is already running on this cluster (driver {other}); "
                "wait for it, stop it, or pick another --run_name"
            )
        if time.time() > deadline:
            raise RuntimeError(f"{what}: the previous driver's actors were not cleaned up")
        if not waiting:
            print(f"[raykit] waiting for Ray to clean up the killed previous run of {what}",
                  flush=True)  # fmt: skip
            waiting = True
        time.sleep(1.0)

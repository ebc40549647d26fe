"""Connecting to Ray: join the cluster you are on, or start a local one big enough for the job."""

from __future__ import annotations

import asyncio
import math
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import ray

from raykit.runtime.console import ray_init_options
from raykit.runtime.logs import logger

# Marks, in its GCS, a local instance that `init_ray` started for one command; another command
# that finds it (`address="auto"` finds any running instance on the machine) starts its own.
PRIVATE_INSTANCE_KEY = b"raykit-private-local-instance"


def init_ray(min_cpus: float = 0) -> bool:
    """Connect to a running cluster, or start a local instance with at least `min_cpus` + 2 CPUs.

    Inside `ray job submit` (RAY_ADDRESS set) or next to a `ray start --head` this joins that
    cluster and never starts a second one. A local instance gets logical CPUs for every training
    worker plus two for Ray Data reads and Tune's trial drivers: on a 2-core laptop two workers
    and a read task would otherwise wait for each other forever. It is this command's own: a
    second command on the machine starts another instead of joining it (two fine-tunes in one
    instance sized for one starved each other's data reads, and both hung). Returns True when
    it started a local instance (whose logical CPUs are then not the machine's), now or in an
    earlier call.
    """
    global _local_address
    if ray.is_initialized():
        return _local_address == ray.get_runtime_context().gcs_address
    options = ray_init_options()
    if os.environ.get("RAY_ADDRESS"):
        ray.init(**options)
        return False
    if _join_running_cluster(options):
        return False
    # Workers that import torch on a busy laptop can take over Ray Train's default 60 s to
    # start; the local instance's processes inherit this environment.
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "600")
    # Ray Train's preemption watcher (an actor per run) looks for nodes being drained, which
    # one machine never is: a process less to start.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    cpus = max(os.cpu_count() or 1, math.ceil(min_cpus) + 2)
    ray.init(address="local", num_cpus=cpus, **options)
    from ray.experimental import internal_kv

    internal_kv._internal_kv_put(PRIVATE_INSTANCE_KEY, str(os.getpid()).encode())
    _local_address = ray.get_runtime_context().gcs_address
    return True


def _join_running_cluster(options: dict[str, Any]) -> bool:
    """Join the cluster running on this machine, if there is one that is not another command's
    private local instance."""
    try:
        ray.init(address="auto", **options)
    except ConnectionError:
        return False
    from ray.experimental import internal_kv

    owner = internal_kv._internal_kv_get(PRIVATE_INSTANCE_KEY)
    if owner is None:
        return True
    ray.shutdown()
    logger.info(
        f"the local Ray instance here belongs to another raykit command (pid {owner.decode()}): "
        "starting this command's own"
    )
    return False


def init_ray_beside(
    prepare: Callable[[], Any],
    min_cpus: float = 0,
    then: Callable[[bool], None] | None = None,
) -> Any:
    """`init_ray` here while `prepare` (a command's imports and checks) runs on a thread; returns
    what `prepare` returns. `then(local)` runs here once Ray is up, while `prepare` may still
    run: a command's own start that needs Ray but not the checks (`local`: whether `init_ray`
    started a local instance, which a failed check then shuts down with all it started).

    Starting a local Ray takes seconds, mostly spent waiting for its processes, and a command's
    first imports (torch, transformers, Ray Train) take seconds of one core: side by side they
    save 2 s of a 2-core laptop's start. Ray stays on the main thread (it sets signal handlers
    there). If `prepare` fails, Ray is left as it was found (a local instance started for it
    is shut down, a cluster it joined is disconnected from) and the error raised as it was.
    """
    connected_before = ray.is_initialized()
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = prepare()
        except BaseException as exc:  # raised again on the main thread
            outcome["error"] = exc

    thread = threading.Thread(target=run, name="raykit-prepare", daemon=True)
    thread.start()
    try:
        local = init_ray(min_cpus)
        if then is not None:
            then(local)
    finally:
        thread.join()
    if "error" in outcome:
        if not connected_before:
            ray.shutdown()
        raise outcome["error"]
    return outcome.get("value")


@dataclass(frozen=True)
class Capacity:
    """What a command may fill: CPUs of the largest node and of the cluster, and its GPUs."""

    node_cpus: int
    total_cpus: int
    gpus: int


def capacity(local: bool) -> Capacity:
    """The connected cluster's capacity; for a local instance, this machine's cores (its
    logical CPUs are padded for Ray Data's tasks and are not cores)."""
    gpus = int(ray.cluster_resources().get("GPU", 0))
    if local:
        cores = os.cpu_count() or 1
        return Capacity(cores, cores, gpus)
    per_node = [n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")]
    return Capacity(int(max(per_node, default=1)), int(sum(per_node)), gpus)


def split_cpus(cpus: int) -> tuple[int, int]:
    """(model copies, torch threads each) that fill `cpus` cores.

    Measured on a 2-core EPYC with a MiniLM cross-encoder (bench/serve_cqa.py, 20-document CQA
    requests): two single-threaded replicas served 46.7 docs/s at 8 and 32 clients (fp32; 75-83
    with bf16) against 38 for one replica with two threads (58 with bf16): a small model's
    intra-op parallelism leaves cores idle between operators. One copy with two threads answers a
    lone client faster (487 vs 774 ms). Beyond 4 cores copies get 4 threads each, so that a node
    holds a few model copies rather than one per core (not measured here).
    """
    threads = 1 if cpus <= 4 else 4
    return max(1, cpus // threads), threads


# The GCS address of the local instance `init_ray` started in this process, if it did.
_local_address: str | None = None


@ray.remote(num_cpus=0)
class RunLock:
    """A named actor that the driver of a run holds for as long as it runs. It is owned by that
    driver, so Ray removes it together with the driver's other actors when the driver dies.

    It is also the run's mailbox: rank 0 `put`s console events, the driver `take`s them (one
    actor per run rather than a lock and a `ray.util.queue.Queue`: each actor is a process
    that costs about a CPU-second to start and ~0.6% of a core while it lives)."""

    def __init__(self, holder: str):
        self.holder = holder
        self.events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    async def describe(self) -> str:
        return self.holder

    async def put(self, event: dict[str, Any]) -> None:
        self.events.put_nowait(event)

    async def take(self, wait_s: float = 0.0) -> list[dict[str, Any]]:
        """The events waiting, in order; waits up to `wait_s` for the first one."""
        taken = []
        if wait_s > 0 and self.events.empty():
            try:
                taken.append(await asyncio.wait_for(self.events.get(), wait_s))
            except asyncio.TimeoutError:
                return []
        while not self.events.empty():
            taken.append(self.events.get_nowait())
        return taken


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
            logger.info(f"waiting for Ray to clean up the killed previous run of {what}")
            waiting = True
        time.sleep(1.0)

"""Defaults that fill the machine (scoring actors, Serve replicas) and the Ray a command runs on."""

from __future__ import annotations

from raykit.config import ScoreConfig, ServeConfig


def test_serve_defaults_autoscale_from_one_replica_up_to_the_node():
    cfg = ServeConfig()
    two = cfg.sized_for(node_cpus=2, gpus=0)
    assert (two.min_replicas, two.max_replicas, two.cpus_per_replica) == (1, 2, 1.0)
    big = cfg.sized_for(node_cpus=16, gpus=0)
    assert (big.min_replicas, big.max_replicas, big.cpus_per_replica) == (1, 4, 4.0)
    gpu = ServeConfig(use_gpu=True).sized_for(node_cpus=32, gpus=4)
    assert (gpu.min_replicas, gpu.max_replicas, gpu.cpus_per_replica) == (1, 4, 1.0)
    # What the user set is kept (0 included: scale to zero); the rest is filled around it.
    mine = ServeConfig(cpus_per_replica=2, max_replicas=3).sized_for(node_cpus=8, gpus=0)
    assert (mine.min_replicas, mine.max_replicas, mine.cpus_per_replica) == (1, 3, 2.0)
    assert ServeConfig(min_replicas=2, max_replicas=5).sized_for(2, 0).min_replicas == 2
    assert ServeConfig(min_replicas=0).sized_for(2, 0).min_replicas == 0


def test_score_defaults_fill_the_machine():
    cfg = ScoreConfig(input=["x"])
    local = cfg.sized_for(total_cpus=2, gpus=0, local=True)
    assert (local.num_actors, local.cpus_per_actor) == (2, 1.0)
    cluster = cfg.sized_for(total_cpus=17, gpus=0, local=False)  # one core left for tokenising
    assert (cluster.num_actors, cluster.cpus_per_actor) == (4, 4.0)
    gpus = ScoreConfig(input=["x"], use_gpu=True).sized_for(64, 8, local=False)
    assert (gpus.num_actors, gpus.cpus_per_actor) == (8, 1.0)
    kept = ScoreConfig(input=["x"], num_actors=3).sized_for(2, 0, local=True)
    assert (kept.num_actors, kept.cpus_per_actor) == (3, 1.0)
    # Windows: small on CPU (the first scores wait for one), big on GPU, explicit kept.
    assert (local.sort_window, gpus.sort_window, kept.sort_window) == (256, 1024, 256)
    assert ScoreConfig(input=["x"], sort_window=64).sized_for(2, 0, local=True).sort_window == 64


def test_ray_cpus_asked_of_a_local_instance():
    """The logical CPUs a command asks `init_ray` for (None: it may not need Ray at all)."""
    import os

    from raykit.config import FinetuneConfig

    cores = os.cpu_count() or 1
    assert FinetuneConfig(train_data=["x"], num_workers=3, cpus_per_worker=2).ray_cpus() == 6
    assert ScoreConfig(input=["x"]).ray_cpus() == cores + 1
    assert ScoreConfig(input=["x"], num_actors=3, cpus_per_actor=2).ray_cpus() == 7
    assert ServeConfig().ray_cpus() == cores
    assert ServeConfig(max_replicas=3, cpus_per_replica=2).ray_cpus() == 6
    assert ServeConfig(rollout=True).ray_cpus() is None


def test_a_command_prepares_on_a_thread_while_ray_starts(ray_cluster):
    """`init_ray_beside` runs the command's imports and checks on another thread and returns
    what they return; their error is raised as it was, on this thread."""
    import threading

    import pytest

    from raykit.errors import ConfigError
    from raykit.runtime.cluster import init_ray_beside

    main = threading.current_thread()
    assert init_ray_beside(lambda: threading.current_thread() is not main) is True

    def bad() -> None:
        raise ConfigError("model: no config.json in /nowhere")

    with pytest.raises(ConfigError, match="no config.json in /nowhere"):
        init_ray_beside(bad)
    assert ray_cluster.is_initialized()  # not started here: not shut down here


CHILD_COMMAND = """
import ray
from raykit.runtime.cluster import init_ray
from raykit.runtime.console import setup_console

setup_console()
started = init_ray(1)
print("instance", ray.get_runtime_context().gcs_address, started, flush=True)
ray.shutdown()
"""
# A command whose checks fail after it joined the running cluster leaves it (a test that runs
# commands in-process would otherwise stay connected to it).
FAILING_COMMAND = """
import ray
from raykit.errors import ConfigError
from raykit.runtime.cluster import init_ray_beside

def bad():
    raise ConfigError("output_dir: not empty")

try:
    init_ray_beside(bad)
except ConfigError:
    print("connected after the error:", ray.is_initialized(), flush=True)
"""


def test_a_command_joins_a_running_cluster_but_not_another_commands_local_instance(ray_cluster):
    """Without RAY_ADDRESS a command joins the Ray instance running on the machine (as next to
    `ray start --head`), unless that is the private local instance of another raykit command:
    then it starts its own (two fine-tunes in one instance sized for one starved each other's
    data reads and both hung)."""
    import os
    import subprocess
    import sys

    from ray._private.services import find_gcs_addresses
    from ray.experimental import internal_kv

    from raykit.runtime.cluster import PRIVATE_INSTANCE_KEY

    ours = ray_cluster.get_runtime_context().gcs_address
    assert set(find_gcs_addresses()) == {ours}, "another Ray instance runs on this machine"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}

    def child(command: str = CHILD_COMMAND, first: str = "instance ") -> tuple[str, str]:
        result = subprocess.run(
            [sys.executable, "-c", command], capture_output=True, text=True, env=env
        )
        assert result.returncode == 0, result.stderr[-3000:]
        line = next(x for x in result.stdout.splitlines() if x.startswith(first))
        return line, result.stdout

    assert child()[0] == f"instance {ours} False"  # joined: not started here
    assert child(FAILING_COMMAND, "connected")[0] == "connected after the error: False"
    internal_kv._internal_kv_put(PRIVATE_INSTANCE_KEY, b"4242")  # as if a command started it
    try:
        line, output = child()
    finally:
        internal_kv._internal_kv_del(PRIVATE_INSTANCE_KEY)
    _, address, started = line.split()
    assert address != ours and started == "True"
    assert "belongs to another raykit command (pid 4242): starting this command's own" in output

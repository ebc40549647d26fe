"""Defaults that fill the machine: scoring actors and Serve replicas."""

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

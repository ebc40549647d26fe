"""cluster.yaml and the KubeRay manifests: validated offline with Ray's own schemas."""

from __future__ import annotations

import copy
import shlex

import pytest
import typer
import yaml

from raykit.cli import app, normalize_argv
from raykit.config import FinetuneConfig, ServeConfig, load_config
from tests.helpers import ROOT


def test_cluster_yaml_passes_ray_cluster_launcher_validation():
    from jsonschema import ValidationError
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    validate_config(prepare_config(copy.deepcopy(config)))
    gpu = config["available_node_types"]["gpu_worker"]
    assert gpu["min_workers"] == 0 and gpu["max_workers"] >= 1
    assert gpu["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot"
    assert all("RAY_AUTH_MODE=token" in c for c in config["head_start_ray_commands"][1:])
    assert all("RAY_AUTH_MODE=token" in c for c in config["worker_start_ray_commands"][1:])
    assert "~/.ray/auth_token" in config["file_mounts"]
    assert any("ray[default,data,train,tune,serve]==2.60" in c for c in config["setup_commands"])

    broken = copy.deepcopy(config)
    broken["available_node_types"]["gpu_worker"]["min_wrkers"] = 0  # a typo Ray must catch
    with pytest.raises(ValidationError, match="min_wrkers"):
        validate_config(prepare_config(broken))


def manifest(name: str) -> dict:
    return yaml.safe_load((ROOT / "deploy" / "k8s" / name).read_text())


def check_cluster_spec(spec: dict) -> None:
    """The RayCluster fields KubeRay requires, with GPU workers and token auth."""
    assert spec["rayVersion"].startswith("2.60")
    assert spec["authOptions"] == {"mode": "token"}
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert head["name"] == "ray-head" and head["image"]
    for group in spec["workerGroupSpecs"]:
        assert {"groupName", "replicas", "minReplicas", "maxReplicas", "template"} <= set(group)
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        container = group["template"]["spec"]["containers"][0]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
        assert container["image"] == head["image"]


def test_rayjob_runs_jobs_finetune_with_valid_flags(monkeypatch):
    job = manifest("rayjob-finetune.yaml")
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    check_cluster_spec(job["spec"]["rayClusterSpec"])
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:2] == ["python", "jobs/finetune.py"] and (ROOT / argv[1]).is_file()
    # Parse the flags exactly as `raykit finetune` would, without running anything.
    command = typer.main.get_command(app).commands["finetune"]
    params = command.make_context("finetune", normalize_argv(["finetune", *argv[2:]])[1:]).params
    monkeypatch.chdir(ROOT)
    config_path = params.pop("config")
    cfg = load_config(FinetuneConfig, config_path, **params)
    assert cfg.use_gpu and cfg.fp16 and cfg.num_workers == 2
    assert cfg.storage_path.startswith("s3://") and cfg.output_dir.startswith("s3://")
    assert cfg.max_failures >= 1


def test_rayservice_embeds_a_serve_config_that_serve_run_accepts():
    from ray.serve.schema import ServeDeploySchema

    from raykit.serving.app import app_builder

    service = manifest("rayservice.yaml")
    assert (service["apiVersion"], service["kind"]) == ("ray.io/v1", "RayService")
    check_cluster_spec(service["spec"]["rayClusterConfig"])
    serve_config = yaml.safe_load(service["spec"]["serveConfigV2"])
    schema = ServeDeploySchema.model_validate(serve_config)  # what `serve deploy` validates
    local = yaml.safe_load((ROOT / "examples" / "serve.yaml").read_text())
    (application,) = schema.applications
    assert application.import_path == local["applications"][0]["import_path"]
    assert application.name == local["applications"][0]["name"]
    app_builder(application.args)  # every arg is a valid `raykit serve` flag
    cfg = load_config(ServeConfig, **application.args)
    assert cfg.use_gpu and cfg.model[0].startswith("s3://")


def test_serve_configs_with_the_old_import_path_keep_working():
    """`raykit.serve:app_builder` (configs written before the sub-packages) is the same builder
    as `raykit.serving:app_builder`, with a deprecation warning."""
    import importlib
    import sys

    import raykit.serving

    sys.modules.pop("raykit.serve", None)
    with pytest.warns(DeprecationWarning, match="raykit.serving:app_builder"):
        old = importlib.import_module("raykit.serve")
    assert old.app_builder is raykit.serving.app_builder

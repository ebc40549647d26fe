"""A two-node Ray cluster on this machine with S3 storage (moto): `ray job submit` of the jobs,
workers on different nodes, checkpoints and outputs on S3, a training worker killed mid-run,
and a compiled package shared through the bucket.

The cluster is started the way a user starts one (`ray start --head`, `ray start --address`),
with token auth off (Ray 2.60: RAY_AUTH_MODE=disabled) and the S3 endpoint in the environment of
every Ray process, which is how pyarrow (and so Ray Train and raykit) finds it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from tests.helpers import (
    ROOT,
    SAMPLE_DEV,
    SAMPLE_TRAIN,
    free_ports,
    orphaned_ray_processes,
    running_pids,
    stop_processes_mentioning,
    stop_processes_with_env,
    wait_for,
)

VENV_BIN = Path(sys.executable).parent
BUCKET = "raykit-test"
pytestmark = [
    pytest.mark.skipif(
        not (VENV_BIN / "ray").exists() or not (VENV_BIN / "moto_server").exists(),
        reason="needs the ray CLI and moto[server]",
    ),
    pytest.mark.slow,
    pytest.mark.cluster,
    pytest.mark.timeout(900),
]


class Cluster:
    """Handles to the test cluster: `ray` CLI calls with the right environment."""

    def __init__(self, env: dict[str, str], dashboard: str, temp_dir: Path):
        self.env, self.dashboard, self.temp_dir = env, dashboard, temp_dir

    def ray(self, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(VENV_BIN / "ray"), *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def submit(self, job: str, *args: str, wait: bool = True, job_id: str | None = None):
        job_id = job_id or f"raykit-{uuid.uuid4().hex[:8]}"
        flags = [] if wait else ["--no-wait"]
        for _ in range(40):  # the job agent comes up a little after `ray start` returns
            result = self.ray(
                "job",
                "submit",
                f"--address={self.dashboard}",
                *flags,
                f"--submission-id={job_id}",
                f"--working-dir={ROOT}",
                "--",
                "python",
                job,
                *args,
            )
            if "No available agent" not in result.stderr:
                break
            time.sleep(3)
        return job_id, result

    def status(self, job_id: str) -> str:
        from ray.job_submission import JobSubmissionClient

        return str(JobSubmissionClient(self.dashboard).get_job_status(job_id))

    def stop(self, job_id: str) -> None:
        from ray.job_submission import JobSubmissionClient

        JobSubmissionClient(self.dashboard).stop_job(job_id)

    def logs(self, job_id: str) -> str:
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(self.dashboard).get_job_logs(job_id)

    def nodes(self) -> list[dict]:
        out = self.ray("list", "nodes", f"--address={self.dashboard}", "--format=json").stdout
        return [n for n in json.loads(out) if n["state"] == "ALIVE"]


@pytest.fixture(scope="module")
def s3_env():
    """A moto S3 server on 127.0.0.1 and the AWS variables that point pyarrow/boto3 at it."""
    import boto3

    (port,) = free_ports(1)
    server = subprocess.Popen(
        [str(VENV_BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # for this process's pyarrow/boto3 clients
    try:
        s3 = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"])
        wait_for(lambda: _try(lambda: s3.create_bucket(Bucket=BUCKET)), 60, "moto")
        yield env
    finally:
        server.terminate()
        server.wait(timeout=30)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _try(call) -> bool:
    try:
        call()
        return True
    except Exception:
        return False


@pytest.fixture(scope="module")
def cluster(s3_env):
    """`ray start --head` plus a second node, each offering one `trainer_node` resource."""
    marker = uuid.uuid4().hex
    existing = running_pids()
    env = {
        **os.environ,
        **s3_env,
        "RAY_AUTH_MODE": "disabled",
        "RAYKIT_TEST_CLUSTER": marker,
        "PATH": f"{VENV_BIN}:{os.environ['PATH']}",
        "RAY_DEDUP_LOGS": "0",
        "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "600",
    }
    env.pop("RAY_ADDRESS", None)
    temp_dir = Path(tempfile.mkdtemp(prefix="rk-2n-", dir="/tmp"))  # short: AF_UNIX paths
    # The second node gets its own temp dir: two nodes on one machine sharing one would share
    # the runtime-env folder, and the second node unpacking a job's working_dir there deletes
    # the folder the job's driver runs in (its cwd).
    worker_temp_dir = Path(tempfile.mkdtemp(prefix="rk-2w-", dir="/tmp"))
    gcs, dashboard, *agent_ports = free_ports(10)
    handle = Cluster(env, f"http://127.0.0.1:{dashboard}", temp_dir)
    try:
        head = handle.ray(
            "start",
            "--head",
            f"--port={gcs}",
            f"--dashboard-port={dashboard}",
            f"--dashboard-agent-listen-port={agent_ports[0]}",
            f"--dashboard-agent-grpc-port={agent_ports[1]}",
            f"--metrics-export-port={agent_ports[2]}",
            f"--runtime-env-agent-port={agent_ports[3]}",
            "--num-cpus=3",
            '--resources={"trainer_node": 1}',
            "--include-dashboard=true",
            "--disable-usage-stats",
            f"--temp-dir={temp_dir}",
            timeout=180,
        )
        assert head.returncode == 0, head.stdout + head.stderr
        worker = handle.ray(
            "start",
            f"--address=127.0.0.1:{gcs}",
            f"--dashboard-agent-listen-port={agent_ports[4]}",
            f"--dashboard-agent-grpc-port={agent_ports[5]}",
            f"--metrics-export-port={agent_ports[6]}",
            f"--runtime-env-agent-port={agent_ports[7]}",
            "--num-cpus=2",
            '--resources={"trainer_node": 1}',
            "--disable-usage-stats",
            f"--temp-dir={worker_temp_dir}",
            timeout=180,
        )
        assert worker.returncode == 0, worker.stdout + worker.stderr
        wait_for(lambda: len(handle.nodes()) == 2, 120, "two alive nodes", interval=2)
        yield handle
    finally:
        stop_processes_mentioning(str(temp_dir))
        stop_processes_mentioning(str(worker_temp_dir))
        # Agents and workers whose command line shows neither temp dir.
        stop_processes_with_env("RAYKIT_TEST_CLUSTER", marker)
        for pid in orphaned_ray_processes(existing):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)
        shutil.rmtree(temp_dir, ignore_errors=True)
        shutil.rmtree(worker_temp_dir, ignore_errors=True)


def finetune_args(model: str, **extra: str) -> list[str]:
    args = {
        "model_name_or_path": model,
        "train_data": str(SAMPLE_TRAIN),
        "eval_data": str(SAMPLE_DEV),
        "learning_rate": "1e-3",
        "train_group_size": "4",
        "per_device_train_batch_size": "2",
        "max_len": "64",
        "num_workers": "2",
        "worker_resources": "trainer_node=1",
        "eval_on_start": "false",
        **extra,
    }
    return [x for k, v in args.items() for x in (f"--{k}", v)]


def read_s3_json(uri: str) -> dict:
    fs, path = pafs.FileSystem.from_uri(uri)
    with fs.open_input_stream(path) as f:
        return json.loads(f.read())


@pytest.mark.fault
def test_an_interrupted_sweep_on_s3_resumes_when_submitted_again(cluster, tiny_model_dir):
    """`jobs/tune.py` with --storage_path and --output_dir on S3, stopped once its trial has a
    checkpoint in the bucket, then submitted again: the sweep resumes from its state in the
    bucket and the trial from its checkpoint; the trial table and the best model land in the
    bucket."""
    sweep = f"s3://{BUCKET}/sweep-out"
    args = finetune_args(
        tiny_model_dir,
        max_steps="24",
        eval_steps="4",
        num_workers="1",
        storage_path=f"s3://{BUCKET}/sweeps",
        output_dir=sweep,
        run_name="s3-sweep",
        scheduler="fifo",
        num_samples="1",
        search="learning_rate=grid:3e-3",  # one trial: test_tune picks between several
    )
    first, result = cluster.submit("jobs/tune.py", *args, wait=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    fs, trials = pafs.FileSystem.from_uri(f"s3://{BUCKET}/sweeps/s3-sweep/trials")

    def trial_files(suffix: str) -> list[str]:
        found = fs.get_file_info(pafs.FileSelector(trials, recursive=True, allow_not_found=True))
        return [f.path for f in found if f.path.endswith(suffix)]

    wait_for(lambda: trial_files("/checkpoint_manager_snapshot.json"), 600, "a trial checkpoint")
    cluster.stop(first)  # the sweep's driver goes away
    wait_for(lambda: "STOPPED" in cluster.status(first), 120, "the first job to stop")

    second, result = cluster.submit("jobs/tune.py", *args)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "SUCCEEDED" in cluster.status(second) and "resuming sweep" in cluster.logs(second)
    rows = read_s3_json(f"{sweep}/trials.json")
    assert [(r["learning_rate"], r["status"], r["steps"]) for r in rows] == [(3e-3, "OK", 24)]
    (summary,) = trial_files("/model/train_summary.json")
    resumed = read_s3_json(f"s3://{summary}")["resumed_from_step"]
    assert 0 < resumed < 24  # the interrupted trial went on from its checkpoint
    best = read_s3_json(f"{sweep}/best/train_summary.json")
    assert best["best_metrics"]["nDCG@10"] == pytest.approx(rows[0]["best_nDCG@10"], abs=1e-4)
    assert best["best_metrics"]["config/learning_rate"] == 3e-3
    assert fs.get_file_info(f"{BUCKET}/sweep-out/best/model.safetensors").type == pafs.FileType.File


@pytest.mark.fault
def test_a_two_node_job_on_s3_survives_a_killed_worker_then_scores_with_a_shared_package(
    cluster, tiny_model_dir, tmp_path
):
    """`jobs/finetune.py` on two nodes, checkpoints and model on S3, one training worker killed
    mid-run: it resumes from the S3 checkpoint. Then `jobs/score.py` scores S3 input with the S3
    model, compiling it (`--compile on`): the package goes beside the model in the bucket, and
    another node (this process, its own empty cache) fetches it instead of compiling."""
    from ray.util.state import list_actors

    from raykit.core.engine import InferenceEngine
    from raykit.core.reranker import Reranker

    model_uri = f"s3://{BUCKET}/models/fault"
    args = finetune_args(
        tiny_model_dir,
        max_steps="20",
        save_steps="5",
        logging_steps="1",
        eval_steps="1000",
        storage_path=f"s3://{BUCKET}/checkpoints",
        run_name="fault",
        output_dir=model_uri,
        max_failures="1",
    )
    job_id, result = cluster.submit("jobs/finetune.py", *args, wait=False)
    assert result.returncode == 0, result.stdout + result.stderr

    # Ray Train's checkpoint manager writes its snapshot when it registers a checkpoint (a
    # checkpoint folder alone may still wait in the report queue).
    fs, snapshot = pafs.FileSystem.from_uri(
        f"s3://{BUCKET}/checkpoints/fault/checkpoint_manager_snapshot.json"
    )

    def checkpoint_registered() -> bool:
        return fs.get_file_info(snapshot).type == pafs.FileType.File

    wait_for(checkpoint_registered, 600, "a registered checkpoint", interval=0.2)
    # The state API over HTTP, not the `ray list` CLI: a step takes well under a second now.
    workers = list_actors(
        address=cluster.dashboard,
        filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")],
    )
    assert len(workers) == 2, workers
    os.kill(int(workers[1].pid), 9)  # one training worker dies mid-run

    wait_for(
        lambda: any(s in cluster.status(job_id) for s in ("SUCCEEDED", "FAILED", "STOPPED")),
        900,
        "the job to finish",
        interval=2,
    )
    logs = cluster.logs(job_id)
    assert "SUCCEEDED" in cluster.status(job_id), logs[-4000:]
    summary = read_s3_json(f"{model_uri}/train_summary.json")
    assert summary["steps"] == 20
    resumed = summary["resumed_from_step"]
    assert 5 <= resumed < 20 and resumed % 5 == 0, "the run was meant to be interrupted"
    assert f"resumed from checkpoint at step {resumed}/20" in logs
    # One loss entry per step: nothing repeated or lost around the restart.
    assert [entry["step"] for entry in summary["loss"]] == list(range(1, 21))
    # One worker per node (`trainer_node=1` each), after the restart too; Ray Train's run on S3.
    nodes = {n["node_id"] for n in cluster.nodes()}
    assert len(set(summary["worker_nodes"])) == 2 and set(summary["worker_nodes"]) == nodes
    fs, path = pafs.FileSystem.from_uri(f"s3://{BUCKET}/checkpoints/fault")
    assert fs.get_file_info(path).type == pafs.FileType.Directory

    # Batch scoring on the same cluster: model and input on S3, output to S3, compiled.
    rows = [
        {"query_id": i, "query": "what is ray", "passage": f"passage number {i}"} for i in range(50)
    ]
    fs, path = pafs.FileSystem.from_uri(f"s3://{BUCKET}/pairs/part-0.jsonl")
    with fs.open_output_stream(path) as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows).encode())
    _, result = cluster.submit(
        "jobs/score.py",
        "--model",
        model_uri,
        "--input",
        f"s3://{BUCKET}/pairs/",
        "--output",
        f"s3://{BUCKET}/scored",
        "--max_len",
        "64",
        "--compile",
        "on",
        "--num_actors",
        "1",  # one actor compiles (more would only start more processes on 2 cores)
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    fs, path = pafs.FileSystem.from_uri(f"s3://{BUCKET}/scored/part-0.parquet")
    scored = pq.read_table(path, filesystem=fs).to_pylist()
    assert [r["query_id"] for r in scored] == list(range(50))
    expected = Reranker(model_uri, device="cpu", max_length=64).compute_score(
        [[r["query"], r["passage"]] for r in rows]
    )
    assert [r["score"] for r in scored] == pytest.approx(expected, abs=1e-4)

    # The scoring actor's package, beside the model on S3 (not in its folder) ...
    fs, path = pafs.FileSystem.from_uri(f"{model_uri}.raykit-compiled")
    (package,) = fs.get_file_info(pafs.FileSelector(path))
    assert package.path.endswith(".pt2") and package.size > 10_000
    # ... is what another node with an empty cache loads: fetched, not compiled, and exact.
    engine = InferenceEngine.load(model_uri, device="cpu", dtype="float32", threads=1, max_len=64)
    assert engine.compile_model(str(tmp_path / "another-node"))
    assert "fetch_s" in engine.compile_split, engine.compile_split
    pairs = [(r["query"], r["passage"]) for r in rows]
    assert engine.score_pairs(pairs) == pytest.approx(expected, abs=1e-5)

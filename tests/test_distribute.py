"""--distribute: mirrored over two logical CPU devices, multi-worker as two processes on 127.0.0.1."""

from __future__ import annotations

import json
import os
import socket
import subprocess
from pathlib import Path

import pytest
from conftest import make_image_folders, run_script, script_command
from training_runs import RUN_FILES

TWO_CPUS = """
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
"""


@pytest.fixture
def images(tmp_path: Path) -> Path:
    """Three generated categories of 40 photos: 32 train, 4 validation and 4 test each."""
    return make_image_folders(tmp_path / "images", {"red": 40, "blue": 40, "green": 40})


def options(images: Path, workspace: Path, *more: str) -> list[str]:
    return [
        "--workspace", str(workspace), "--images-dir", str(images), "--categories", "red,blue,green",
        "--model", "mlp", "--image-size", "16", "--epochs", "6", "--early-stopping", "0", "--workers", "1", *more,
    ]  # fmt: skip


def finished_run(workspace: Path) -> tuple[Path, dict, dict]:
    runs = [path for path in (workspace / "runs").iterdir() if not path.is_symlink()]
    assert len(runs) == 1, runs
    run = runs[0]
    assert {path.name for path in run.iterdir()} == RUN_FILES
    config = json.loads((run / "config.json").read_text())
    metrics = json.loads((run / "metrics.json").read_text())
    return run, config, metrics


def test_mirrored_on_two_cpu_devices_matches_one_device(images, tmp_path):
    single = run_script("machine_learning.py", *options(images, tmp_path / "one"), cwd=tmp_path)
    assert single.returncode == 0, single.stderr
    mirrored = run_script(
        "machine_learning.py",
        *options(images, tmp_path / "two", "--distribute", "mirrored"),
        cwd=tmp_path,
        before=TWO_CPUS,
    )
    assert mirrored.returncode == 0, mirrored.stderr
    assert "Distributed (mirrored): 2 replicas on 1 worker(s)" in mirrored.stdout
    assert "global batch 64" in mirrored.stdout

    _, one_config, one = finished_run(tmp_path / "one")
    _, two_config, two = finished_run(tmp_path / "two")
    assert one_config["distribution"] == {
        "strategy": "none", "replicas": 1, "workers": 1, "global_batch_size": 32, "learning_rate": 0.001,
    }  # fmt: skip
    assert two_config["distribution"] == {
        "strategy": "mirrored", "replicas": 2, "workers": 1, "global_batch_size": 64, "learning_rate": 0.002,
    }  # fmt: skip
    assert one["test_count"] == two["test_count"] == 12
    assert one["test_accuracy"] >= 0.9 and two["test_accuracy"] >= 0.9
    assert abs(one["test_accuracy"] - two["test_accuracy"]) <= 0.1


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


@pytest.mark.slow
def test_multi_worker_on_two_local_processes_writes_one_run(images, tmp_path):
    cluster = {"worker": [f"127.0.0.1:{port}" for port in free_ports(2)]}
    processes = []
    for index in range(2):
        env = {
            **os.environ,
            "TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}}),
            "PYTHONUNBUFFERED": "1",
        }
        workspace = tmp_path / f"machine{index}"  # as on two machines: each has its own workspace
        processes.append(
            subprocess.Popen(
                script_command(
                    "machine_learning.py", *options(images, workspace, "--distribute", "multi-worker")
                ),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                env=env,
                cwd=tmp_path,
            )
        )
    try:
        outputs = [process.communicate(timeout=600)[0] for process in processes]
    finally:
        for process in processes:
            process.kill()
    for process, output in zip(processes, outputs, strict=True):
        assert process.returncode == 0, output
    chief, worker = outputs
    assert "Distributed (multi-worker): 2 replicas on 2 worker(s), this is worker 0 (chief)" in chief
    assert "this is worker 1;" in worker and "Worker 1 done; the chief writes the run folder." in worker
    assert "Run saved to:" in chief and "Run saved to:" not in worker

    run, config, metrics = finished_run(tmp_path / "machine0")
    assert not (tmp_path / "machine1" / "runs").exists() or not any(
        (tmp_path / "machine1" / "runs").iterdir()
    )
    assert config["distribution"]["replicas"] == 2 and config["distribution"]["workers"] == 2
    history = json.loads((run / "history.json").read_text())
    assert len(history["loss"]) == 6
    assert metrics["test_count"] == 12 and metrics["test_accuracy"] >= 0.75


def test_bad_cluster_configuration_fails_before_any_work(images, tmp_path):
    workspace = tmp_path / "ws"
    for tf_config, expected in (
        (None, "multi-worker training needs the TF_CONFIG environment variable"),
        ("{not json", "TF_CONFIG is not valid JSON"),
        ('{"cluster": {"worker": ["127.0.0.1:1"]}, "task": {"type": "worker", "index": 3}}', "out of range"),
    ):
        env = {"TF_CONFIG": tf_config} if tf_config else {}
        if tf_config is None:
            os.environ.pop("TF_CONFIG", None)
        result = run_script(
            "machine_learning.py",
            *options(images, workspace, "--distribute", "multi-worker"),
            cwd=tmp_path,
            env=env,
        )
        assert result.returncode == 2
        assert result.stderr.strip().startswith("error: ") and expected in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
        assert not workspace.exists()

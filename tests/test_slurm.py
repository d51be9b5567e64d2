"""The sbatch scripts in slurm/, submitted unchanged to a real single-node SLURM cluster."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from conftest import REPO_DIR, read_metrics
from slurm_fixture import slurm_cluster  # noqa: F401

JOB_ENV = {"PYTHON": sys.executable, "PYTHONPATH": str(REPO_DIR)}
DIGITS = ["--config", str(REPO_DIR / "configs" / "digits_mlp.yaml"), "trainer.device=cpu"]


def submit(cluster, script: str, args: list[str], output: Path, *sbatch_options: str) -> int:
    options = [f"--output={output}", *sbatch_options, str(REPO_DIR / "slurm" / script)]
    return cluster.submit([*options, *args], cwd=REPO_DIR, env=JOB_ENV)


def test_two_srun_tasks_train_to_the_end(slurm_cluster, tmp_path):  # noqa: F811
    job = submit(
        slurm_cluster, "train.sbatch", [*DIGITS, "trainer.epochs=3", f"output_dir={tmp_path}"], tmp_path / "log"
    )
    assert slurm_cluster.wait(job, timeout=180) == "COMPLETED", (tmp_path / "log").read_text()
    lines = read_metrics(tmp_path)
    assert [(line["epoch"], line["world_size"], line["val/samples"]) for line in lines] == [
        (e, 2, 359) for e in (1, 2, 3)
    ]
    assert (tmp_path / "log").read_text().count("epoch 3/3") == 1


def test_multinode_script_runs_ddp_launch_inside_the_allocation(slurm_cluster, tmp_path):  # noqa: F811
    args = [*DIGITS, "trainer.epochs=1", f"output_dir={tmp_path}"]
    job = submit(slurm_cluster, "multinode.sbatch", args, tmp_path / "log", "--nodes=1")  # the cluster has one node
    assert slurm_cluster.wait(job, timeout=180) == "COMPLETED", (tmp_path / "log").read_text()
    assert [line["world_size"] for line in read_metrics(tmp_path)] == [2]  # one process per CPU core


def test_preempted_job_checkpoints_requeues_resumes_and_finishes(slurm_cluster, tmp_path):  # noqa: F811
    log, epochs = tmp_path / "log", 40
    job = submit(
        slurm_cluster, "preemptible.sbatch", [*DIGITS, f"trainer.epochs={epochs}", f"output_dir={tmp_path}"], log
    )
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.1)
    slurm_cluster.signal(job, "USR2", batch_only=True)  # what --signal=B:USR2@120 sends before the time limit
    slurm_cluster.wait_state(job, {"PENDING"}, timeout=60)
    slurm_cluster.release(job)  # skip the requeue start delay
    assert slurm_cluster.wait(job, timeout=240) == "COMPLETED", log.read_text()
    text = log.read_text()
    assert "stopped by SIGUSR2" in text and "requeued" in text and "resumed from" in text
    assert slurm_cluster.job_info(job)["Restarts"] == "1"
    assert [line["epoch"] for line in read_metrics(tmp_path)] == list(range(1, epochs + 1))  # each epoch once

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


def test_two_steps_of_one_job_train_side_by_side(slurm_cluster, tmp_path):  # noqa: F811
    # A sweep inside one allocation, a trial per step. Both steps' rank 0 took the port the job id gave: the second
    # failed to bind it (exit 2), and its rank 1 waited in the first step's store until that closed (a traceback).
    args = [*DIGITS, "model.hidden_sizes=[32]", "trainer.epochs=1", "trainer.startup_timeout_s=60"]
    trial = " ".join([sys.executable, "-m", "ddp_trainer.train", *args])
    steps = [f"srun --overlap -n 2 {trial} output_dir={tmp_path / name} &" for name in ("a", "b")]
    log = tmp_path / "log"
    job = slurm_cluster.submit(["-n", "2", f"--output={log}", "--wrap", " ".join([*steps, "wait"])], REPO_DIR, JOB_ENV)
    assert slurm_cluster.wait(job, timeout=180) == "COMPLETED", log.read_text()
    for name in ("a", "b"):
        assert [(line["epoch"], line["world_size"]) for line in read_metrics(tmp_path / name)] == [(1, 2)], (
            log.read_text()
        )


def preempt_and_finish(cluster, job: int | str, output_dir: Path, log: Path) -> str:
    """Warn the job as SLURM does before its time limit once it logged an epoch; the log once it finished."""
    metrics = output_dir / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (metrics.exists() and metrics.read_text()):
        time.sleep(0.1)
    cluster.signal(job, "USR2", batch_only=True)  # what --signal=B:USR2@120 sends before the time limit
    cluster.wait_state(job, {"PENDING"}, timeout=60)
    cluster.release(job)  # cut the requeue start delay
    assert cluster.wait(job, timeout=240) == "COMPLETED", log.read_text() + cluster.slurmd_errors(job)
    assert cluster.job_info(job)["Restarts"] == "1"
    return log.read_text()


def test_multinode_array_task_is_preempted_requeued_and_resumes_its_own_folder(slurm_cluster, tmp_path):  # noqa: F811
    # The cluster has one node: two srun tasks on it are two torchrun agents ("nodes"), with one rank each.
    log, epochs, run_dir = tmp_path / "log", 12, tmp_path / "array_task_5"
    args = [*DIGITS, f"trainer.epochs={epochs}", f"output_dir={tmp_path}"]
    layout = ["--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", "--array=5"]  # GPUs: the script's, unchanged
    job = submit(slurm_cluster, "multinode.sbatch", args, log, *layout)
    text = preempt_and_finish(slurm_cluster, job, run_dir, log)
    assert all(f"--nproc-per-node=1 --nnodes=2 --node-rank={node}" in text for node in (0, 1))
    assert text.count("ddp-launch: SIGUSR2 reached this agent") == 2  # both agents outlived the warning
    assert f"resumed from {run_dir / 'checkpoints' / 'last.pt'}" in text
    lines = read_metrics(run_dir)
    assert [(line["epoch"], line["world_size"]) for line in lines] == [(e, 2) for e in range(1, epochs + 1)]


def test_a_preempted_array_task_checkpoints_requeues_resumes_and_finishes_alone(slurm_cluster, tmp_path):  # noqa: F811
    # One task at a time: task 1 starts last, and holds the array's own id. By that id the relay's scancel and rank
    # 0's scontrol requeue addressed every task of the array: task 0, finished, was requeued and ran again.
    epochs, logs = 12, [tmp_path / f"log-{task}" for task in (0, 1)]
    args = [*DIGITS, f"trainer.epochs={epochs}", f"output_dir={tmp_path}"]
    job = submit(slurm_cluster, "preemptible.sbatch", args, tmp_path / "log-%a", "--array=0-1%1")
    assert slurm_cluster.wait(f"{job}_0", timeout=180) == "COMPLETED", logs[0].read_text()
    text = preempt_and_finish(slurm_cluster, f"{job}_1", tmp_path / "array_task_1", logs[1])
    assert "stopped by SIGUSR2" in text and f"SLURM job {job}_1 requeued; exit code 0" in text
    assert "resumed from" in text
    assert slurm_cluster.job_info(f"{job}_0")["Restarts"] == "0" and " run 2 " not in logs[0].read_text()
    for task in (0, 1):  # each epoch once
        assert [line["epoch"] for line in read_metrics(tmp_path / f"array_task_{task}")] == list(range(1, epochs + 1))

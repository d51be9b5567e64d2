"""Self-test of the SLURM fixture: a real sbatch job with two srun tasks."""

from __future__ import annotations

from pathlib import Path

from slurm_fixture import slurm_cluster  # noqa: F401


def test_cluster_runs_a_two_task_job(slurm_cluster, tmp_path: Path) -> None:  # noqa: F811
    output = tmp_path / "job.out"
    job_id = slurm_cluster.submit(["--ntasks=2", f"--output={output}", "--wrap", "srun hostname"], cwd=tmp_path)
    assert slurm_cluster.wait(job_id, timeout=60) == "COMPLETED", output.read_text() if output.exists() else ""
    assert len(output.read_text().splitlines()) == 2

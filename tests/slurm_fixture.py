"""A real single-node SLURM cluster for tests, started and stopped by scripts/slurm_cluster.sh.

Use it from a test module with `from slurm_fixture import slurm_cluster  # noqa: F401`. The fixture skips (never
fails) the module's tests when the cluster cannot be started: not root, no apt-get, daemons that do not come up.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

REPO_DIR = Path(__file__).resolve().parent.parent
SCRIPT = REPO_DIR / "scripts" / "slurm_cluster.sh"
START_TIMEOUT = 900.0  # a fresh machine first installs slurm and munge with apt-get
# Job states after which the job never runs again (a requeued job goes back to PENDING instead).
FINAL_STATES = frozenset(
    {"BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "TIMEOUT"}
)


def _run(command: list[str], timeout: float = 30.0, **kwargs) -> subprocess.CompletedProcess:
    """Run a command, capture its text output, never raise on a non-zero exit."""
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False, **kwargs)


def submit_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment without SLURM_*/SBATCH_* (they would steer sbatch), plus `extra`."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("SLURM_", "SBATCH_"))}
    env.update(extra or {})
    return env


class SlurmCluster:
    """Helpers around sbatch/scontrol for the cluster the fixture started."""

    def submit(self, args: list[str], cwd: str | Path, env: Mapping[str, str] | None = None) -> int:
        """`sbatch --parsable ARGS` in `cwd` (env: extra variables for the job); returns the job id."""
        result = _run(["sbatch", "--parsable", *args], cwd=cwd, env=submit_env(env))
        if result.returncode != 0:
            raise RuntimeError(f"sbatch {' '.join(args)} failed: {result.stderr.strip()}")
        return int(result.stdout.strip().split(";")[0])

    def job_info(self, job_id: int | str) -> dict[str, str]:
        """`scontrol show job -o ID` as a dict (JobState, ExitCode, Restarts, ...); {} once the job is forgotten."""
        result = _run(["scontrol", "show", "job", "-o", str(job_id)])
        if result.returncode != 0:
            return {}
        return dict(field.split("=", 1) for field in result.stdout.split() if "=" in field)

    def state(self, job_id: int | str) -> str:
        """The job's state (PENDING, RUNNING, COMPLETED, FAILED, ...), or UNKNOWN once slurmctld forgot it."""
        return self.job_info(job_id).get("JobState", "UNKNOWN")

    def wait(self, job_id: int | str, timeout: float = 120.0, poll: float = 0.5) -> str:
        """Poll until the job is done (requeues count as not done); returns its final state, cancels it on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            state = self.state(job_id)
            if state in FINAL_STATES or state == "UNKNOWN":
                return state
            if time.monotonic() > deadline:
                self.cancel(job_id)
                raise TimeoutError(f"SLURM job {job_id} still {state} after {timeout:.0f} s (cancelled)")
            time.sleep(poll)

    def wait_state(self, job_id: int | str, states: set[str], timeout: float = 60.0) -> str:
        """Poll until the job reaches one of `states` (e.g. {"RUNNING"}); returns that state."""
        deadline = time.monotonic() + timeout
        while (state := self.state(job_id)) not in states:
            if time.monotonic() > deadline:
                raise TimeoutError(f"SLURM job {job_id} is {state}, not in {sorted(states)}, after {timeout:.0f} s")
            time.sleep(0.2)
        return state

    def signal(self, job_id: int | str, signal: str, batch_only: bool = True) -> None:
        """Send `signal` (e.g. "USR2") now: to the batch shell only, or else to every job step."""
        scope = ["--batch"] if batch_only else []
        result = _run(["scancel", f"--signal={signal}", *scope, str(job_id)])
        if result.returncode != 0:
            raise RuntimeError(f"scancel --signal={signal} {job_id} failed: {result.stderr.strip()}")

    def requeue(self, job_id: int | str, release: bool = True) -> None:
        """`scontrol requeue ID`; with release, let it start again 2 s later instead of after the requeue delay."""
        result = _run(["scontrol", "requeue", str(job_id)])
        if result.returncode != 0:
            raise RuntimeError(f"scontrol requeue {job_id} failed: {result.stderr.strip()}")
        if release:
            self.release(job_id)

    def release(self, job_id: int | str, timeout: float = 30.0) -> None:
        """Once a requeued job is back to PENDING, cut its BeginTime delay to 2 s so it is scheduled almost at once."""
        self.wait_state(job_id, {"PENDING"}, timeout)
        # Not now: slurmd refuses a credential made in the same second it killed the old run ("already killed, do not
        # launch batch job") and the job ends FAILED; the cred_expire + 1 s delay this cuts exists to avoid that.
        _run(["scontrol", "update", f"jobid={job_id}", "StartTime=now+2"])

    def slurmd_errors(self, job_id: int | str) -> str:
        """The slurmd log's error lines about the job: why a run failed that never wrote to the job's own log."""
        log = Path(os.environ.get("SLURM_TEST_DIR", "/tmp/ddp-slurm")) / "log" / "slurmd.log"
        lines = log.read_text(errors="replace").splitlines() if log.exists() else []
        return "\n".join(line for line in lines if "error" in line and re.search(rf"\b{job_id}\b", line))

    def cancel(self, job_id: int | str) -> None:
        """`scancel ID`, ignoring errors (the job may already be gone)."""
        _run(["scancel", str(job_id)])


def _last_line(text: str) -> str:
    """The last non-empty line of `text`, or ''."""
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def start_cluster() -> str | None:
    """Start the cluster; returns None when it is up, else why it is not."""
    if os.geteuid() != 0:
        return "starting a SLURM cluster needs root"
    try:
        result = _run(["bash", str(SCRIPT), "start"], timeout=START_TIMEOUT, cwd=REPO_DIR)
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"scripts/slurm_cluster.sh start did not finish: {error}"
    if result.returncode != 0:
        reason = next((ln for ln in result.stderr.splitlines() if ln.startswith("slurm_cluster: ")), "")
        return f"scripts/slurm_cluster.sh start failed: {reason or _last_line(result.stderr) or result.returncode}"
    return None


def stop_cluster() -> None:
    """Stop the cluster; problems are reported on stderr, never raised."""
    try:
        result = _run(["bash", str(SCRIPT), "stop"], timeout=120.0, cwd=REPO_DIR)
    except (OSError, subprocess.TimeoutExpired) as error:
        print(f"scripts/slurm_cluster.sh stop did not finish: {error}")
        return
    if result.returncode != 0:
        print(f"scripts/slurm_cluster.sh stop failed: {result.stderr.strip()}")


@pytest.fixture(scope="module")
def slurm_cluster() -> Iterator[SlurmCluster]:
    """A running single-node SLURM cluster (partition `debug`) for this module; skips its tests when unavailable."""
    reason = start_cluster()
    if reason is not None:
        if os.geteuid() == 0:
            stop_cluster()  # clean up whatever half-started
        pytest.skip(reason)
    try:
        yield SlurmCluster()
    finally:
        stop_cluster()

"""Launching: SLURM's variables, ddp-launch's torchrun command, the doctor, and two torchrun 'nodes' on loopback."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys

import pytest
import torch.distributed as dist
from conftest import REPO_DIR, cli_env, read_metrics
from dist_helpers import doctor_under_nccl, free_port, spawn

from ddp_trainer import distributed, slurm
from ddp_trainer.cli import doctor
from ddp_trainer.cli.launch import main as launch_main
from ddp_trainer.cli.launch import torchrun_arguments
from ddp_trainer.errors import UsageError

LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")


@pytest.mark.parametrize(
    ("nodelist", "hosts"),
    [
        ("node[01-03,07]", ["node01", "node02", "node03", "node07"]),
        ("gpu5", ["gpu5"]),
        ("a[1-2],b3,c[08-10]", ["a1", "a2", "b3", "c08", "c09", "c10"]),
        ("rack[1-2]-n[1-2]", ["rack1-n1", "rack1-n2", "rack2-n1", "rack2-n2"]),
    ],
)
def test_node_lists_expand_like_scontrol(nodelist, hosts):
    assert slurm.expand_nodelist(nodelist) == hosts


def test_a_malformed_node_list_is_named():
    with pytest.raises(UsageError, match=r"node\[a-b\]"):
        slurm.expand_nodelist("node[a-b]")


def test_jobs_and_the_steps_of_a_job_get_distinct_ports_in_a_safe_range():
    # A node runs jobs numbered close together, and a job's steps side by side (`srun ... &` per trial).
    tasks = [{"SLURM_JOB_ID": str(job), "SLURM_STEP_ID": str(step)} for job in range(1000, 1100) for step in range(8)]
    ports = {slurm.step_port(task) for task in tasks}
    assert len(ports) == 800 and all(slurm.PORT_BASE <= port < slurm.PORT_BASE + slurm.PORT_SPAN for port in ports)
    assert slurm.step_port({"SLURM_JOB_ID": "1000"}) == slurm.step_port({"SLURM_JOB_ID": "1000", "SLURM_STEP_ID": "0"})


def test_an_array_task_is_named_to_slurm_as_itself_not_as_the_array():
    # The task that starts last holds the array's own id, which scancel and scontrol read as every task of the array.
    task = {"SLURM_JOB_ID": "86", "SLURM_ARRAY_JOB_ID": "86", "SLURM_ARRAY_TASK_ID": "1"}
    assert slurm.this_job(task) == "86_1"
    assert slurm.this_job({**task, "SLURM_JOB_ID": "87", "SLURM_ARRAY_TASK_ID": "0"}) == "86_0"
    assert slurm.this_job({"SLURM_JOB_ID": "90"}) == "90" and slurm.this_job({}) is None


@pytest.fixture
def srun_task(monkeypatch):
    for name in LAUNCH_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    variables = {"SLURM_JOB_ID": "4242", "SLURM_STEP_ID": "2", "SLURM_PROCID": "3", "SLURM_LOCALID": "1"}
    variables |= {"SLURM_NTASKS": "4"}
    variables |= {
        "SLURM_STEP_NUM_TASKS": "4",
        "SLURM_STEP_NODELIST": "node[07-08]",
        "SLURM_JOB_NODELIST": "node[07-08]",
    }
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    return monkeypatch


def test_an_srun_task_knows_its_rank_and_the_first_node_is_master(srun_task):
    launch = distributed.detect_launcher()
    assert (launch.launcher, launch.rank, launch.local_rank, launch.world_size) == ("srun", 3, 1, 4)
    assert (launch.master_addr, launch.master_port) == ("node07", slurm.step_port(os.environ))
    assert launch.job == "SLURM job 4242, step 2"


def test_a_batch_script_outside_srun_is_a_single_process(srun_task):
    srun_task.delenv("SLURM_STEP_NUM_TASKS")
    srun_task.setenv("SLURM_PROCID", "0")
    assert distributed.detect_launcher().world_size == 1


def test_torchrun_variables_win_over_slurm(srun_task):
    srun_task.setenv("RANK", "0")
    srun_task.setenv("WORLD_SIZE", "2")
    assert distributed.detect_launcher().launcher == "env"


def test_ddp_launch_makes_each_srun_task_an_agent_and_keeps_what_was_given():
    # Two tasks on one node are two agents, as two nodes with a task each would be.
    task = {"SLURM_JOB_ID": "77", "SLURM_NNODES": "1", "SLURM_NODEID": "0", "SLURM_STEP_NODELIST": "gpu[3-4]"}
    task |= {"SLURM_STEP_NUM_TASKS": "2", "SLURM_PROCID": "1", "SLURM_STEP_ID": "3"}
    arguments = torchrun_arguments(["--nproc-per-node=4", "--rdzv-id", "mine", "-m", "ddp_trainer.train", "a=1"], task)
    assert "--nnodes=2" in arguments and "--node-rank=1" in arguments and "--rdzv-backend=c10d" in arguments
    assert f"--rdzv-endpoint=gpu3:{slurm.step_port(task)}" in arguments
    assert not any(token.startswith("--rdzv-id=") for token in arguments)  # the user's --rdzv-id mine stays
    assert arguments[-5:] == ["--rdzv-id", "mine", "-m", "ddp_trainer.train", "a=1"]
    assert sum(token.startswith("--nproc") for token in arguments) == 1
    # Without --rdzv-id, each step of the job is a run of its own: two steps side by side never join one rendezvous.
    assert "--rdzv-id=77.3" in torchrun_arguments(["-m", "ddp_trainer.train"], task)


def test_ddp_launch_tells_torchrun_which_agent_hosts_the_store_the_first_task_on_the_first_node():
    step = {"SLURM_JOB_ID": "77", "SLURM_STEP_ID": "3", "SLURM_STEP_NODELIST": "gpu[3-4]", "SLURM_STEP_NUM_TASKS": "3"}
    tasks = [("gpu3", "0", "0"), ("gpu3", "1", "1"), ("gpu4", "2", "0")]  # (node, rank, rank on the node)
    tasks = [{"SLURMD_NODENAME": node, "SLURM_PROCID": rank, "SLURM_LOCALID": local} for node, rank, local in tasks]
    hosting = [torchrun_arguments(["train.py"], {**step, **task}) for task in tasks]
    assert [[token for token in arguments if token.startswith("--rdzv-conf")] for arguments in hosting] == [
        ["--rdzv-conf=is_host=true"],
        ["--rdzv-conf=is_host=false"],
        ["--rdzv-conf=is_host=false"],
    ]
    own_endpoint = torchrun_arguments(["--rdzv-endpoint=gpu9:29400", "train.py"], {**step, "SLURMD_NODENAME": "gpu3"})
    assert not any(token.startswith("--rdzv-conf") for token in own_endpoint)  # gpu3 does not host the user's
    first_task = {**step, **tasks[0]}
    tuned = torchrun_arguments(["--rdzv-conf", "join_timeout=900,is_host=false", "train.py"], first_task)
    assert [token for token in tuned if token.startswith("--rdzv")][-1] == "--rdzv-conf=is_host=false,join_timeout=900"
    tuned = torchrun_arguments(["--rdzv_conf=join_timeout=900", "train.py"], first_task)
    assert [token for token in tuned if token.startswith("--rdzv")][-1] == "--rdzv-conf=is_host=true,join_timeout=900"
    # A node list that names the nodes otherwise than slurmd does (a domain, another case): torchrun's own guess.
    for elsewhere in ({**first_task, "SLURMD_NODENAME": "gpu3.cluster"}, {**first_task, "SLURM_LOCALID": None}):
        arguments = torchrun_arguments(["train.py"], {key: value for key, value in elsewhere.items() if value})
        assert not any(token.startswith("--rdzv-conf") for token in arguments)


def test_ddp_launch_refuses_abbreviated_flags_and_a_rdzv_conf_without_a_key():
    # torchrun takes `--rdzv-c` for --rdzv-conf: ddp-launch, not seeing it, added its own, and torchrun kept the last.
    task = {"SLURM_JOB_ID": "77", "SLURM_STEP_NODELIST": "gpu3", "SLURM_STEP_NUM_TASKS": "1", "SLURM_PROCID": "0"}
    with pytest.raises(UsageError, match="^--rdzv-c stands for --rdzv-conf: write torchrun's flags out in full"):
        torchrun_arguments(["--rdzv-c=join_timeout=600", "train.py"], task)
    for pair in ("=5", "join_timeout"):  # the second reached torchrun's traceback
        with pytest.raises(UsageError, match=f"^--rdzv-conf: '{pair}' is not key=value"):
            torchrun_arguments([f"--rdzv-conf={pair}", "--standalone", "train.py"], {})


def test_ddp_launch_that_cannot_reach_the_rendezvous_store_says_so_in_one_line():
    endpoint = f"127.0.0.1:{free_port()}"  # nobody hosts a store there
    flags = ["--nnodes=2", "--node-rank=1", "--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}"]
    flags += ["--rdzv-conf=is_host=false,read_timeout=2", "--nproc-per-node=1"]
    command = [sys.executable, "-m", "ddp_trainer.cli.launch", *flags, "-m", "ddp_trainer.train"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, env=cli_env(), cwd=REPO_DIR)
    assert result.returncode == 1, result.stderr
    said = result.stderr.strip().splitlines()[-1]
    assert said.startswith(f"ddp-launch: error: the rendezvous store at {endpoint} cannot be reached or went away (")
    assert said.endswith("): the agent that hosts it is not running or stopped")
    assert "Traceback" not in result.stderr


def test_ddp_launch_given_a_rendezvous_backend_torchrun_does_not_know_says_so_in_one_line():
    flags = ["--nnodes=1", "--nproc-per-node=1", "--rdzv-backend=c10", f"--rdzv-endpoint=127.0.0.1:{free_port()}"]
    command = [sys.executable, "-m", "ddp_trainer.cli.launch", *flags, "-m", "ddp_trainer.train"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, env=cli_env(), cwd=REPO_DIR)
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines()[1:] == [
        "ddp-launch: error: --rdzv-backend=c10 is not a rendezvous backend torchrun knows: use c10d (or static, etcd, "
        "etcd-v2, or one a plugin registers)"
    ]


def test_ddp_launch_whose_other_nodes_never_join_or_whose_master_port_is_held_says_so_in_one_line():
    # A traceback of 50 lines ending in a RendezvousTimeoutError without a message (after 600 s by default), and one
    # of 56 ending in EADDRINUSE for the static rendezvous --master-addr/--master-port set up.
    alone = ["--nnodes=2", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}"]
    alone += ["--rdzv-conf=is_host=true,join_timeout=3"]
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        static = ["--nnodes=2", "--node-rank=0", "--master-addr=127.0.0.1", f"--master-port={holder.getsockname()[1]}"]
        said = {}
        for name, flags in (("alone", alone), ("static", static)):
            command = [sys.executable, "-m", "ddp_trainer.cli.launch", *flags, "--nproc-per-node=1", "-m", "x"]
            said[name] = subprocess.run(
                command, capture_output=True, text=True, timeout=120, env=cli_env(), cwd=REPO_DIR
            )
    assert said["alone"].returncode == 1 and said["alone"].stderr.splitlines()[1:] == [
        "ddp-launch: error: the rendezvous closed before all 2 node(s) joined it: start an agent on every node in time "
        "(--rdzv-conf=join_timeout=SECONDS), or give --nnodes the nodes that run"
    ]
    assert said["static"].returncode == 2 and said["static"].stderr.splitlines()[1:] == [
        f"ddp-launch: error: the rendezvous port of {static[2].split('=')[1]}:{static[3].split('=')[1]}, which this "
        "agent hosts, is in use (another job's store, or another agent told to host it): pass --master-port=PORT with "
        "a free port"
    ]


def test_ddp_launch_whose_rendezvous_port_another_job_holds_says_so_rather_than_train_in_its_store(tmp_path):
    # torchrun's own guess fell back to joining the store that held the port: the run trained in another job's store
    # and ended, torn down, when that job did. Job ids 10000 apart draw one port.
    job = next(job for job in range(4243, 4300) if port_is_free(slurm.step_port({"SLURM_JOB_ID": str(job)})))
    port = slurm.step_port({"SLURM_JOB_ID": str(job)})
    other_jobs_store = dist.TCPStore("0.0.0.0", port, 1, True, wait_for_workers=False)
    task = {"SLURM_JOB_ID": str(job), "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "1", "SLURM_PROCID": "0"}
    task |= {"SLURM_LOCALID": "0", "SLURMD_NODENAME": "localhost", "SLURM_STEP_NODELIST": "localhost"}
    train = ["-m", "ddp_trainer.train", "trainer.device=cpu", "trainer.epochs=1", f"output_dir={tmp_path}"]
    command = [sys.executable, "-m", "ddp_trainer.cli.launch", "--nproc-per-node=1", *train]
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=120, env={**cli_env(), **task}, cwd=REPO_DIR
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines()[1:] == [
        f"ddp-launch: error: the rendezvous port of localhost:{port}, which this agent hosts, is in use (another "
        "job's store, or another agent told to host it): pass --rdzv-endpoint=HOST:PORT with a free port"
    ]
    assert not tmp_path.joinpath("metrics.jsonl").exists()
    del other_jobs_store


def port_is_free(port: int) -> bool:
    """Whether this host could listen on `port` now."""
    with socket.socket() as probe:
        try:
            probe.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def test_ddp_launch_keeps_a_master_the_user_names_instead_of_the_slurm_rendezvous():
    task = {"SLURM_JOB_ID": "77", "SLURM_STEP_NODELIST": "gpu[3-4]", "SLURM_STEP_NUM_TASKS": "2", "SLURM_PROCID": "1"}
    given = ["--rdzv-backend=static", "--master-addr=10.0.0.5", "--master-port=29533", "train.py"]
    arguments = torchrun_arguments(given, task)
    assert "--nnodes=2" in arguments and "--node-rank=1" in arguments
    assert not any(token.startswith(("--rdzv-endpoint", "--rdzv-id", "--rdzv-backend=c10d")) for token in arguments)


def test_ddp_launch_doctor_with_a_training_script_is_refused(capsys):
    assert launch_main(["--doctor", "--standalone", "-m", "ddp_trainer.train", "--config", "x.yaml"]) == 2
    said = capsys.readouterr().err
    assert said == "ddp-launch: error: --doctor runs its own check: give it the launch flags only, not a script\n"


def test_ddp_launch_in_a_batch_script_outside_srun_is_the_only_agent():
    batch_script = {"SLURM_JOB_ID": "77", "SLURM_JOB_NODELIST": "gpu[3-4]", "SLURM_NNODES": "2", "SLURM_PROCID": "0"}
    arguments = torchrun_arguments(["train.py"], {**batch_script, "SLURMD_NODENAME": "gpu3"})
    assert "--nnodes=1" in arguments and "--node-rank=0" in arguments and "--rdzv-id=77.batch" in arguments
    # salloc's shell on a login node: the same variables, no slurmd. It pointed torchrun at gpu3 and timed out.
    with pytest.raises(UsageError, match="^this shell holds SLURM job 77 but runs on none of its nodes: start"):
        torchrun_arguments(["train.py"], batch_script)
    assert "--rdzv-endpoint" not in " ".join(torchrun_arguments(["--standalone", "train.py"], batch_script))


def test_ddp_launch_in_a_batch_script_of_several_nodes_warns_that_it_trains_on_one(srun_task, capsys):
    for name in ("SLURM_STEP_NUM_TASKS", "SLURM_STEP_ID", "SLURM_STEP_NODELIST", "SLURM_LOCALID"):
        srun_task.delenv(name)
    srun_task.setenv("SLURM_PROCID", "0")
    srun_task.setenv("SLURMD_NODENAME", "node07")
    srun_task.setenv("SLURM_JOB_NUM_NODES", "2")
    assert launch_main(["--dry-run", "-m", "ddp_trainer.train", "--nnodes=2"]) == 0  # the script's own --nnodes
    assert capsys.readouterr().err == (
        "ddp-launch: warning: SLURM job 4242 holds 2 nodes, but outside srun this agent trains on this one alone, the "
        "others idle: start ddp-launch with srun, one task per node (slurm/multinode.sbatch)\n"
    )
    for chosen in ("--standalone", "--nnodes=1"):
        assert launch_main(["--dry-run", chosen, "-m", "ddp_trainer.train"]) == 0
        assert capsys.readouterr().err == ""
    srun_task.setenv("SLURM_JOB_NUM_NODES", "1")
    assert launch_main(["--dry-run", "-m", "ddp_trainer.train"]) == 0
    assert capsys.readouterr().err == ""


def test_ddp_launch_in_an_srun_step_outlives_usr2_and_sigterm_and_exits_with_the_workers_code():
    # The worker signals its agent, as SLURM signals every process of the step, then stops as a rank not requeued does.
    step = {**cli_env(), "SLURM_JOB_ID": "7", "SLURM_STEP_NUM_TASKS": "1", "SLURM_PROCID": "0"}
    worker = ["--no-python", "sh", "-c", "kill -USR2 $PPID; kill -TERM $PPID; exit 140"]
    command = [sys.executable, "-m", "ddp_trainer.cli.launch", "--standalone", "--nproc-per-node=1", *worker]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, env=step, cwd=REPO_DIR)
    assert result.returncode == 140, result.stderr  # killed by USR2: -12; torchrun acting on SIGTERM: 143
    assert "ddp-launch: SIGUSR2 reached this agent" in result.stderr
    assert "ddp-launch: SIGTERM reached this agent" in result.stderr
    assert result.stderr.endswith("ddp-launch: exits with code 140, that of rank 0, which stopped on SIGUSR2\n")


@pytest.mark.parametrize(("nproc", "problem"), [("0", "not a positive count"), ("abc", "Unsupported nproc_per_node")])
def test_ddp_launch_names_a_process_count_torchrun_cannot_take_in_one_line(nproc, problem, capsys):
    # torchrun's AssertionError or ValueError traceback, exit 1; --dry-run printed the command unchecked.
    assert launch_main(["--dry-run", f"--nproc-per-node={nproc}", "train.py"]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"ddp-launch: error: --nproc-per-node={nproc}: {problem}") and error.count("\n") == 1


@pytest.mark.parametrize("nnodes", ["0", "abc", "3:1"])
def test_ddp_launch_names_a_node_count_torchrun_cannot_take_in_one_line(nnodes, capsys):
    # torchrun's traceback, exit 1, and --dry-run printed the command unchecked.
    assert launch_main(["--dry-run", f"--nnodes={nnodes}", "--nproc-per-node=1", "train.py"]) == 2
    assert capsys.readouterr().err == (
        f"ddp-launch: error: --nnodes={nnodes}: give a count of nodes, or MIN:MAX with 1 <= MIN <= MAX\n"
    )


def test_ddp_launch_on_cpu_starts_one_rank_per_core_the_job_was_given():
    pinned = subprocess.run(
        ["taskset", "-c", "0", sys.executable, "-m", "ddp_trainer.cli.launch", "--dry-run", "train.py"],
        capture_output=True,
        text=True,
        env=cli_env(),
        cwd=REPO_DIR,
        timeout=60,
    )
    assert pinned.returncode == 0, pinned.stderr
    assert "--nproc-per-node=1 train.py" in pinned.stdout  # one core of the machine's os.cpu_count()
    allocation = {"SLURM_JOB_ID": "7", "SLURM_CPUS_PER_TASK": "1"}  # SLURM gave the task 1 CPU, pinned or not
    assert "--nproc-per-node=1" in torchrun_arguments(["--standalone", "train.py"], allocation)
    # No --cpus-per-task: the node's CPUs, shared by the step's two agents on it (each started 2 ranks, on 2 CPUs).
    shared = {"SLURM_JOB_ID": "7", "SLURM_CPUS_ON_NODE": "2", "SLURM_STEP_TASKS_PER_NODE": "2", "SLURM_NODEID": "0"}
    assert "--nproc-per-node=1" in torchrun_arguments(["--standalone", "train.py"], shared)


def test_ddp_launch_flags_after_the_script_are_the_scripts_own():
    command = [sys.executable, "-m", "ddp_trainer.cli.launch", "--dry-run", "--standalone", "train.py"]
    result = run([*command, "--dry-run", "--doctor", "epochs=2"])
    assert result.returncode == 0, result.stderr
    printed = result.stdout.split()
    assert printed[printed.index("train.py") :] == ["train.py", "--dry-run", "--doctor", "epochs=2"]
    assert "ddp_trainer.cli.doctor" not in printed
    doctor = run([sys.executable, "-m", "ddp_trainer.cli.launch", "--doctor", "--dry-run", "--nproc-per-node=2"])
    assert doctor.returncode == 0, doctor.stderr
    assert doctor.stdout.split()[-4:] == ["torch.distributed.run", "--nproc-per-node=2", "-m", "ddp_trainer.cli.doctor"]


def test_ddp_launch_outside_slurm_only_adds_processes_per_node():
    arguments = torchrun_arguments(["--standalone", "train.py"], {})
    assert arguments[0].startswith("--nproc-per-node=") and arguments[1:] == ["--standalone", "train.py"]


def run(command: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=cli_env(), cwd=REPO_DIR)


def test_doctor_reports_every_rank_and_times_an_all_reduce():
    result = run([sys.executable, "-m", "ddp_trainer.cli.launch", "--doctor", "--standalone", "--nproc-per-node=2"])
    assert result.returncode == 0, result.stderr
    assert sorted(line.split(" on ")[0] for line in result.stdout.splitlines() if line.startswith("doctor rank")) == [
        "doctor rank 0/2 (local 0)",
        "doctor rank 1/2 (local 1)",
    ]
    assert "launcher=torchrun device=cpu" in result.stdout and "interface=lo" in result.stdout
    assert "doctor: all_reduce over 2 ranks (gloo) took" in result.stdout


def test_the_doctor_of_an_nccl_run_checks_the_gloo_group_training_uses_beside_it(tmp_path):
    # A host whose gloo picks an unreachable interface passed the doctor, then failed at training's first stop check.
    spawn(2, doctor_under_nccl, str(tmp_path))
    lines = (tmp_path / "rank0.txt").read_text().splitlines()
    assert len(lines) == 2 and lines[0].startswith("all_reduce over 2 ranks (nccl) took")
    assert re.fullmatch(
        r"all_reduce over 2 ranks \(gloo beside it: stop agreement, async saves\) took [\d.]+ ms: ok", lines[1]
    )


@pytest.mark.parametrize("timeout", ["inf", "nan", "0", "-1", "1e-300"])
def test_doctor_refuses_a_timeout_torch_cannot_hold(timeout, capsys):
    with pytest.raises(SystemExit) as exited:
        doctor.main(["--timeout", timeout])
    assert exited.value.code == 2
    assert f"argument --timeout: {timeout} is not seconds, at least 0.001 and at most 1e9" in capsys.readouterr().err


def test_doctor_names_an_unreachable_master_in_one_line():
    env = {**cli_env(), "RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    result = subprocess.run(
        [sys.executable, "-m", "ddp_trainer.cli.doctor", "--timeout", "2"], capture_output=True, text=True, env=env
    )
    assert result.returncode == 1
    assert result.stderr.strip().startswith("doctor: FAIL (rank 1): cannot reach the master 127.0.0.1:")
    assert len(result.stderr.strip().splitlines()) == 1


def test_two_torchrun_nodes_on_loopback_train_with_world_size_4_each_fetching_its_data_once(tmp_path):
    endpoint = f"127.0.0.1:{free_port()}"
    args = ["trainer.epochs=2", "trainer.device=cpu", "trainer.progress_bar=false", f"output_dir={tmp_path}"]
    # Each node's own data folder, as on nodes that share no filesystem: its two ranks fetched into it at once.
    args += ["data._target_=factories.fetched_digits", "data.download=true"]
    nodes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "ddp_trainer.cli.launch",
                "--nnodes=2",
                f"--node-rank={node}",
                "--nproc-per-node=2",
                "--rdzv-backend=c10d",
                f"--rdzv-endpoint={endpoint}",
                "--rdzv-id=loopback",
                "-m",
                "ddp_trainer.train",
                *args,
                f"data.root={tmp_path / f'node{node}'}",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=cli_env(),
            cwd=REPO_DIR,
        )  # fmt: skip
        for node in (0, 1)
    ]
    outputs = [node.communicate(timeout=180) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs
    lines = read_metrics(tmp_path)
    assert [line["world_size"] for line in lines] == [4, 4]
    assert [line["val/samples"] for line in lines] == [359, 359]
    assert [line["train/samples"] for line in lines] == [1440, 1440]  # 1,438 padded to a multiple of 4 ranks
    assert [len((tmp_path / f"node{node}" / "fetches").read_text().split()) for node in (0, 1)] == [1, 1]


def test_local_cpu_script_trains_on_two_ranks(tmp_path):
    env = {**cli_env(), "PYTHON": sys.executable}
    args = ["launch/local_cpu.sh", "--config", "configs/digits_mlp.yaml", "trainer.epochs=1", f"output_dir={tmp_path}"]
    result = subprocess.run(["bash", *args], capture_output=True, text=True, timeout=120, env=env, cwd=REPO_DIR)
    assert result.returncode == 0, result.stderr
    assert [line["world_size"] for line in read_metrics(tmp_path)] == [2]


def test_multi_node_script_names_the_missing_variable():
    env = {key: value for key, value in cli_env().items() if key not in ("MASTER_ADDR", "NNODES", "NODE_RANK")}
    result = subprocess.run(["bash", "launch/multi_node.sh"], capture_output=True, text=True, env=env, cwd=REPO_DIR)
    assert result.returncode != 0 and "MASTER_ADDR" in result.stderr


def test_multi_node_script_passes_launch_flags_to_torchrun_before_the_script():
    node_1 = {"MASTER_ADDR": "10.0.0.1", "NNODES": "2", "NODE_RANK": "1", "PYTHON": sys.executable}
    node_1["LAUNCH_FLAGS"] = "--nproc-per-node=3 --max-restarts=2 --rdzv-conf=join_timeout=900 --dry-run"
    args = ["launch/multi_node.sh", "--config", "configs/digits_mlp.yaml"]
    result = subprocess.run(["bash", *args], capture_output=True, text=True, env={**cli_env(), **node_1}, cwd=REPO_DIR)
    assert result.returncode == 0, result.stderr
    command = result.stdout.split()
    assert command[command.index("--nproc-per-node=3") :] == [
        "--nproc-per-node=3",
        "--max-restarts=2",
        "-m",
        "ddp_trainer.train",
        "--config",
        "configs/digits_mlp.yaml",
    ]
    # Merged into one option: torchrun keeps the last --rdzv-conf alone, which lost is_host.
    assert [token for token in command if token.startswith("--rdzv-conf")] == [
        "--rdzv-conf=is_host=false,join_timeout=900"
    ]
    assert "--rdzv-endpoint=10.0.0.1:29500" in command


def test_multi_node_script_on_node_0_refuses_a_port_another_jobs_store_holds(tmp_path):
    port = free_port()
    other_jobs_store = dist.TCPStore("0.0.0.0", port, 1, True, wait_for_workers=False)
    node_0 = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "NNODES": "2", "NODE_RANK": "0"}
    env = {**cli_env(), **node_0, "PYTHON": sys.executable}
    args = ["launch/multi_node.sh", "trainer.device=cpu", f"output_dir={tmp_path}"]
    result = subprocess.run(["bash", *args], capture_output=True, text=True, timeout=120, env=env, cwd=REPO_DIR)
    assert result.returncode == 2, result.stderr
    assert f"error: the rendezvous port of 127.0.0.1:{port}, which this agent hosts, is in use" in result.stderr
    del other_jobs_store


def test_doctor_names_missing_ranks_when_the_world_size_is_wrong():
    port = str(free_port())
    ranks = [
        subprocess.Popen(
            [sys.executable, "-m", "ddp_trainer.cli.doctor", "--timeout", "3"],
            env={**cli_env(), "RANK": str(rank), "WORLD_SIZE": "3", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for rank in (0, 1)
    ]
    errors = [process.communicate(timeout=60)[1] for process in ranks]
    assert [process.returncode for process in ranks] == [1, 1]
    assert errors[0].startswith(f"doctor: FAIL (rank 0): the rendezvous at 127.0.0.1:{port} timed out (--timeout=3)")
    assert "2/3 clients joined" in errors[0] and "Traceback" not in errors[0]


def test_the_doctor_runs_under_python_oo_which_drops_docstrings():
    command = [sys.executable, "-OO", "-m", "ddp_trainer.cli.doctor", "--help"]
    result = subprocess.run(command, capture_output=True, text=True, env=cli_env(), cwd=REPO_DIR, timeout=60)
    assert result.returncode == 0, result.stderr  # was an AttributeError: its description read __doc__
    assert "check a launch before it burns GPU hours" in result.stdout


def test_the_relay_of_a_command_that_cannot_run_says_so_in_one_line():
    command = [sys.executable, "-m", "ddp_trainer.cli.relay", "srn", "python", "train.py"]  # srun, mistyped
    result = subprocess.run(command, env={**cli_env(), "SLURM_JOB_ID": "42"}, capture_output=True, text=True)
    assert (result.returncode, result.stderr) == (127, "relay: error: srn cannot run (No such file or directory)\n")


def test_the_help_describes_ddp_launchs_own_flags(capsys):
    with pytest.raises(SystemExit) as ended:
        launch_main(["--help"])
    assert ended.value.code == 0
    shown = " ".join(capsys.readouterr().out.split())
    assert shown.startswith("usage: ddp-launch ")
    assert "--dry-run print the torchrun command" in shown and "--doctor check that every rank" in shown


def test_ddp_launch_without_a_script_names_itself(capsys):
    # torchrun's parser took its name from sys.argv[0]: `python -m ddp_trainer.cli.launch` said `launch.py: error`.
    with pytest.raises(SystemExit) as ended:
        launch_main(["--nproc-per-node=1"])
    assert ended.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "ddp-launch: error: the following arguments are required: training_script, training_script_args"
    )

"""`ddp-launch`: torchrun with its flags passed through, and inside a SLURM allocation the rendezvous filled in."""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import sys
from collections.abc import Mapping, Sequence
from types import FrameType
from typing import NoReturn

import torch
from torch.distributed import DistNetworkError
from torch.distributed import run as torchrun
from torch.distributed.elastic.multiprocessing import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.elastic.rendezvous.api import (
    RendezvousClosedError,
    RendezvousConnectionError,
    RendezvousTimeoutError,
)

from ddp_trainer import slurm
from ddp_trainer.cli import exit_after
from ddp_trainer.errors import UsageError, first_line, say
from ddp_trainer.preemption import STOP_SIGNALS

OWN_FLAGS = {  # ddp-launch's own flags, beside torchrun's, with their --help
    "--dry-run": "print the torchrun command, with what SLURM knows filled in, and exit",
    "--doctor": "check that every rank of the job meets and can talk (give the launch flags only, no script)",
}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]  # what --dry-run prints; the agent runs in this process


def _given(flags: Sequence[str], option_strings: Sequence[str]) -> bool:
    return any(token == option or token.startswith(option + "=") for token in flags for option in option_strings)


def default_nproc_per_node(environ: Mapping[str, str]) -> int:
    """One process per GPU; without GPUs, one per CPU core this job may use, not per core of the machine."""
    if torch.cuda.is_available():
        return torch.cuda.device_count()
    usable = len(os.sched_getaffinity(0))  # a cpuset, cgroup or taskset narrows it
    if "SLURM_JOB_ID" not in environ:
        return usable
    # SLURM pins tasks to their cores only with an affinity task plugin; its counts hold either way. Without
    # --cpus-per-task, this node's CPUs are shared by the step's tasks on it (agents, two on a node).
    per_task, on_node = environ.get("SLURM_CPUS_PER_TASK", ""), environ.get("SLURM_CPUS_ON_NODE", "")
    if per_task.isdigit():
        return min(usable, int(per_task))
    if on_node.isdigit():
        tasks = slurm.expand_tasks_per_node(environ.get("SLURM_STEP_TASKS_PER_NODE", "1"))
        node = int(environ.get("SLURM_NODEID", "0"))
        return max(1, min(usable, int(on_node) // tasks[node if node < len(tasks) else 0]))
    return usable


def slurm_flags(environ: Mapping[str, str]) -> dict[str, str]:
    """torchrun flags that a SLURM allocation determines: agents, this agent's rank, the c10d rendezvous."""
    if "SLURM_JOB_ID" not in environ:
        return {}
    # Each task of the srun step is one torchrun agent (a "node" to torchrun): one task per node, as the sbatch
    # scripts ask, makes them the nodes; two tasks on one node are two agents. A batch script alone is the only one.
    step = slurm.in_srun_step(environ)
    if not step and "SLURMD_NODENAME" not in environ:  # slurmd sets it on the nodes: this is salloc's login shell
        raise UsageError(
            f"this shell holds SLURM job {environ['SLURM_JOB_ID']} but runs on none of its nodes: start ddp-launch "
            "with srun (one task per node), or give --standalone to train on this host"
        )
    nodes = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST") or "localhost"
    names = slurm.expand_nodelist(nodes)
    first = names[0]
    flags = {
        "--nnodes": environ["SLURM_STEP_NUM_TASKS"] if step else "1",
        "--node-rank": environ["SLURM_PROCID"] if step else "0",
        "--rdzv-backend": "c10d",
        "--rdzv-endpoint": f"{first}:{slurm.step_port(environ)}",  # on the step's first node
        "--rdzv-id": f"{environ['SLURM_JOB_ID']}.{environ.get('SLURM_STEP_ID', 'batch')}",  # a job's steps: two runs
    }
    node, local = environ.get("SLURMD_NODENAME"), environ.get("SLURM_LOCALID", None if step else "0")
    if node in names and local is not None:  # else torchrun guesses (a node list that names nodes otherwise)
        # Told, not guessed: torchrun's guess, failing to bind the port, joins whatever store holds it (another job's,
        # whose end then ends this one). The first task on the first node hosts the store.
        flags["--rdzv-conf"] = f"is_host={str(node == first and local == '0').lower()}"
    return flags


def _unused_nodes(argv: Sequence[str], environ: Mapping[str, str]) -> str | None:
    """What a job's other nodes are left doing when ddp-launch runs outside srun and nothing names the node count."""
    nodes = environ.get("SLURM_JOB_NUM_NODES", "1")
    if slurm.in_srun_step(environ) or not nodes.isdigit() or int(nodes) < 2:
        return None
    if _given(argv[: len(argv) - _script_length(argv)], ("--nnodes", "--standalone")):
        return None
    return (
        f"SLURM job {environ.get('SLURM_JOB_ID')} holds {nodes} nodes, but outside srun this agent trains on this one "
        "alone, the others idle: start ddp-launch with srun, one task per node (slurm/multinode.sbatch)"
    )


def _torchrun_parser() -> argparse.ArgumentParser:
    """torchrun's parser, named ddp-launch in its messages (under `python -m` they said `launch.py`)."""
    parser = torchrun.get_args_parser()
    parser.prog = "ddp-launch"
    return parser


def torchrun_arguments(argv: Sequence[str], environ: Mapping[str, str]) -> list[str]:
    """torchrun's arguments for `argv` (torchrun's own syntax), with what the user left out filled in."""
    parser = _torchrun_parser()
    args = parser.parse_args(list(argv))
    flags = list(argv)[: len(argv) - len(args.training_script_args) - 1]
    options = {action.dest: action.option_strings for action in parser._actions if action.option_strings}
    _refuse_abbreviations(flags, [name for names in options.values() for name in names])
    _check_nproc(args.nproc_per_node)
    _check_nnodes(args.nnodes)
    added = []
    if not _given(flags, options["nproc_per_node"]):
        added.append(f"--nproc-per-node={default_nproc_per_node(environ)}")
    # A master the user names (the static rendezvous) is theirs: torchrun would take a --rdzv-endpoint over it.
    own_master = any(_given(flags, options[name]) for name in ("master_addr", "master_port"))
    flags, conf = _rdzv_conf(flags, options["rdzv_conf"])
    if not args.standalone:
        for flag, value in slurm_flags(environ).items():
            if flag == "--rdzv-conf":
                # Whether this agent hosts the store holds for the endpoint filled in, not for one the user named.
                if not (own_master or _given(flags, options["rdzv_endpoint"])):
                    conf = {"is_host": value.partition("=")[2], **conf}
            elif not _given(flags, options[flag.lstrip("-").replace("-", "_")]) and not (
                own_master and flag.startswith("--rdzv")
            ):
                added.append(f"{flag}={value}")
    if conf:  # one option: torchrun keeps the last --rdzv-conf alone
        added.append("--rdzv-conf=" + ",".join(f"{key}={value}" for key, value in conf.items()))
    # SLURM signals every process of a step, the workers too: torchrun passing SIGTERM on to them a second time would
    # make them stop at once, before their checkpoint. (An older torchrun, without the flag, always does.)
    handled = options.get("signals_to_handle")
    if slurm.in_srun_step(environ) and handled and not _given(flags, handled):
        added.append("--signals-to-handle=SIGINT,SIGHUP,SIGQUIT")
    return [*added, *flags, *list(argv)[len(argv) - len(args.training_script_args) - 1 :]]


def _check_nproc(nproc: str) -> None:
    """UsageError for a --nproc-per-node torchrun would fail on with a traceback."""
    try:
        count, problem = torchrun.determine_local_world_size(nproc), "not a positive count"
    except ValueError as error:  # a word it does not know, or a device this machine lacks
        count, problem = 0, first_line(error).rstrip(".")
    if count < 1:
        raise UsageError(f"--nproc-per-node={nproc}: {problem}; give a count of processes, or auto, cpu or gpu")


def _check_nnodes(nnodes: str) -> None:
    """UsageError for a --nnodes torchrun would fail on with a traceback (0, a word, 3:1)."""
    try:
        low, high = torchrun.parse_min_max_nnodes(nnodes)
    except (ValueError, RuntimeError):
        low = high = 0
    if not 1 <= low <= high:
        raise UsageError(f"--nnodes={nnodes}: give a count of nodes, or MIN:MAX with 1 <= MIN <= MAX")


def _refuse_abbreviations(flags: Sequence[str], names: Sequence[str]) -> None:
    """UsageError for a flag torchrun would take abbreviated: what ddp-launch fills in must see every flag given."""
    for token in flags:
        name = token.partition("=")[0]
        if name.startswith("--") and name not in names:  # torchrun's parser already refused a flag it does not know
            whole = " or ".join(sorted(option for option in names if option.startswith(name)))
            raise UsageError(f"{name} stands for {whole}: write torchrun's flags out in full for ddp-launch")


def _rdzv_conf(flags: Sequence[str], names: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """`flags` without their --rdzv-conf options, and those options' key=value pairs, a later one winning."""
    kept, conf, tokens = [], {}, iter(flags)
    for token in tokens:
        name, inline, value = token.partition("=")
        if name not in names:
            kept.append(token)
            continue
        for pair in filter(str.strip, (value if inline else next(tokens, "")).split(",")):
            key, equals, setting = pair.partition("=")
            if not key.strip() or not equals:  # torchrun failed on `foo` with a traceback
                raise UsageError(f"--rdzv-conf: {pair.strip()!r} is not key=value (write key=value, comma-separated)")
            conf[key.strip()] = setting.strip()
    return kept, conf


def own_flags(argv: Sequence[str]) -> tuple[set[str], list[str]]:
    """ddp-launch's flags among those before the training script, and the command line without them; the script's
    own arguments are the script's, `--dry-run` included."""
    script_part = _script_length(argv)
    head, script = list(argv)[: len(argv) - script_part], list(argv)[len(argv) - script_part :]
    return {token for token in head if token in OWN_FLAGS}, [token for token in head if token not in OWN_FLAGS] + script


def _script_length(argv: Sequence[str]) -> int:
    """How many of `argv`'s last tokens are the training script and its arguments (0: no script)."""
    parser = _torchrun_parser()
    for flag, said in OWN_FLAGS.items():
        parser.add_argument(flag, action="store_true", help=said)
    stand_in = "ddp-launch-no-script"  # the --doctor form names no script: torchrun's parser needs one to finish
    args = parser.parse_args([*argv, "-m", stand_in])
    return 0 if args.training_script == stand_in else len(args.training_script_args) - 1  # -m, stand-in


def _note_stop_signal(signum: int, frame: FrameType | None) -> None:
    # os.write, not print: a handler that interrupts a print on the same stream would fail with a reentrant call.
    os.write(2, f"ddp-launch: {signal.Signals(signum).name} reached this agent; it waits for the workers\n".encode())


def outlive_stop_signals() -> None:
    """In an srun step, keep this agent alive through USR2 and SIGTERM, which SLURM also sends every worker."""
    # SLURM signals every process of the step (its cgroup or process tree: the setsid'd workers too). The workers
    # checkpoint and exit with their own code, and the agent must wait for them; USR2's default action kills it.
    if slurm.in_srun_step(os.environ):
        for signum in STOP_SIGNALS:
            signal.signal(signum, _note_stop_signal)


def run_agent(arguments: Sequence[str]) -> int:
    """Run torchrun in this process; its exit code is the first failed worker's (torchrun's own is 1 for any)."""
    try:
        torchrun.main(list(arguments))
    except ChildFailedError as error:
        rank, failure = error.get_first_failure()
        exit_code = failure.exitcode if failure.exitcode >= 0 else 128 - failure.exitcode  # the shell's 128 + signal
        # A rank that took a stop signal (SLURM's preemption or time limit) ends the run as asked: no failure.
        how = {128 + signum: f"which stopped on {signum.name}" for signum in STOP_SIGNALS}.get(exit_code)
        say(f"ddp-launch: exits with code {exit_code}, that of rank {rank}, {how or 'the first to fail'}", sys.stderr)
        return exit_code
    except SignalException as error:
        return 128 + error.sigval
    except (RendezvousConnectionError, RendezvousTimeoutError, RendezvousClosedError, DistNetworkError) as error:
        return _rendezvous_failed(error, _torchrun_parser().parse_args(list(arguments)))
    except ValueError as error:
        backend = _torchrun_parser().parse_args(list(arguments)).rdzv_backend
        if not (isinstance(error.__cause__, KeyError) and f"'{backend}'" in str(error)):  # not its handler registry's
            raise
        say(
            f"ddp-launch: error: --rdzv-backend={backend} is not a rendezvous backend torchrun knows: use c10d (or "
            "static, etcd, etcd-v2, or one a plugin registers)",
            sys.stderr,
        )
        return 2
    return 0


def _rendezvous_failed(error: Exception, args: argparse.Namespace) -> int:
    """Say in one line why the agents did not meet; 2 for a port in use (a setting to change), else 1."""
    if isinstance(error, RendezvousTimeoutError | RendezvousClosedError):  # its text is empty or torch's internals
        say(
            f"ddp-launch: error: the rendezvous closed before all {args.nnodes} node(s) joined it: start an agent on "
            "every node in time (--rdzv-conf=join_timeout=SECONDS), or give --nnodes the nodes that run",
            sys.stderr,
        )
        return 1
    static = isinstance(error, DistNetworkError)  # --master-addr/--master-port: torchrun's static rendezvous
    endpoint = f"{args.master_addr}:{args.master_port}" if static else args.rdzv_endpoint
    cause = error.__cause__ or error
    if "EADDRINUSE" in str(cause):
        flag = "--master-port=PORT" if static else "--rdzv-endpoint=HOST:PORT"
        say(
            f"ddp-launch: error: the rendezvous port of {endpoint}, which this agent hosts, is in use (another "
            f"job's store, or another agent told to host it): pass {flag} with a free port",
            sys.stderr,
        )
        return 2
    say(
        f"ddp-launch: error: the rendezvous store at {endpoint} cannot be reached or went away ({first_line(cause)}): "
        "the agent that hosts it is not running or stopped",
        sys.stderr,
    )
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `ddp-launch`: run (or with --dry-run, print) the torchrun command; --doctor checks the job."""
    given, arguments = own_flags(sys.argv[1:] if argv is None else argv)
    dry_run, doctor = (flag in given for flag in OWN_FLAGS)
    if doctor and _script_length(arguments):
        say("ddp-launch: error: --doctor runs its own check: give it the launch flags only, not a script", sys.stderr)
        return 2
    if doctor:
        arguments += ["-m", "ddp_trainer.cli.doctor"]
    unused = _unused_nodes(arguments, os.environ)
    try:
        arguments = torchrun_arguments(arguments, os.environ)
    except UsageError as error:
        print(f"ddp-launch: error: {error}", file=sys.stderr)
        return 2
    if unused:
        say(f"ddp-launch: warning: {unused}", sys.stderr)
    if dry_run:
        print(shlex.join([*TORCHRUN, *arguments]))
        return 0
    say(f"ddp-launch: torchrun {shlex.join(arguments)}", sys.stderr)
    outlive_stop_signals()
    return run_agent(arguments)


def command() -> NoReturn:
    """The `ddp-launch` program: main() on the command line's arguments, then exit with its code."""
    exit_after(main)


if __name__ == "__main__":
    command()

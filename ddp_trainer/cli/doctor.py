"""`python -m ddp_trainer.cli.doctor` (or `ddp-launch --doctor`): check a launch before it burns GPU hours.

Every rank prints what it detected, then all ranks time one all_reduce (and, under NCCL, one over the gloo group that
training also uses). A failure is named in one line.
"""

from __future__ import annotations

import argparse
import fcntl
import socket
import struct
import sys
import time

import torch
import torch.distributed as dist

from ddp_trainer import distributed
from ddp_trainer.errors import CliError, UsageError, first_line, say
from ddp_trainer.fields import TIMEOUT_RANGE, timeout_ok

SIOCGIFADDR = 0x8915


def interface_towards(address: str | None) -> str:
    """The local network interface (and address) that packets to `address` leave through."""
    if not address:
        return "none (single process)"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect((address, 9))  # UDP connect sends nothing; it only picks the route
        except OSError as error:
            return f"no route to {address} ({error.strerror})"
        local_address = probe.getsockname()[0]
        for _, name in socket.if_nameindex():
            try:
                packed = fcntl.ioctl(probe.fileno(), SIOCGIFADDR, struct.pack("256s", name[:15].encode()))
            except OSError:
                continue  # interface without an IPv4 address
            if socket.inet_ntoa(packed[20:24]) == local_address:
                return f"{name} ({local_address})"
    return f"unknown ({local_address})"


def describe(launch: distributed.Launch, device: torch.device) -> str:
    """One line of what this rank detected."""
    nccl = ".".join(map(str, torch.cuda.nccl.version())) if torch.cuda.is_available() else "n/a"
    return (
        f"doctor rank {launch.rank}/{launch.world_size} (local {launch.local_rank}) on {socket.gethostname()}: "
        f"launcher={launch.launcher} device={device} master={launch.master_addr}:{launch.master_port} "
        f"interface={interface_towards(launch.master_addr)} torch={torch.__version__} nccl={nccl}"
    )


def reach_master(launch: distributed.Launch, timeout_s: float) -> None:
    """On ranks other than 0, wait until the master's port accepts connections, or raise naming it."""
    if launch.rank == 0 or launch.world_size == 1 or launch.launcher == "torchrun":
        return  # rank 0 opens the port itself; under torchrun the agents already met at the rendezvous
    deadline, reason = time.monotonic() + timeout_s, "no answer"
    while time.monotonic() < deadline:
        try:
            socket.create_connection((launch.master_addr, launch.master_port), timeout=2).close()
            return
        except OSError as error:
            reason = error.strerror or type(error).__name__
            time.sleep(0.5)
    raise UsageError(f"cannot reach the master {launch.master_addr}:{launch.master_port} in {timeout_s:g} s ({reason})")


def check_all_reduce(env: distributed.DistEnv, side: dist.ProcessGroup | None = None) -> str:
    """Time one all_reduce over all ranks (of CPU tensors over `side`, a gloo group, if given) and check its sum."""
    tensor = torch.ones(1, device=env.device if side is None else "cpu")
    started = time.perf_counter()
    if side is None:
        distributed.all_reduce_sum(tensor, env)
    else:
        dist.all_reduce(tensor, group=side)
    total = tensor.item()  # waits for the collective to finish
    elapsed_ms = 1000 * (time.perf_counter() - started)
    if total != env.world_size:
        raise RuntimeError(f"all_reduce summed to {total:g}, expected {env.world_size}: ranks disagree on the job")
    over = (env.backend or "no backend") if side is None else "gloo beside it: stop agreement, async saves"
    return f"all_reduce over {env.world_size} ranks ({over}) took {elapsed_ms:.1f} ms: ok"


def check_collectives(env: distributed.DistEnv) -> list[str]:
    """The lines of each all_reduce training runs: over the run's backend and, beside NCCL, over a gloo group."""
    lines = [check_all_reduce(env)]
    if env.backend == "nccl":  # gloo picks its own network interface: one that NCCL's working says nothing about
        lines.append(check_all_reduce(env, dist.new_group(backend="gloo")))
    return lines


def seconds(text: str) -> float:
    """A --timeout value: a timeout torch can hold (as the config's), else refused in argparse's one line."""
    value = float(text)
    if not timeout_ok(value):
        raise argparse.ArgumentTypeError(f"{text} is not {TIMEOUT_RANGE}")
    return value


def main(argv: list[str] | None = None) -> int:
    """Print this rank's view, join the group, time an all_reduce; exit 1 with one line naming what failed."""
    description = "check a launch before it burns GPU hours"  # not __doc__: python -OO drops docstrings
    parser = argparse.ArgumentParser(prog="python -m ddp_trainer.cli.doctor", description=description)
    parser.add_argument("--timeout", type=seconds, default=60.0, help="seconds to wait for the master and the ranks")
    timeout_s = parser.parse_args(argv).timeout
    launch = None
    try:
        launch = distributed.detect_launcher()
        device = distributed.resolve_device("auto", launch, distributed.visible_gpus())
        say(describe(launch, device))
        reach_master(launch, timeout_s)
        env = distributed.setup("auto", timeout_s, timeout_name="--timeout")
        try:
            lines = check_collectives(env)
        finally:
            distributed.teardown()
    except CliError as error:  # a bad setting, or a rendezvous that timed out
        say(f"doctor: FAIL{distributed.rank_label()}: {error}", sys.stderr)
        return 1
    except (RuntimeError, dist.DistError, TimeoutError) as error:
        where = f"{launch.master_addr}:{launch.master_port}" if launch else "?"
        reason = first_line(error)
        say(f"doctor: FAIL{distributed.rank_label()}: rendezvous with master {where}: {reason}", sys.stderr)
        return 1
    for line in lines if env.is_main else ():
        say(f"doctor: {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A key space in the launcher's store that this attempt's ranks agree on, and that no earlier attempt wrote in; there,
before the process group exists, they agree that every rank can start and runs the same."""

from __future__ import annotations

import contextlib
import json
import secrets
import socket
import threading
import time
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from ddp_trainer import __version__
from ddp_trainer.errors import CliError, RankLost, UsageError, first_line

if TYPE_CHECKING:
    from ddp_trainer.distributed import Launch

# An elastic agent keeps its store for the whole job, so a restarted attempt finds the keys (gloo's peer addresses,
# NCCL's ids) that a failed attempt left. torchrun's TORCHELASTIC_RESTART_COUNT cannot name attempts apart: each
# agent counts its own restarts, so the nodes of one attempt disagree. Every rank therefore draws a random token,
# and rank 0 numbers a round from a store counter; a rank takes a round only if its own token is in it, so a
# stale token (or a stale round) is never taken, and rank 0 numbers new rounds until every rank has taken one.
_ROOT = "ddp_trainer/rounds"
_SAME = "ddp_trainer/same"  # in the round's prefix: what each rank runs, and rank 0's verdict on it
_OWNER = "ddp_trainer/owner"  # the launch (an srun step's name) whose rank 0 opened the store: "" when unnamed
_POLL_S = 0.05
_FIRST_WINDOW_S = 1.0  # how long rank 0 waits for every rank to take its first round; doubled for each next one
_VERDICT_READ_S = 30.0  # how long rank 0, which may host the store, keeps it for the others to read a refusal
_SHOWN_KEYS = 4
_STRANDED: list[threading.Thread] = []  # connecting threads left waiting for an answer that never came
_ANSWER_GRACE_S = 5.0  # past the store's own timeout, which ends its connecting and rank 0's wait for the others


# How a TCPStore client words its server's going away.
STORE_GONE_MARKERS = ("Connection was likely closed", "Connection reset by peer", "Broken pipe")


def store_host(agent_store: bool) -> str:
    """Who hosts the job's store (torchrun's agent where `agent_store`, else rank 0), in the words of an error line."""
    return "the torchrun agent on the rendezvous endpoint's node" if agent_store else "rank 0"


def named_failure(error: dist.DistNetworkError, address: str, timeout_set: str, agent_store: bool) -> CliError | None:
    """A rendezvous's network error as one line naming its cause; None for one that says nothing known."""
    if "timed out" in str(error):  # a rank other than 0 found no store to join
        return RankLost(
            f"rank 0 never opened the rendezvous at {address} ({timeout_set}): {first_line(error)} See rank 0's output"
        )
    if any(marker in str(error) for marker in STORE_GONE_MARKERS):  # its host died as this rank waited there
        return RankLost(
            f"the rendezvous store at {address} is gone as this rank waited in it ({first_line(error)}): its host "
            f"({store_host(agent_store)}) stopped; see its output"
        )
    if "EADDRINUSE" in str(error):  # srun's port comes from the job and step ids: two jobs on a node may draw the same
        host, port = address.rsplit(":", 1)
        return UsageError(
            f"the rendezvous port {port} on {host} is in use (another job?): set MASTER_PORT to a free port "
            f"({first_line(error)})"
        )
    return None


def open_store(
    host: str, port: int, world_size: int, rank: int, agent_hosts: bool, timeout: timedelta, job: str | None = None
) -> dist.Store:
    """The job's store, served by the elastic agent where it hosts one, else by rank 0; prefixed for this attempt.

    `job` names this launch where the launcher does (an srun step): a rank refuses a store another job's rank 0 opened.
    """
    # multi_tenant: a script's second fit() opens the store again in the same process while the first may live on.
    host_store = rank == 0 and not agent_hosts
    store = _connect(host, port, timeout, world_size=world_size, is_master=host_store, multi_tenant=not agent_hosts)
    if host_store:
        store.set(_OWNER, job or "")
    elif job is not None and not agent_hosts:
        _refuse_another_jobs(store, job, f"{host}:{port}")
    deadline = time.monotonic() + timeout.total_seconds()
    return dist.PrefixStore(_agree_on_round(store, rank, world_size, deadline), store)


def _connect(host: str, port: int, timeout: timedelta, **options: Any) -> dist.TCPStore:
    """The TCPStore at host:port; UsageError if what listens there takes the connection and never answers as one."""
    # TCPStore's client waits for its first answer without a deadline: a program that is not a store (under srun,
    # one that took rank 0's port) would hold this rank for as long as it keeps the port open. So it waits in a
    # thread, left behind (a daemon) if that answer never comes, as this rank ends.
    made: list[dist.TCPStore | Exception] = []

    def connect() -> None:
        try:
            made.append(dist.TCPStore(host, port, timeout=timeout, **options))
        except Exception as error:  # raised again on the rank's own thread, below
            made.append(error)

    waiting = threading.Thread(target=connect, name="ddp-trainer rendezvous", daemon=True)
    waiting.start()
    waiting.join(timeout.total_seconds() + _ANSWER_GRACE_S)
    # Where none listens, TCPStore retries past its timeout (20 s: it gave up at 37). A store that opened just now
    # answers within a moment; a program that is not one, never.
    listening = not made and _accepts(host, port)
    waiting.join(_ANSWER_GRACE_S if listening else 0)
    if not made:
        _STRANDED.append(waiting)
        if not listening:
            raise dist.DistNetworkError(
                f"Nothing took a connection at ({host}, {port}): timed out after {timeout.total_seconds():g} s."
            )
        raise UsageError(
            f"the rendezvous port {port} on {host} took this rank's connection but never answered as a store: another "
            "program holds it (or the process that opened it is stopped); set MASTER_PORT to a free port"
        )
    if isinstance(made[0], Exception):
        raise made[0]
    return made[0]


def _accepts(host: str, port: int) -> bool:
    """Whether something at host:port takes a TCP connection within a second."""
    try:
        socket.create_connection((host, port), timeout=1.0).close()
    except OSError:
        return False
    return True


def stranded() -> bool:
    """Whether a thread `_connect` left still waits inside TCPStore's constructor for a store's first answer."""
    return any(thread.is_alive() for thread in _STRANDED)


def _refuse_another_jobs(store: dist.Store, job: str, address: str) -> None:
    """Raise UsageError if the store at `address` is another job's: its rank 0 took the port this job's could not."""
    owner = store.get(_OWNER).decode()  # waits for rank 0 to write it
    if owner and owner != job:
        # Before this rank writes a key: in the other job's rendezvous it could take the place of one of its ranks.
        raise UsageError(
            f"the rendezvous port {address} is held by {owner}, not by this one ({job}): set MASTER_PORT to a free port"
        )


def _agree_on_round(store: dist.Store, rank: int, world_size: int, deadline: float) -> str:
    """The prefix of a round every rank of this attempt takes; raises DistStoreError at `deadline`."""
    token = secrets.token_hex(16)
    store.set(f"{_ROOT}/token/{rank}", token)
    window_s = _FIRST_WINDOW_S
    while time.monotonic() < deadline:
        if rank == 0:
            taken = _lead(store, world_size, until=min(time.monotonic() + window_s, deadline))
            window_s *= 2  # ranks too slow to take a round in time (many, or a loaded host) get longer for the next
        else:
            taken = _follow(store, rank, token, deadline)
        if taken is not None:
            return f"{_ROOT}/{taken}"
    raise dist.DistStoreError(f"no round of the store was taken by all {world_size} ranks in time.")


def _lead(store: dist.Store, world_size: int, until: float) -> int | None:
    """Number a round of the tokens in the store now; the round if every other rank takes it by `until`, else None."""
    round_number = store.add(f"{_ROOT}/count", 1)
    tokens = store.multi_get([f"{_ROOT}/token/{rank}" for rank in range(world_size)])  # waits for one of each
    store.set(f"{_ROOT}/{round_number}/tokens", b" ".join(tokens))
    store.set(f"{_ROOT}/latest", str(round_number))
    if not _appears(store, [f"{_ROOT}/{round_number}/taken/{rank}" for rank in range(1, world_size)], until):
        return None  # a token was stale: its rank had not written this attempt's yet
    store.set(f"{_ROOT}/{round_number}/go", "1")
    return round_number


def _follow(store: dist.Store, rank: int, token: str, deadline: float) -> int | None:
    """Take the latest round if it holds this rank's token and rank 0 confirms it; else None, to look again."""
    round_number = int(store.get(f"{_ROOT}/latest"))  # waits for rank 0's first round
    if token.encode() not in store.get(f"{_ROOT}/{round_number}/tokens").split():
        time.sleep(_POLL_S)
        return None
    store.set(f"{_ROOT}/{round_number}/taken/{rank}", "1")
    # Until rank 0 confirms this round or numbers a newer one: a rank still waiting on an old round would miss the
    # newer round's window, and rank 0 would number rounds forever.
    while time.monotonic() < deadline:
        if store.check([f"{_ROOT}/{round_number}/go"]):
            return round_number
        if int(store.get(f"{_ROOT}/latest")) != round_number:
            return None
        time.sleep(_POLL_S)
    return None


def join(
    launch: Launch,
    backends: tuple[str, ...],
    gpu: str | None,
    timeout: tuple[str, float],
    facts: dict[str, Any],
    refusal: str | None,
) -> str:
    """Join the process group once every rank can start and runs the same `facts`; returns the backend taken, the
    first of `backends` that suits every rank's `gpu` (its id). A rendezvous that times out (a rank never started) is
    one line, not a traceback. `timeout` is (the key that set it, seconds)."""
    key, timeout_s = timeout
    limit = timedelta(seconds=timeout_s)  # turns a dead or stuck peer into an error, not a hang
    try:
        store = _store(launch, limit)
        same = {"torch": torch.__version__, "ddp_trainer": __version__, "backends": list(backends), **facts}
        refused, backend = agree(store, launch.rank, launch.world_size, same, refusal, gpu)
        if refused is not None:
            raise UsageError(refused)
        dist.init_process_group(backend, store=store, rank=launch.rank, world_size=launch.world_size, timeout=limit)
        return backend
    except dist.DistStoreError as error:
        raise RankLost(
            f"the rendezvous at {launch.master_addr}:{launch.master_port} timed out ({key}={timeout_s:g}): "
            f"{first_line(error)} A rank failed to start: see its output"
        ) from None
    except dist.DistNetworkError as error:
        address = f"{launch.master_addr}:{launch.master_port}"
        failure = named_failure(error, address, f"{key}={timeout_s:g}", launch.agent_store)
        if failure is None:
            raise
        raise failure from None


def tell_others(launch: Launch, refusal: str, timeout_s: float) -> None:
    """Meet the other ranks only to tell them that this one cannot start: they stop with it, not wait for it."""
    if launch.world_size > 1:
        with contextlib.suppress(CliError, dist.DistError):  # not told (no master, a peer gone): this rank's own error
            agree(_store(launch, timedelta(seconds=timeout_s)), launch.rank, launch.world_size, {}, refusal)


def _store(launch: Launch, timeout: timedelta) -> dist.Store:
    if launch.master_addr is None or launch.master_port is None:
        raise UsageError("RANK and WORLD_SIZE are set, MASTER_ADDR or MASTER_PORT is not: set both, or use torchrun")
    return open_store(
        launch.master_addr, launch.master_port, launch.world_size, launch.rank, launch.agent_store, timeout, launch.job
    )


def agree(
    store: dist.Store,
    rank: int,
    world_size: int,
    facts: dict[str, Any],
    refusal: str | None = None,
    gpu: str | None = None,
) -> tuple[str | None, str]:
    """(what this rank must refuse with, the backend every rank takes), the same on every rank.

    The refusal is this rank's own `refusal`, another rank's, or `facts` (versions, config) that differ from rank 0's;
    None when every rank can start and runs the same. The backend is the first of `facts["backends"]` (preferred
    first) that suits every rank's `gpu`, the id of its GPU: NCCL refuses two ranks on one; "" when none is.
    Through the store, before any collective: ranks of different backends or run lengths would hang in one, and a
    rank refusing alone, on a node of its own, would leave the others waiting for it.
    """
    store.set(f"{_SAME}/{rank}", json.dumps([socket.gethostname(), facts, refusal, gpu], default=repr))
    if rank == 0:
        told = [json.loads(raw) for raw in store.multi_get([f"{_SAME}/{peer}" for peer in range(world_size)])]
        verdict, backend = _verdict(told)
        store.set(f"{_SAME}/verdict", json.dumps([verdict, backend]))
        if verdict:  # the others must read it before rank 0 ends, and with it the store it may host
            _appears(
                store, [f"{_SAME}/read/{peer}" for peer in range(1, world_size)], time.monotonic() + _VERDICT_READ_S
            )
    else:
        verdict, backend = json.loads(store.get(f"{_SAME}/verdict"))
        if verdict:
            store.set(f"{_SAME}/read/{rank}", "1")
    return refusal or verdict or None, backend


def _verdict(told: list[list[Any]]) -> tuple[str, str]:
    """(the first rank that cannot start, or runs otherwise than rank 0, in one line, or ""; the backend taken)."""
    refused = next(((rank, said[2]) for rank, said in enumerate(told) if said[2] is not None), None)
    if refused is not None:
        return f"rank {refused[0]} cannot start: {refused[1]}", ""
    differences = _differences([said[:2] for said in told])
    return (differences, "") if differences else _backend(told)


def _backend(told: list[list[Any]]) -> tuple[str, str]:
    """("", the first of rank 0's backends that suits every rank's GPU, "" for none asked), or (why none does, "")."""
    shared = _shared_gpu(told)
    backends = told[0][1].get("backends", [])
    usable = [backend for backend in backends if backend != "nccl" or shared is None]
    if usable or not backends:
        return "", next(iter(usable), "")
    first, second, host = shared
    return (
        f"trainer.dist_backend=nccl needs a GPU per rank, but ranks {first} and {second} (on {host}) share one; start "
        "one process per GPU, or set trainer.dist_backend=auto (or gloo) to let ranks share GPUs"
    ), ""


def _shared_gpu(told: list[list[Any]]) -> tuple[int, int, str] | None:
    """The first two ranks told on one GPU, and its host; None when each GPU has one rank (or there are none)."""
    first_on: dict[str, int] = {}
    for rank, (host, _, _, gpu) in enumerate(told):
        if gpu in first_on:
            return first_on[gpu], rank, host
        if gpu is not None:
            first_on[gpu] = rank
    return None


def _differences(told: list[list[Any]]) -> str:
    """The first rank that runs otherwise than rank 0, in one line; "" when every rank runs the same."""
    first_host, first = told[0]
    differing = [(rank, host, facts, keys) for rank, (host, facts) in enumerate(told) if (keys := _keys(first, facts))]
    if not differing:
        return ""
    rank, host, facts, keys = differing[0]
    shown = keys[:_SHOWN_KEYS]
    more = f" (and {len(keys) - len(shown)} more)" if len(keys) > len(shown) else ""
    others = f" ({len(differing)} of {len(told)} ranks differ)" if len(differing) > 1 else ""

    def values(said: dict[str, Any]) -> str:
        return ", ".join(f"{key}={said.get(key, 'absent')}" for key in shown)

    return (
        f"the ranks do not run the same: rank {rank} (on {host}) has {values(facts)}{more} where rank 0 (on "
        f"{first_host}) has {values(first)}{others}; give every node the same config, overrides and packages"
    )


def _keys(first: dict[str, Any], facts: dict[str, Any]) -> list[str]:
    """The keys whose values differ between two ranks' facts, compared as sent: in JSON a NaN equals a NaN."""
    sent = [{key: json.dumps(value, sort_keys=True) for key, value in said.items()} for said in (first, facts)]
    return sorted(key for key in first.keys() | facts.keys() if sent[0].get(key) != sent[1].get(key))


def _appears(store: dist.Store, keys: list[str], until: float) -> bool:
    """Whether every key is in the store by the time.monotonic() `until`; polled, where the store's own wait for a
    key would end in a timeout error (and a warning in the log)."""
    while not store.check(keys):
        if time.monotonic() > until:
            return False
        time.sleep(_POLL_S)
    return True

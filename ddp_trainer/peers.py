"""A rank whose collective failed: was a peer at fault, and which one. Each rank that stops on an error of its own
leaves its line in the store, so the others name that rank with its reason, not only as gone."""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Iterator, Sequence

import torch.distributed as dist

from ddp_trainer import rendezvous
from ddp_trainer.distributed import DistEnv, detect_launcher
from ddp_trainer.errors import CliError, RankLost, first_line

# Markers of a collective that failed because a peer is gone or late, as gloo and NCCL word them.
PEER_FAILURE_MARKERS = ("Timed out", "timed out", "Connection closed by peer", "Connection reset by peer", "NCCL")


# NCCL's words for failures of this rank's own (its GPU, its memory, a GPU two ranks share), which no peer caused.
LOCAL_NCCL_FAILURES = ("invalid usage", "unhandled cuda error", "out of memory")


def is_peer_failure(error: BaseException) -> bool:
    """Whether `error` is a collective failing on a missing peer, rather than a bug on this rank."""
    text = str(error)
    if any(marker in text for marker in LOCAL_NCCL_FAILURES):
        return False
    return isinstance(error, dist.DistError) or any(marker in text for marker in PEER_FAILURE_MARKERS)


def _failure_marks(env: DistEnv, error: RuntimeError, wait_s: float) -> dict[int, str] | None:
    """How each rank's collective failed ("timeout", "closed"), told in the store within `wait_s`; None: rank 0 died."""
    timed_out = any(word in str(error) for word in ("Timed out", "timed out", "timeout", "timing out"))  # gloo, NCCL
    try:
        store = dist.PrefixStore("ddp_trainer/collective_failed", dist.distributed_c10d._get_default_store())
        store.set(str(env.rank), "timeout" if timed_out else "closed")
        deadline = time.monotonic() + wait_s
        while True:
            marked = [rank for rank in range(env.world_size) if store.check([str(rank)])]
            if len(marked) == env.world_size or time.monotonic() >= deadline:
                return {rank: store.get(str(rank)).decode() for rank in marked}
            time.sleep(0.2)
    except (RuntimeError, ValueError):  # no store, or its host is gone
        return None


_SAID = "ddp_trainer/stopped_with"  # in the store: the one line each rank that stopped on an error of its own said


def leave_word(env: DistEnv, error: BaseException | None) -> None:
    """If `error` is this rank's own one-line error, leave it in the store for `rank_lost` on the others to quote."""
    if isinstance(error, CliError) and not isinstance(error, RankLost) and env.distributed and dist.is_initialized():
        with contextlib.suppress(RuntimeError, ValueError):  # its host gone: the others say "stopped answering"
            dist.PrefixStore(_SAID, dist.distributed_c10d._get_default_store()).set(str(env.rank), str(error))


def _words(ranks: Sequence[int]) -> dict[int, str]:
    """What each of `ranks` left with `leave_word` before it stopped, where it did."""
    try:
        store = dist.PrefixStore(_SAID, dist.distributed_c10d._get_default_store())
        return {rank: store.get(str(rank)).decode() for rank in ranks if store.check([str(rank)])}
    except (RuntimeError, ValueError):
        return {}


def rank_lost(error: RuntimeError, env: DistEnv, timeout: tuple[str, float], where: str) -> RankLost:
    """The one-line error for a collective that failed `where` on a peer: names the ranks that stopped answering.

    `timeout` is the (config key, seconds) of the timeout in force: start-up's or training's.
    """
    key, timeout_s = timeout
    # Long enough for the other live ranks to time out too; a dead or hung rank never reports.
    marks = _failure_marks(env, error, wait_s=min(timeout_s, 10.0))
    missing = None if marks is None else [rank for rank in range(env.world_size) if rank not in marks]
    # A rank busy past the timeout is alive: the others time out waiting for it, then it finds them gone.
    late = [rank for rank, mark in (marks or {}).items() if mark == "closed"]
    waited = [rank for rank, mark in (marks or {}).items() if mark == "timeout"]
    if missing is None:
        culprit = f"{rendezvous.store_host(detect_launcher().agent_store)}, which hosts the rendezvous store, is gone"
    elif missing:
        said = _words(missing)
        silent = [rank for rank in missing if rank not in said]
        culprits = [f"rank {rank} stopped: {line}" for rank, line in said.items()]
        if silent:
            culprits.append(f"rank {', '.join(map(str, silent))} stopped answering (died or stalled: see its output)")
        culprit = "; ".join(culprits)
    elif late and waited:
        busy = "this rank was" if env.rank in late else f"rank {', '.join(map(str, late))} was"
        culprit = f"{busy} busy past the timeout while rank {', '.join(map(str, waited))} waited (slow, not dead)"
    else:
        culprit = "every rank's collective failed (network?)"
    return RankLost(f"{culprit}; a collective failed {where} ({key}={timeout_s:g}): {_said(error)}")


def _said(error: BaseException) -> str:
    """A collective's error; gloo's without its source location and the advice after its first sentence (an emoji)."""
    said = first_line(error)
    gloos = re.match(r"\[[^\]]*/gloo/[^\]]*\.cc:\d+\] ", said)
    return said[gloos.end() :].split(". ", 1)[0] if gloos else said


@contextlib.contextmanager
def naming_lost_ranks(env: DistEnv, startup_timeout_s: float, where: str) -> Iterator[None]:
    """A collective failed on a peer inside the block (start-up's timeout in force) is raised as `rank_lost`'s line."""
    # Outside the training loop (which names them itself): DDP's first broadcast, the last record, evaluate's sums.
    try:
        yield
    except CliError as error:  # this rank's own: the others, waiting for it in a collective, quote it
        leave_word(env, error)
        raise
    except RuntimeError as error:
        if not (env.distributed and is_peer_failure(error)):
            raise
        raise rank_lost(error, env, ("trainer.startup_timeout_s", startup_timeout_s), where) from error

"""Process-group helpers: the one place that knows whether this process is one rank of several.

Everything else asks :func:`world` and runs the same code at any world size; with no initialised process group the
world is ``(0, 1)`` and every helper is a no-op, so the single-process path is the distributed path with one rank
(``repair --distributed fsdp`` without torchrun runs in a group of one: FSDP2 needs a group).

* :func:`init_from_env`: under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment), initialise the default
  process group (gloo for CPU tensors, NCCL for CUDA ones); :func:`rank_device` maps ``cuda`` to
  ``cuda:LOCAL_RANK``; :func:`close` destroys the group;
* :func:`share_of`: this rank's share of a list of work items, balanced by cost (greedy, largest first: deterministic,
  so every rank computes the same split);
* :func:`rank_guard`: wraps a rank's local work so that a failure on one rank reaches every rank as
  :class:`~alibi_surgery.errors.RankFailed` (one line naming the rank) instead of a hang in the next collective;
* :func:`sum_across`: adds float64 CPU tensors across ranks in place with one ``all_reduce`` (flattened together);
* :func:`replicated`: work that every rank runs whole, in step (forwards of a model sharded over the ranks, where
  each forward is a collective): inside it, :func:`share_of` gives every rank every item and :func:`sum_across`
  adds nothing, so a diagnosis there is the single process's on every rank.

Limits: one process group (the default one); sums travel as float64 on the CPU (gloo), which is what the diagnosis
accumulators hold; a rank killed outright (SIGKILL, OOM killer) is torchrun's to tear down, not this module's.
"""

from __future__ import annotations

import contextlib
import os

import torch

from .errors import RankFailed, UsageError, WriteError

__all__ = ["world", "is_main", "init_from_env", "rank_device", "close", "share_of", "rank_guard", "sum_across",
           "replicated", "barrier"]

_REPLICATED = [0]  # depth of replicated() blocks


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group; ``(0, 1)`` when there is none."""
    dist = _dist()
    return (dist.get_rank(), dist.get_world_size()) if dist else (0, 1)


def is_main() -> bool:
    """True on rank 0 (and in a single process): the rank that writes files and prints."""
    return world()[0] == 0


def init_from_env(single: bool = False) -> bool:
    """Initialise the default process group from torchrun's environment (``WORLD_SIZE`` > 1, ``MASTER_ADDR`` ...)
    unless one is initialised already: gloo for CPU tensors, and NCCL for CUDA ones with ``cuda:LOCAL_RANK`` as this
    rank's current device when CUDA is available. Without torchrun, ``single=True`` makes a group of this process
    alone (on a file store in a temporary directory: FSDP2 needs a group even for one rank). Returns True when this
    call initialised it."""
    import tempfile

    import torch.distributed as dist

    if _dist():
        return False
    ranks = int(os.environ.get("WORLD_SIZE", "1"))
    if ranks <= 1 and not single:
        return False
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    backend = "cpu:gloo,cuda:nccl" if cuda else "gloo"
    if ranks > 1 or "MASTER_ADDR" in os.environ:  # torchrun, of one rank or more
        dist.init_process_group(backend)
    else:
        store = os.path.join(tempfile.mkdtemp(prefix="alibi-surgery-group-"), "store")
        dist.init_process_group(backend, init_method=f"file://{store}", rank=0, world_size=1)
    return True


def rank_device(device: torch.device) -> torch.device:
    """The device this rank runs on when ``device`` was asked for: ``cuda`` without an index is ``cuda:LOCAL_RANK``
    under a process group (one GPU per rank); anything else is kept."""
    if _dist() and device.type == "cuda" and device.index is None:
        return torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}")
    return device


def close() -> None:
    """Destroy the default process group, if any (the CLI, on leaving)."""
    dist = _dist()
    if dist:
        dist.destroy_process_group()


def share_of(costs: list[float], rank: int | None = None, world_size: int | None = None) -> list[int]:
    """Indices of the items ``rank`` takes (in ascending order), from a split of ``costs`` over ``world_size`` ranks
    that gives each item, largest first, to the rank with the least so far (ties: the lower rank, then the earlier
    item). The default rank and size are this process's; inside :func:`replicated`, every item."""
    if _REPLICATED[0] and rank is None:
        return list(range(len(costs)))
    if rank is None or world_size is None:
        rank, world_size = world()
    load = [0.0] * world_size
    owner = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        r = min(range(world_size), key=lambda r: (load[r], r))
        owner[i] = r
        load[r] += costs[i]
    return [i for i in range(len(costs)) if owner[i] == rank]


@contextlib.contextmanager
def rank_guard(what: str):
    """Run a rank's local part of ``what`` (e.g. ``"diagnosis"``); on leaving, every rank learns whether any rank
    failed (one ``all_gather_object``) and, if one did, every rank raises :class:`RankFailed` naming the first failed
    rank and its error. A no-op in a single process or a group of one, and inside :func:`replicated` (there every
    rank is in a collective forward: a failing rank exits, and torchrun stops the others)."""
    dist = _dist()
    if dist is None or dist.get_world_size() == 1 or _REPLICATED[0]:
        yield
        return
    rank, size = world()
    failure = None
    try:
        yield
    except Exception as exc:  # KeyboardInterrupt is torchrun's to forward to every rank
        line = (str(exc).splitlines() or [""])[0]
        failure = line if isinstance(exc, (UsageError, WriteError)) and line else f"{type(exc).__name__}: {line}"
        error = exc
    else:
        error = None
    reports = [None] * size
    dist.all_gather_object(reports, failure)
    failed = [r for r, msg in enumerate(reports) if msg is not None]
    if failed:
        first = failed[0]
        raise RankFailed(f"{what} failed on rank {first} of {size}: {reports[first]}") from error


def sum_across(*tensors: torch.Tensor) -> None:
    """Sum ``tensors`` (float64, on the CPU) over every rank, in place, with one ``all_reduce``. A no-op in a single
    process, or inside :func:`replicated` (every rank holds the whole sum already)."""
    dist = _dist()
    if dist is None or not tensors or _REPLICATED[0]:
        return
    with torch.inference_mode():  # accumulators made under inference mode can only be updated in it
        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat)
        start = 0
        for t in tensors:
            t.copy_(flat[start:start + t.numel()].view_as(t))
            start += t.numel()


@contextlib.contextmanager
def replicated():
    """Within the block every rank does the whole of the work (see the module docstring): for the forwards of a
    model sharded over the ranks, which all ranks must run alike."""
    _REPLICATED[0] += 1
    try:
        yield
    finally:
        _REPLICATED[0] -= 1


def barrier() -> None:
    """Wait for every rank (a no-op in a single process)."""
    dist = _dist()
    if dist is not None:
        dist.barrier()

"""Process-group set-up for torchrun, and the few collectives the engine needs.

Launch with ``torchrun --nproc_per_node N ...``: torchrun sets ``RANK``, ``WORLD_SIZE``
and ``LOCAL_RANK`` (and the rendezvous address). Without them everything degrades to a
single process: every helper here is safe to call when no process group exists.
"""
from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def init_distributed() -> tuple[int, int, int]:
    """Join the process group described by torchrun's environment (idempotent).

    Returns ``(rank, world_size, local_rank)``. Backend: nccl on CUDA, gloo on CPU. On
    CUDA the process's current device is set to ``cuda:LOCAL_RANK``.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if world > 1 and dist.is_available() and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(local)
            dist.init_process_group(backend="nccl")
        else:
            dist.init_process_group(backend="gloo")
    if is_dist():
        rank, world = dist.get_rank(), dist.get_world_size()
    return rank, world, local


def get_rank() -> int:
    return dist.get_rank() if is_dist() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if is_dist():
        dist.barrier()


def cleanup() -> None:
    """Leave the process group (call once, at the very end of the program).

    The barrier first: a rank that tears gloo down while another is still inside a collective
    aborts with "terminate called without an active exception" (torch 2.14.1: 2 of at most 14
    runs of tests/test_ddp.py alone, 0 of 40 with the barrier)."""
    if is_dist():
        dist.barrier()
        dist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks (no-op in a single process)."""
    if is_dist():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (``[obj]`` in a single process)."""
    if not is_dist():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def launch_rank() -> int:
    """This process's rank as torchrun gave it (``RANK``), readable before the process group exists."""
    return int(os.environ.get("RANK", "0"))


def restart_count() -> int:
    """How often torchrun's elastic agent restarted the worker group (``TORCHELASTIC_RESTART_COUNT``;
    0 outside torchrun and on the first attempt): a restarted worker continues from the checkpoint."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (``obj`` itself in a single process): a decision that one
    rank takes (a run folder's lock, the resume check) and all follow."""
    if not is_dist():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]



def join_restarted_group() -> None:
    """Join the process group of a worker group that torchrun restarted, under keys of this attempt.

    torchrun's agent keeps one store for all attempts; a restarted group that joins through it with
    ``init_process_group("env://")`` finds the previous attempt's rank addresses there, and gloo (torch
    2.14) waits forever connecting to the dead workers (eager connect), or is refused by them (lazy
    connect; measured with a six-line script, torchrun --standalone --max-restarts 2, one rank
    SIGKILLed). Here the store is the same, prefixed with the restart count, so each attempt meets only
    its own ranks. A no-op on a first attempt, in a single process, or once the group exists; call it
    before :func:`init_distributed`, which then finds the group joined."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if restart_count() == 0 or world <= 1 or not dist.is_available() or dist.is_initialized():
        return
    from datetime import timedelta

    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    hosts = rank == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() != "true"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size=world,
                          is_master=hosts, timeout=timedelta(minutes=10), wait_for_workers=False)
    store = dist.PrefixStore(f"xlearner/restart_{restart_count()}", store)
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
    dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo", store=store, rank=rank,
                            world_size=world)

"""torch.distributed support: shard the training set across ranks and merge exactly.

Under an initialised process group (``torchrun --nproc_per_node N -m tracin influence ...``, or
your own ``init_process_group``), each rank scores a contiguous, batch-aligned slice of the
training set against the full test set; top-k lists are all-gathered and merged with one more
top-k (exact, since every training example is scored by exactly one rank); self-influence and
matrix columns are concatenated in rank order. Batches are the same as in one process, so results
are identical to a single-process run. Works with NCCL (one GPU per rank) and gloo (CPU).
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator, List, Tuple

import torch


def rank_and_world() -> Tuple[int, int]:
    """(rank, world size) of the initialised process group, else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_from_env() -> bool:
    """Initialise the default process group from torchrun's environment (WORLD_SIZE > 1) if it is
    not initialised yet: NCCL when CUDA is available, else gloo. Returns whether this call did it."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available() or dist.is_initialized():
        return False
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend)
    return True


@contextmanager
def process_group() -> Iterator[None]:
    """Run a job inside torchrun's process group (:func:`init_from_env`; nothing without torchrun): on success every
    rank waits for the others before the group is torn down, so no rank leaves while rank 0 still writes."""
    started = init_from_env()
    finished = False
    try:
        yield
        finished = True
    finally:
        if started:
            import torch.distributed as dist

            if finished:
                dist.barrier()
            dist.destroy_process_group()


def shard_range(n: int, batch_size: int, rank: int, world: int) -> Tuple[int, int]:
    """[start, stop) of this rank's examples: whole batches, split as evenly as possible."""
    batches = -(-n // batch_size)
    first, last = rank * batches // world, (rank + 1) * batches // world
    return min(first * batch_size, n), min(last * batch_size, n)


def barrier() -> None:
    """Wait for every rank (nothing to do in a single process)."""
    if rank_and_world()[1] > 1:
        import torch.distributed as dist

        dist.barrier()


def all_gather(obj) -> List:
    """Every rank's ``obj`` (CPU tensors inside), in rank order."""
    import torch.distributed as dist

    _, world = rank_and_world()
    if world == 1:
        return [obj]
    out: List = [None] * world
    dist.all_gather_object(out, obj)
    return out


def merge_topk(parts: List[Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]], k: int):
    """Merge per-rank (pro values, pro indices, opp values, opp indices) [n_test, k_r] into exact top-k."""
    pv = torch.cat([p[0] for p in parts], 1)
    pi = torch.cat([p[1] for p in parts], 1)
    nv = torch.cat([p[2] for p in parts], 1)
    ni = torch.cat([p[3] for p in parts], 1)
    top_v, where = torch.topk(pv, k, dim=1)
    low_v, where_n = torch.topk(-nv, k, dim=1)
    return top_v, pi.gather(1, where), -low_v, ni.gather(1, where_n)

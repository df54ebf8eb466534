"""Small torch.distributed helpers that also work in a single process (no process group)."""
from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sums(sums: dict[str, float], op: str = "sum") -> dict[str, float]:
    """Element-wise sum (or max) of a dict of numbers over all workers; unchanged without a process group."""
    if not is_distributed():
        return dict(sums)
    keys = sorted(sums)
    # gloo reduces CPU tensors, NCCL needs them on the GPU
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([float(sums[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return dict(zip(keys, t.tolist()))


def any_bad_rank(bad: bool, rank: int) -> int | None:
    """Every worker learns whether any worker is ``bad`` (one all-reduce): the highest such rank, or None.
    Workers that must stop together (a non-finite loss on one of them) stop at the same step, so none waits
    in a collective the others left."""
    flag = all_reduce_sums({"bad_rank": float(rank) if bad else -1.0}, op="max")["bad_rank"]
    return int(flag) if flag >= 0 else None


def gather_strings(value: str) -> list[str]:
    """``value`` of every worker, in rank order (one all-gather); ``[value]`` without a process group."""
    if not is_distributed():
        return [value]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return [str(v) for v in out]

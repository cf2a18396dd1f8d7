"""Data-parallel helpers for the finetuning engine (``torchrun`` / ``torch.distributed.run``).

Every process draws the same global batch of B indices (same seeded generator) and trains on its
contiguous share of B / W rows; DDP averages the gradients, so with equal shares the update equals the
single-process update on the global batch:  (1/W) sum_r (W/B) sum_{i in share r} grad l_i = (1/B) sum_i grad l_i.
Per-sample passes (pool losses and embeddings, test evaluation) are split in contiguous row blocks and
gathered on every rank. The backend is gloo on CPU and NCCL on CUDA. Without ``torchrun`` (no
``WORLD_SIZE`` in the environment) everything here is a no-op and the engine runs in one process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

__all__ = [
    "DistContext",
    "all_gather_rows",
    "all_reduce_mean",
    "barrier",
    "broadcast_object",
    "current_context",
    "destroy_distributed",
    "init_distributed",
    "row_block",
]


@dataclass(frozen=True)
class DistContext:
    """Where this process sits in a data-parallel run.

    Attributes:
        rank: global rank r in [0, W).
        world_size: W (1 without torchrun).
        local_rank: rank on this machine (selects the CUDA device).
        backend: "gloo", "nccl" or "none".
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str = "none"

    @property
    def distributed(self) -> bool:
        """True when more than one process takes part."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """True on rank 0, the process that logs, calls callbacks and writes checkpoints."""
        return self.rank == 0


def init_distributed(*, backend: str = "auto", timeout_s: float = 600.0) -> DistContext:
    """Join the process group described by torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*).

    Args:
        backend: "auto" (NCCL when CUDA is visible, else gloo), "gloo" or "nccl".
        timeout_s: collective timeout.

    Returns:
        The context of this process; a one-process context when WORLD_SIZE is absent or 1.
    """
    if dist.is_available() and dist.is_initialized():
        return current_context()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend not in {"gloo", "nccl"}:
        raise ValueError(f"backend must be 'auto', 'gloo' or 'nccl', got {backend!r}")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    return current_context()


def current_context() -> DistContext:
    """The context of an already initialised process group (one-process context when none)."""
    if not (dist.is_available() and dist.is_initialized()):
        return DistContext()
    return DistContext(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        backend=str(dist.get_backend()),
    )


def destroy_distributed() -> None:
    """Leave the process group (no-op when none)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def row_block(n: int, ctx: DistContext) -> slice:
    """The contiguous block of rows [start, stop) of ``n`` that rank r handles (sizes differ by at most 1)."""
    bounds = np.linspace(0, n, ctx.world_size + 1).round().astype(int)
    return slice(int(bounds[ctx.rank]), int(bounds[ctx.rank + 1]))


def all_gather_rows(block: torch.Tensor, ctx: DistContext, *, device: torch.device | None = None) -> torch.Tensor:
    """Concatenate every rank's row block in rank order (blocks may differ in length).

    Args:
        block: this rank's rows (n_r, ...).
        ctx: the distributed context.
        device: where the collective runs (a CUDA device for NCCL); defaults to the block's device.

    Returns:
        (sum_r n_r, ...) on the block's original device.
    """
    if not ctx.distributed:
        return block
    home = block.device
    device = device or home
    if ctx.backend == "nccl" and device.type != "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    block = block.to(device).contiguous()
    size = torch.tensor([block.shape[0]], device=device, dtype=torch.int64)
    sizes = [torch.zeros_like(size) for _ in range(ctx.world_size)]
    dist.all_gather(sizes, size)
    counts = [int(s.item()) for s in sizes]
    longest = max(counts)
    padded = torch.zeros((longest, *block.shape[1:]), dtype=block.dtype, device=device)
    padded[: block.shape[0]] = block
    parts = [torch.empty_like(padded) for _ in range(ctx.world_size)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:c] for p, c in zip(parts, counts, strict=True)]).to(home)


def broadcast_object(obj: Any, ctx: DistContext, *, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (picklable objects)."""
    if not ctx.distributed:
        return obj
    box = [obj if ctx.rank == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_mean(value: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """The mean of a tensor over ranks (the value itself in one process)."""
    if not ctx.distributed:
        return value
    out = value.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / ctx.world_size


def barrier(ctx: DistContext) -> None:
    """Wait for every rank (no-op in one process)."""
    if ctx.distributed:
        dist.barrier()

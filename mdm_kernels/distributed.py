"""Negatives from the global batch under ``torch.distributed`` (DDP / ``torchrun``).

With a process group, every estimator first gathers the z's of all ranks with a
differentiable all-gather (only the small B × d_k tensors cross the network), draws the
shuffles once on rank 0 of the group and broadcasts them, and evaluates the bound on the
concatenated global batch — so its value equals what one process would compute on the
concatenated batch with the same permutations, on every rank.

Gradients.  Every rank computes the same global loss L.  The all-gather's backward sums the
incoming gradients over ranks (a reduce-scatter), so the gradient that reaches rank r's own
z_r is world_size · ∂L/∂z_r.  DDP then *averages* the model's parameter gradients over
ranks, which gives exactly Σ_r ∂L/∂z_r · ∂z_r/∂θ = ∂L/∂θ, the single-process gradient — the
same convention as the task loss, whose DDP-averaged per-rank means equal the global mean.
The critic's parameters get identical gradients on every rank (identical computation), so
DDP's average leaves them unchanged.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist


def check_group(group):
    """Validate ``group``: ``None`` (no distribution), ``"world"`` or a ProcessGroup."""
    if group is None:
        return None
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("group was given but torch.distributed is not initialised "
                         "(call torch.distributed.init_process_group first)")
    if isinstance(group, str):
        if group != "world":
            raise ValueError(f"group must be None, 'world' or a ProcessGroup, got {group!r}")
        return dist.group.WORLD
    return group


class _GatherRows(torch.autograd.Function):
    """Concatenate every rank's rows (rank order); backward sums over ranks, keeps ours."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group):
        ctx.group = group
        world = dist.get_world_size(group)
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        rows = grad.shape[0] // dist.get_world_size(ctx.group)
        rank = dist.get_rank(ctx.group)
        return grad[rank * rows:(rank + 1) * rows], None


def gather_batch(zs: Sequence[torch.Tensor], group) -> tuple[torch.Tensor, ...]:
    """The global batch: each z_k concatenated over ranks (differentiable, see module doc).

    Every rank must hold the same number of rows (use a DistributedSampler)."""
    sizes = torch.tensor([zs[0].shape[0]], device=zs[0].device)
    all_sizes = [torch.empty_like(sizes) for _ in range(dist.get_world_size(group))]
    dist.all_gather(all_sizes, sizes, group=group)
    if len({int(s) for s in all_sizes}) != 1:
        raise ValueError(f"every rank must hold the same batch size, got "
                         f"{[int(s) for s in all_sizes]} (use DistributedSampler, drop_last)")
    return tuple(_GatherRows.apply(z, group) for z in zs)


def broadcast_from_first(tensor: torch.Tensor | None, group) -> torch.Tensor | None:
    """Rank 0 of ``group``'s copy of ``tensor`` on every rank (shuffles and ε must agree)."""
    if tensor is None:
        return None
    src = dist.get_global_rank(group, 0) if group is not dist.group.WORLD else 0
    tensor = tensor.contiguous()
    dist.broadcast(tensor, src=src, group=group)
    return tensor

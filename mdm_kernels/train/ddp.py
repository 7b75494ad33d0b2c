"""``torchrun`` support for the training layer: process-group setup, the per-rank data
shards, sharded evaluation gathered on every rank, and small collective helpers.

Under ``torchrun --nproc_per_node N -m mdm_kernels.train`` the launcher sets ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK`` (and ``MASTER_ADDR``/``MASTER_PORT``); :func:`setup` then
initialises the default process group (``nccl`` on CUDA, ``gloo`` on CPU) and picks the
device ``cuda:LOCAL_RANK``.  Without those variables (or with ``WORLD_SIZE=1``) everything
here is a no-op and training is the plain single-process loop.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist


@dataclass
class Dist:
    """Where this process stands: ``world == 1`` means single-process training."""
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False  # we initialised the group, so we destroy it

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_world_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


@contextmanager
def distributed(device: torch.device):
    """Yield ``(Dist, device)``; initialise (and at exit destroy) the process group when
    launched by ``torchrun`` with ``WORLD_SIZE > 1``.  A group that the caller already
    initialised is used as is and left alone."""
    if dist.is_available() and dist.is_initialized():
        info = Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    elif env_world_size() > 1:
        if not dist.is_available():
            raise ImportError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if device.type == "cuda":
            device = torch.device("cuda", local)
            torch.cuda.set_device(device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend)
        info = Dist(dist.get_rank(), dist.get_world_size(), local, owns_group=True)
    else:
        yield Dist(), device
        return
    if info.world > 1 and device.type == "cuda" and device.index is None:
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    try:
        yield info, device
    finally:
        if info.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def shard_indices(n: int, info: Dist, seed: int, epoch: int) -> np.ndarray:
    """This rank's training indices for ``epoch``: a ``DistributedSampler`` shuffle
    (seeded by ``seed`` and the epoch) with ``drop_last=True``, so every rank holds the
    same number of rows (the global-batch estimators require it) and no row appears twice
    in a global batch (padding would duplicate rows and so make some negatives positives)."""
    from torch.utils.data import DistributedSampler
    sampler = DistributedSampler(range(n), num_replicas=info.world, rank=info.rank, shuffle=True,
                                 seed=seed, drop_last=True)
    sampler.set_epoch(epoch)
    return np.fromiter(iter(sampler), dtype=np.int64)


def broadcast_module(module: torch.nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s parameters and buffers to every rank."""
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src=src)


def average_grads(params) -> None:
    """All-reduce-average gradients in place (the critic: identical on every rank in exact
    arithmetic; averaging keeps the replicas bit-identical even with non-deterministic
    kernels)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= dist.get_world_size()
    off = 0
    for g in grads:
        g.copy_(flat[off:off + g.numel()].view_as(g))
        off += g.numel()


def mean_over_ranks(values: dict, device) -> dict:
    """Average a dict of floats over ranks (logging: per-rank task losses differ)."""
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    t /= dist.get_world_size()
    return dict(zip(keys, t.tolist()))


@torch.no_grad()
def predict_sharded(model, split, batch_size: int, device, info: Dist) -> np.ndarray:
    """Predictions on the whole ``split``, every rank predicting one contiguous shard;
    the shards are all-gathered so that every rank (rank 0 included) gets the full,
    ordered prediction vector and takes the same early-stopping decisions."""
    from .data import batch_from
    model.eval()
    n = len(split)
    chunks = np.array_split(np.arange(n), info.world)
    mine = chunks[info.rank]
    out = [model(batch_from(split, mine[s:s + batch_size], device))[0].float()
           for s in range(0, len(mine), batch_size)]
    local = torch.cat(out) if out else torch.zeros(0, device=device)
    width = max(len(c) for c in chunks)
    pad = torch.zeros(width, device=device, dtype=torch.float32)
    pad[:len(local)] = local.reshape(-1)
    parts = [torch.empty_like(pad) for _ in range(info.world)]
    dist.all_gather(parts, pad)
    return torch.cat([p[:len(c)] for p, c in zip(parts, chunks)]).cpu().numpy()


def gather_objects(obj, info: Dist) -> list:
    out = [None] * info.world
    dist.all_gather_object(out, obj)
    return out


def barrier(info: Dist) -> None:
    if info.enabled:
        dist.barrier()


def has_unused_parameters(model: torch.nn.Module, batch: dict, with_zs: bool, device) -> bool:
    """Whether a training step leaves some trainable parameter without a gradient (DDP then
    needs ``find_unused_parameters=True``, e.g. ``mult``).  One probe forward/backward on a
    few rows; RNG state and gradients are left as they were."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        pred, zs = model(batch)
        loss = pred.float().sum()
        if with_zs:
            loss = loss + sum(z.float().sum() for z in zs)
        loss.backward()
    unused = any(p.grad is None for p in model.parameters() if p.requires_grad)
    model.zero_grad(set_to_none=True)
    return unused

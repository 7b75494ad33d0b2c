"""Estimators under torch.distributed (gloo, 2 CPU processes): the bound on the gathered
global batch equals the single-process bound on the concatenated batch, and gradients follow
the documented DDP convention (world_size · ∂L/∂z_r on rank r's rows)."""
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import mdm_kernels as mk
from mdm_kernels.negatives import product_of_marginals

WORLD = 2
B_LOCAL = 5
DIMS = (3, 4, 2)


def _inputs():
    torch.manual_seed(0)
    critic = mk.MLPCritic(DIMS, hidden=(6,), activation="tanh").double()
    zs = [torch.randn(WORLD * B_LOCAL, d, dtype=torch.float64) for d in DIMS]
    return critic, zs


def _cases():
    perms = product_of_marginals(WORLD * B_LOCAL, 3, 2,
                                 generator=torch.Generator().manual_seed(1)).perms
    eps = torch.rand(2 * WORLD * B_LOCAL, generator=torch.Generator().manual_seed(2),
                     dtype=torch.float64)
    return {
        "dv_perms": lambda c, zs, **kw: mk.dv_bound(c, *zs, perms=perms, **kw),
        "dv_all": lambda c, zs, **kw: mk.dv_bound(c, *zs, negatives="all", **kw),
        "infonce": lambda c, zs, **kw: mk.infonce_bound(c, *zs, **kw),
        "wasserstein": lambda c, zs, **kw: mk.wasserstein_loss(c, *zs, perms=perms, epsilon=eps,
                                                               **kw),
    }


def _worker(rank, init_file, results):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD)
    try:
        critic, zs = _inputs()
        out = {}
        for name, fn in _cases().items():
            local = [z[rank * B_LOCAL:(rank + 1) * B_LOCAL].clone().requires_grad_(True)
                     for z in zs]
            critic.zero_grad()
            value = fn(critic, local, group="world")
            value.backward()
            out[name] = (value.item(), [z.grad.clone() for z in local],
                         [p.grad.clone() for p in critic.parameters()])
        # random shuffles: every rank must see the same ones (drawn on rank 0, broadcast)
        g = torch.Generator().manual_seed(100 + rank)  # deliberately different per rank
        local = [z[rank * B_LOCAL:(rank + 1) * B_LOCAL] for z in zs]
        out["random"] = mk.dv_bound(critic, *local, negatives=3, generator=g,
                                    group="world").item()
        results[rank] = out
    finally:
        dist.destroy_process_group()


def test_distributed_bounds_match_single_process():
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        manager = ctx.Manager()
        results = manager.dict()
        mp.start_processes(_worker, args=(os.path.join(tmp, "init"), results), nprocs=WORLD,
                           join=True, start_method="spawn")
        results = dict(results)
    critic, zs = _inputs()
    for name, fn in _cases().items():
        full = [z.clone().requires_grad_(True) for z in zs]
        critic.zero_grad()
        value = fn(critic, full)
        value.backward()
        for rank in range(WORLD):
            got_value, z_grads, p_grads = results[rank][name]
            assert got_value == pytest.approx(value.item(), rel=1e-12, abs=1e-12), name
            for zg, z in zip(z_grads, full):
                torch.testing.assert_close(zg, WORLD * z.grad[rank * B_LOCAL:(rank + 1) * B_LOCAL])
            for pg, p in zip(p_grads, critic.parameters()):
                torch.testing.assert_close(pg, p.grad)
    assert results[0]["random"] == pytest.approx(results[1]["random"], rel=1e-12)


def test_group_requires_initialised_process_group():
    critic, zs = _inputs()
    with pytest.raises(ValueError, match="not initialised"):
        mk.dv_bound(critic, *zs, group="world")

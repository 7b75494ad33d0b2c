"""python/gp_precision.py: the emulated tl.dot precisions (tf32 rounding and truncation,
tf32x3 / bf16x3 splits) on known values, and the emulated fused penalty against the float64
oracle on a small critic (issue 24's precision argument rests on both)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "python"))
import gp_precision as gpp  # noqa: E402
from mdm_kernels.critic import MLPCritic  # noqa: E402


def f32(*values):
    return torch.tensor(values, dtype=torch.float32)


def test_tf32_round_is_round_to_nearest_ties_away():
    one = 1.0
    ulp = 2.0 ** -10                              # tf32 ulp at 1 (10 explicit mantissa bits)
    x = f32(one, one + ulp / 2, -(one + ulp / 2), one + ulp / 2 - 2 ** -23,
            one + 1.5 * ulp, 3.0 + 0.75 * 2 * ulp, 2.0 ** -130)
    got = gpp.tf32_round(x)
    want = f32(one, one + ulp,                    # tie: away from zero (RNE would keep 1.0)
               -(one + ulp),                      # symmetric in the sign
               one,                               # just below the tie: down
               one + 2 * ulp,                     # tie between 1+ulp and 1+2ulp: away
               3.0 + 2 * ulp,                     # 3 has ulp 2·2^-10; 0.75 of it: up
               2.0 ** -130)                       # subnormal, already 10 bits
    assert torch.equal(got, want)
    special = gpp.tf32_round(f32(float("inf"), float("-inf"), float("nan")))
    assert special[0] == float("inf") and special[1] == float("-inf") and special[2].isnan()


def test_tf32_truncate_drops_the_low_13_bits():
    ulp = 2.0 ** -10
    x = f32(1.0 + 0.99 * ulp, -(1.0 + 0.99 * ulp), 1.0 + ulp)
    assert torch.equal(gpp.tf32_truncate(x), f32(1.0, -1.0, 1.0 + ulp))
    r = torch.randn(10_000, generator=torch.Generator().manual_seed(0))
    for fn in (gpp.tf32_truncate, gpp.tf32_round):
        bits = fn(r).view(torch.int32)
        assert bool(((bits & 0x1FFF) == 0).all()), fn.__name__
    rel_round = ((gpp.tf32_round(r) - r).abs() / r.abs()).max()
    rel_trunc = ((gpp.tf32_truncate(r) - r).abs() / r.abs()).max()
    assert rel_round <= 2.0 ** -11 and rel_trunc <= 2.0 ** -10
    assert bool((gpp.tf32_truncate(r).abs() <= r.abs()).all())     # toward zero


def test_bf16_round_is_round_to_nearest_even():
    ulp = 2.0 ** -7
    x = f32(1.0 + ulp / 2, 1.0 + 1.5 * ulp, 1.0 + 0.6 * ulp)
    assert torch.equal(gpp.bf16_round(x), f32(1.0, 1.0 + 2 * ulp, 1.0 + ulp))


def test_splits_exactness():
    x = torch.randn(20_000, generator=torch.Generator().manual_seed(1)) * 10.0
    x64 = x.double()
    hi, lo = gpp.split_tf32(x)
    # tf32x3: hi + lo is x exactly (lo = x − hi is representable in fp32) ...
    assert torch.equal(hi.double() + lo.double(), x64)
    assert bool((lo.abs() <= hi.abs() * 2.0 ** -11).all())
    # ... but the MMA reads lo truncated to tf32: 2 bits of lo are lost, ≤ 2^-21 |x|
    res = (x64 - hi.double() - gpp.tf32_truncate(lo).double()).abs()
    assert bool((res <= x64.abs() * 2.0 ** -21).all())
    assert float(res.max()) > 0                      # and the loss is real
    bhi, blo = gpp.split_bf16(x)
    assert torch.equal(gpp.bf16_round(bhi), bhi) and torch.equal(gpp.bf16_round(blo), blo)
    bres = (x64 - bhi.double() - blo.double()).abs()
    assert bool((bres <= x64.abs() * 2.0 ** -16).all())
    assert float((bres / x64.abs()).max()) > 2.0 ** -20


def test_dot_modes_order_against_float64():
    g = torch.Generator().manual_seed(2)
    a = torch.randn(32, 64, generator=g)
    b = torch.randn(64, 48, generator=g)
    want = a.double() @ b.double()
    err = {m: float((gpp.dot(a, b, m).double() - want).norm() / want.norm())
           for m in gpp.MODES}
    assert err["ieee"] < 1e-6 and err["tf32x3"] < 1e-6
    assert 1e-6 < err["bf16x3"] < 3e-5
    assert 1e-4 < err["tf32rna"] < err["tf32"] < 2e-3
    assert err["tf32x3"] * 100 < err["tf32"]
    assert err["bf16"] > err["tf32rna"]


@pytest.mark.parametrize("hidden,dims", [((16, 16), (8, 8, 8)),   # Gram path (D > H1)
                                         ((32,), (8, 8, 8))])      # direct path
def test_emulated_penalty_against_the_oracle(hidden, dims):
    torch.manual_seed(3)
    critic = MLPCritic(dims, hidden, "gelu")
    with torch.no_grad():
        for p in critic.parameters():
            p.mul_(2.0)
    joint, marginal, eps = gpp.make_batch(dims, 40, seed=4)
    ref = gpp.reference_penalty(critic, joint, marginal, eps, dims)
    params = gpp.critic_params(critic)
    errs = {}
    for mode in ("ieee", "tf32x3", "tf32"):
        out = gpp.emulated_penalty(params, joint, marginal, eps, "gelu", mode, block_n=16)
        errs[mode] = {k: gpp.rel_err(out[k].reshape(ref[k].shape), ref[k])
                      for k in ref if out.get(k) is not None}
    assert set(errs["ieee"]) == set(ref)             # every gradient of the oracle emulated
    # the closed form in fp32 is the oracle to fp32 rounding: the formulas are the kernel's
    assert max(errs["ieee"].values()) < 2e-5, errs["ieee"]
    assert max(errs["tf32x3"].values()) < 2e-5, errs["tf32x3"]
    worst_tf32 = max(errs["tf32"].values())
    assert worst_tf32 > 10 * max(errs["tf32x3"].values()), (errs["tf32"], errs["tf32x3"])

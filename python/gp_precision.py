"""Measured accuracy of the fused gradient penalty's ``tl.dot`` precision (issue 24).

The fused WGAN-GP kernel (Gulrajani et al., "Improved Training of Wasserstein GANs",
NeurIPS 2017; ``mdm_kernels/ops/gradient_penalty.py``) runs every ``tl.dot`` at
``DOT_PRECISION = "tf32x3"``.  Issue 24 asks for its tensor-core share to double, or for that
choice to be argued with measured accuracy.  Without a GPU this script measures it by
emulating, on the CPU and bit for bit where the hardware is documented, what each
``input_precision`` of Triton 3.9 does to the operands of a dot, and by running the kernel's
own closed-form forward and backward (same dots, same chunking, same float32 element-wise
code, same torch GEMMs around the launch) with every ``tl.dot`` replaced by the emulated
product.  Each result is compared with the float64 oracle
(``mdm_kernels.reference.gradient_penalty.gradient_penalty_terms`` + double backward).

Modes (what the generated code does; sources in docs/gradient_penalty.md):

* ``ieee``   — float32 products and sums (the float32 baseline).
* ``tf32x3`` — Triton's F32DotTC pass: a_hi = cvt.rna.tf32.f32(a), a_lo = a − a_hi (exact in
  fp32), likewise for b; acc = mma(a_lo, b_hi, 0); acc = mma(a_hi, b_lo, acc); NaNs of acc
  → 0; acc = mma(a_hi, b_hi, acc); result = acc + C.  a_lo is *not* rounded: the tensor core
  reads the top 19 bits of the fp32 register (truncation), as for plain tf32.
* ``tf32``   — Triton's plain ``"tf32"``: the fp32 operands go to the MMA unrounded, the
  tensor core keeps sign, exponent and the first 10 mantissa bits (truncation toward zero).
* ``tf32rna`` — tf32 with the operands rounded by cvt.rna first (what a kernel would get by
  rounding explicitly, as Triton's tf32x3 does for its hi parts).
* ``bf16x3`` — Triton's BF16xN pass with N = 2: a_hi = bf16(a) (round to nearest even), a_lo =
  bf16(a − a_hi); acc = mma(a_lo, b_hi, 0); acc = mma(a_hi, b_lo, acc); NaN → 0; acc =
  mma(a_hi, b_hi, acc); result = acc + C.
* ``bf16``   — one bf16 product (reference point only; not a Triton fp32 input precision).

An MMA is modelled as exact products (tf32 × tf32 has 22 significant bits, bf16 × bf16 16:
both exact in fp32) summed in fp32 — the tensor core's internal accumulation order is not
documented, so sums follow torch's CPU sgemm.  That part of the error is the same in every
mode and is the ``ieee`` row.

Usage::

    nice -n 10 python python/gp_precision.py            # paper scale, 3 seeds (~2 min)
    python python/gp_precision.py --quick               # one small case
    python python/gp_precision.py --json out.json       # also write every number
    nice -n 10 python python/gp_precision.py --sass     # sm_90 loop counts per precision
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mdm_kernels.critic import MLPCritic  # noqa: E402
from mdm_kernels.reference.gradient_penalty import gradient_penalty_terms  # noqa: E402

MODES = ("ieee", "tf32x3", "bf16x3", "tf32rna", "tf32", "bf16")

#: The kernel's chunk widths on a GPU (gradient_penalty.GP_CHUNK) and its BLOCK_N choices
#: (autotune candidates: 32 up to H = 128, 16 up to H = 256).
CHUNK = 32

_TF32_KEEP = -8192          # 0xFFFFE000 as int32: sign, exponent, 10 mantissa bits
_TF32_HALF = 0x1000         # half an ulp of tf32, added to the magnitude by cvt.rna


# ----------------------------------------------------------------------------- rounding


def _as_bits(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float32).contiguous().view(torch.int32)


def tf32_truncate(x: torch.Tensor) -> torch.Tensor:
    """What a tf32 MMA reads from an fp32 register: the low 13 mantissa bits dropped
    (round toward zero)."""
    return (_as_bits(x) & _TF32_KEEP).view(torch.float32)


def tf32_round(x: torch.Tensor) -> torch.Tensor:
    """``cvt.rna.tf32.f32``: round to nearest, ties away from zero, to 10 mantissa bits
    (add half a tf32 ulp to the magnitude bits, then drop 13 bits; inf / NaN unchanged, as
    sm_80's SASS for it does: IADD 0x1000 guarded by |x| < inf, LOP3 & 0xFFFFE000)."""
    bits = _as_bits(x)
    finite = torch.isfinite(x.to(torch.float32))
    rounded = torch.where(finite, bits + _TF32_HALF, bits) & _TF32_KEEP
    return torch.where(finite, rounded, bits).view(torch.float32)


def bf16_round(x: torch.Tensor) -> torch.Tensor:
    """fp32 → bf16 → fp32, round to nearest even (``arith.truncf``, torch's conversion)."""
    return x.to(torch.float32).to(torch.bfloat16).to(torch.float32)


def split_tf32(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton's tf32x3 split: hi = cvt.rna(x), lo = x − hi (exact in fp32, left unrounded)."""
    hi = tf32_round(x)
    return hi, x.to(torch.float32) - hi


def split_bf16(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton's bf16x3 split: hi = bf16(x), lo = bf16(x − hi)."""
    hi = bf16_round(x)
    return hi, bf16_round(x.to(torch.float32) - hi)


def _mma(a: torch.Tensor, b: torch.Tensor, acc: torch.Tensor | None, read) -> torch.Tensor:
    """One tensor-core product a @ b (+ acc): operands as the unit reads them (``read``),
    exact products, fp32 sums."""
    prod = read(a) @ read(b)
    return prod if acc is None else acc + prod


def _zero_nans(x: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isnan(x), torch.zeros_like(x), x)


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x



def _three_pass(a, b, split, operand_rounding):
    """The x3 modes: a = a_hi + a_lo, b likewise; lo·hi, then hi·lo (NaNs zeroed), then hi·hi
    accumulated in that order, as Triton 3.9 emits them."""
    a_hi, a_lo = split(a)
    b_hi, b_lo = split(b)
    acc = _mma(a_lo, b_hi, None, operand_rounding)
    acc = _zero_nans(_mma(a_hi, b_lo, acc, operand_rounding))
    return _mma(a_hi, b_hi, acc, operand_rounding)

def dot(a: torch.Tensor, b: torch.Tensor, mode: str) -> torch.Tensor:
    """``tl.dot(a, b, input_precision=mode)`` for fp32 a (M × K), b (K × N), emulated."""
    a = a.to(torch.float32)
    b = b.to(torch.float32)
    if mode == "ieee":
        return a @ b
    if mode == "tf32":
        return _mma(a, b, None, tf32_truncate)
    if mode == "tf32rna":
        return _mma(tf32_round(a), tf32_round(b), None, tf32_truncate)
    if mode == "tf32x3":
        return _three_pass(a, b, split_tf32, tf32_truncate)
    if mode == "bf16x3":
        return _three_pass(a, b, split_bf16, _identity)
    if mode == "bf16":
        return _mma(bf16_round(a), bf16_round(b), None, _identity)
    raise ValueError(f"unknown mode {mode!r}")


# ------------------------------------------------------------------- activations (fp32)


def _act(x, act):
    if act == "relu":
        return torch.clamp(x, min=0.0)
    if act == "tanh":
        return torch.tanh(x)
    if act == "gelu":
        return 0.5 * x * (1.0 + torch.erf(x * 0.7071067811865476))
    raise ValueError(act)


def _act_grad(x, act):
    if act == "relu":
        return (x > 0).to(x.dtype)
    if act == "tanh":
        t = torch.tanh(x)
        return 1.0 - t * t
    pdf = 0.3989422804014327 * torch.exp(-0.5 * x * x)
    return 0.5 * (1.0 + torch.erf(x * 0.7071067811865476)) + x * pdf


def _act_grad2(x, act):
    if act == "relu":
        return torch.zeros_like(x)
    if act == "tanh":
        t = torch.tanh(x)
        return -2.0 * t * (1.0 - t * t)
    pdf = 0.3989422804014327 * torch.exp(-0.5 * x * x)
    return pdf * (2.0 - x * x)


# ------------------------------------------------------------- the kernel, emulated


def _chunks(n: int, width: int = CHUNK):
    return [(c, min(c + width, n)) for c in range(0, n, width)]


def emulated_penalty(params: dict, joint: torch.Tensor, marginal: torch.Tensor,
                     eps: torch.Tensor, act: str, mode: str, block_n: int) -> dict:
    """The fused penalty and every gradient, as ``_gp_kernel`` plus its torch wrapper
    compute them (module docstring of ops/gradient_penalty.py), with each ``tl.dot`` at
    ``mode`` and everything else in fp32.

    params: float32 ``W1`` (H1 × D), ``b1``, ``wout``, and for two layers ``W2`` (H2 × H1),
    ``b2``.  joint / marginal: N × D (modalities concatenated); eps: (N,).
    Returns {"gp", "W1", "b1", "W2", "b2", "wout", "joint", "marginal"} (fp32; b1, b2 and
    the inputs are None for relu, whose σ'' = 0 makes them identically zero) and "norm",
    the per-row ‖∇_x T(x̂)‖ the kernel computed.
    """
    f32 = torch.float32
    w1 = params["W1"].to(f32)
    b1 = params["b1"].to(f32)
    wout = params["wout"].to(f32)
    two = "W2" in params
    w2 = params["W2"].to(f32) if two else None
    b2 = params["b2"].to(f32) if two else None
    curved = act != "relu"
    n, dim = joint.shape
    h1n = w1.shape[0]
    h2n = w2.shape[0] if two else 0
    # torch, outside the kernel: one GEMM of the joint and marginal rows (fp32), the Gram
    rows = torch.cat([joint, marginal]).to(f32)
    sj, sm = (rows @ w1.t()).chunk(2)
    gram = dim > h1n
    wmat = w1 @ w1.t() if gram else w1
    inv_n = 1.0 / n

    loss_parts, norms = [], []
    db1 = torch.zeros(h1n, dtype=f32)
    dwout = torch.zeros(h2n if two else h1n, dtype=f32)
    dmat = torch.zeros_like(wmat)
    dw2 = torch.zeros_like(w2) if two else None
    db2 = torch.zeros(h2n, dtype=f32) if two else None
    dsj = torch.zeros_like(sj)
    dsm = torch.zeros_like(sm)
    for r0 in range(0, n, block_n):       # one tile per program at the sizes measured here
        sl = slice(r0, min(r0 + block_n, n))
        e = eps[sl].to(f32)[:, None]
        a1 = e * sj[sl] + (1.0 - e) * sm[sl] + b1
        d1 = _act_grad(a1, act)
        if two:
            h1 = _act(a1, act)
            q = torch.zeros_like(a1)
            for c0, c1 in _chunks(h2n):
                a2c = dot(h1, w2[c0:c1].t(), mode) + b2[c0:c1]
                q = q + dot(wout[c0:c1] * _act_grad(a2c, act), w2[c0:c1], mode)
            u = q * d1
        else:
            u = wout * d1
        gu = torch.zeros(u.shape[0], wmat.shape[1], dtype=f32)
        for j0, j1 in _chunks(h1n):
            gu = gu + dot(u[:, j0:j1], wmat[j0:j1], mode)
        s = (u * gu).sum(1) if gram else (gu * gu).sum(1)
        s = torch.clamp(s, min=0.0)
        alive = s > 0
        nu = torch.sqrt(s)
        norms.append(nu)
        gap = nu - 1.0
        loss_parts.append((gap * gap).sum() * inv_n)
        beta = torch.where(alive, 2.0 * gap * inv_n / torch.where(alive, nu, 1.0),
                           torch.zeros_like(nu))
        r_direct = torch.zeros_like(u)
        for j0, j1 in _chunks(h1n):
            buj = beta[:, None] * u[:, j0:j1]
            if gram:
                dmat[j0:j1] += 0.5 * dot(buj.t(), u, mode)
            else:
                dmat[j0:j1] += dot(buj.t(), gu, mode)
                r_direct[:, j0:j1] = dot(beta[:, None] * gu, w1[j0:j1].t(), mode)
        r = beta[:, None] * gu if gram else r_direct
        if two:
            dq = r * d1
            back1 = torch.zeros_like(u)
            for c0, c1 in _chunks(h2n):
                w2c = w2[c0:c1]
                a2c = dot(h1, w2c.t(), mode) + b2[c0:c1]
                d2c = _act_grad(a2c, act)
                dvc = dot(dq, w2c.t(), mode)
                dwout[c0:c1] += (dvc * d2c).sum(0)
                dw2c = dot((wout[c0:c1] * d2c).t(), dq, mode)
                if curved:
                    delta2 = dvc * wout[c0:c1] * _act_grad2(a2c, act)
                    dw2c = dw2c + dot(delta2.t(), h1, mode)
                    db2[c0:c1] += delta2.sum(0)
                    back1 = back1 + dot(delta2, w2c, mode)
                dw2[c0:c1] += dw2c
            delta1 = r * q * _act_grad2(a1, act) + back1 * d1 if curved else None
        else:
            dwout += (r * d1).sum(0)
            delta1 = r * wout * _act_grad2(a1, act) if curved else None
        if curved:
            db1 += delta1.sum(0)
            dsj[sl] = e * delta1
            dsm[sl] = (1.0 - e) * delta1
    gp = torch.stack(loss_parts).sum()
    # torch autograd after the op (fp32): G = W1 W1ᵀ and P = rows W1ᵀ
    dw1 = dmat @ w1 + dmat.t() @ w1 if gram else dmat.clone()
    out = {"gp": gp, "W1": dw1, "wout": dwout, "b1": None, "joint": None, "marginal": None,
           "norm": torch.cat(norms)}
    if curved:
        dp = torch.cat([dsj, dsm])
        out["W1"] = dw1 + dp.t() @ rows
        drows = dp @ w1
        out["joint"], out["marginal"] = drows[:n], drows[n:]
        out["b1"] = db1
    if two:
        out["W2"] = dw2
        out["b2"] = db2 if curved else None
    return out


# ------------------------------------------------------------------ reference, critics


def critic_params(critic: MLPCritic, dtype=torch.float32) -> dict:
    p = {"W1": critic.first_weight().detach().to(dtype),
         "b1": critic.first_bias.detach().to(dtype),
         "wout": critic.out.weight.detach().reshape(-1).to(dtype)}
    if critic.hidden_layers:
        p["W2"] = critic.hidden_layers[0].weight.detach().to(dtype)
        p["b2"] = critic.hidden_layers[0].bias.detach().to(dtype)
    return p


def _param_list(critic: MLPCritic) -> list[tuple[str, torch.Tensor]]:
    named = [("W1", list(critic.first_weights)), ("b1", critic.first_bias)]
    if critic.hidden_layers:
        named += [("W2", critic.hidden_layers[0].weight), ("b2", critic.hidden_layers[0].bias)]
    named += [("wout", critic.out.weight)]
    return named


def reference_penalty(critic: MLPCritic, joint, marginal, eps, dims) -> dict:
    """Float64 oracle (double backward): the same keys as :func:`emulated_penalty`."""
    c64 = copy.deepcopy(critic).double()
    j = [t.detach().double().requires_grad_() for t in joint.split(list(dims), dim=1)]
    m = [t.detach().double().requires_grad_() for t in marginal.split(list(dims), dim=1)]
    gp = gradient_penalty_terms(c64, j, m, eps.double(), False)
    named = _param_list(c64)
    flat = []
    for _, p in named:
        flat += p if isinstance(p, list) else [p]
    grads = torch.autograd.grad(gp, flat + j + m, allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, flat + j + m)]
    out, k = {"gp": gp.detach()}, 0
    for name, p in named:
        if isinstance(p, list):
            out[name] = torch.cat(list(grads[k:k + len(p)]), dim=1)
            k += len(p)
        else:
            out[name] = grads[k].reshape(-1) if name == "wout" else grads[k]
            k += 1
    out["joint"] = torch.cat(list(grads[k:k + len(dims)]), dim=1)
    out["marginal"] = torch.cat(list(grads[k + len(dims):]), dim=1)
    return out


def make_batch(dims, n, seed, rho=0.8):
    """Correlated modalities z_k = ρ·s A_k + √(1 − ρ²)·noise (s shared), their product of
    marginals (independent row shuffle per modality) and ε ~ U[0, 1]."""
    g = torch.Generator().manual_seed(seed)
    latent = torch.randn(n, 16, generator=g, dtype=torch.float64)
    zs = []
    for d in dims:
        a = torch.randn(16, d, generator=g, dtype=torch.float64) / 4.0
        zs.append(rho * latent @ a + math.sqrt(1 - rho * rho) * torch.randn(
            n, d, generator=g, dtype=torch.float64))
    joint = torch.cat(zs, dim=1)
    marginal = torch.cat([z[torch.randperm(n, generator=g)] for z in zs], dim=1)
    eps = torch.rand(n, generator=g, dtype=torch.float64)
    return joint.float(), marginal.float(), eps.float()


def dependency_and_penalty_grad(critic, joint, marginal, eps, dims, gp_weight):
    """Float64 gradients (flattened over the critic's parameters) of the dependency term
    −(E_joint T − E_marginal T) and of gp_weight·GP: the two parts of the critic loss."""
    c64 = copy.deepcopy(critic).double()
    params = []                 # W1 blocks, b1, (W2, b2), wout: _flatten_like_critic's order
    for _, p in _param_list(c64):
        params += p if isinstance(p, list) else [p]
    jl = list(joint.double().split(list(dims), dim=1))
    ml = list(marginal.double().split(list(dims), dim=1))
    dep = c64(*ml).mean() - c64(*jl).mean()
    g_dep = torch.cat([g.reshape(-1) for g in torch.autograd.grad(dep, params)])
    gp = gradient_penalty_terms(c64, jl, ml, eps.double(), False)
    grads = torch.autograd.grad(gp_weight * gp, params, allow_unused=True)
    g_gp = torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1)
                      for g, p in zip(grads, params)])
    return g_dep, g_gp


def train_critic(critic, dims, n, seed, steps, gp_weight=10.0, lr=1e-3):
    """A short WGAN-GP critic training (Adam, float32 reference loss) so the input-gradient
    norms sit near 1 as during training; fresh batches every step."""
    opt = torch.optim.Adam(critic.parameters(), lr=lr, betas=(0.5, 0.9))
    for step in range(steps):
        joint, marginal, eps = make_batch(dims, n, 10_000 * seed + step + 1)
        jl = list(joint.split(list(dims), dim=1))
        ml = list(marginal.split(list(dims), dim=1))
        loss = critic(*ml).mean() - critic(*jl).mean() \
            + gp_weight * gradient_penalty_terms(critic, jl, ml, eps, False)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return critic


def rel_err(got, want) -> float:
    want = want.double()
    den = float(want.norm())
    return float((got.double() - want).norm()) / den if den > 0 else float("nan")


# ------------------------------------------------------------------------ the study


def grad_norm_stats(critic, joint, marginal, eps, dims):
    c64 = copy.deepcopy(critic).double()
    x = [(e * a + (1 - e) * b).requires_grad_() for a, b, e in zip(
        joint.double().split(list(dims), 1), marginal.double().split(list(dims), 1),
        [eps.double()[:, None]] * len(dims))]
    g = torch.autograd.grad(c64(*x).sum(), x)
    nu = torch.sqrt(sum((t * t).sum(1) for t in g))
    return float(nu.median()), float((nu - 1).abs().median()), nu


def run_case(dims, hidden, act, seed, n, regime, train_steps, gp_weight=10.0):
    torch.manual_seed(seed)
    critic = MLPCritic(dims, hidden, act)
    if regime == "trained":
        train_critic(critic, dims, n, seed, train_steps, gp_weight)
    joint, marginal, eps = make_batch(dims, n, 777 + seed)
    ref = reference_penalty(critic, joint, marginal, eps, dims)
    params = critic_params(critic)
    block_n = 32 if max(hidden) <= 128 else 16
    keys = [k for k in ("gp", "W1", "b1", "W2", "b2", "wout", "joint", "marginal")
            if k in ref and (act != "relu" or k not in ("b1", "b2", "joint", "marginal"))]
    # the critic loss's two gradients (float64) and the batch-to-batch noise of its total
    g_dep, g_gp = dependency_and_penalty_grad(critic, joint, marginal, eps, dims, gp_weight)
    j2, m2, e2 = make_batch(dims, n, 999 + seed)
    g_dep2, g_gp2 = dependency_and_penalty_grad(critic, j2, m2, e2, dims, gp_weight)
    total = g_dep + g_gp
    noise = float((g_dep2 + g_gp2 - total).norm() / total.norm())
    med_nu, med_gap, nu_ref = grad_norm_stats(critic, joint, marginal, eps, dims)
    result = {"dims": list(dims), "hidden": list(hidden), "act": act, "seed": seed,
              "regime": regime, "block_n": block_n, "median_norm": med_nu,
              "median_abs_gap": med_gap, "gp_ref": float(ref["gp"]),
              "gp_share": float(g_gp.norm() / total.norm()), "batch_noise": noise,
              "modes": {}}
    for mode in MODES:
        out = emulated_penalty(params, joint, marginal, eps, act, mode, block_n)
        errs = {k: rel_err(out[k].reshape(ref[k].shape), ref[k]) for k in keys}
        flat = _flatten_like_critic(out, ref, dims)
        flat_ref = g_gp / gp_weight
        errs["critic_loss_grad"] = float((gp_weight * (flat - flat_ref)).norm() / total.norm())
        # signed mean relative error of the per-row norm ν = ‖∇_x T(x̂)‖ (a bias, not noise)
        errs["norm_bias"] = float((out["norm"].double() / nu_ref - 1.0).mean())
        result["modes"][mode] = errs
    return result


def _flatten_like_critic(out, ref, dims):
    """Gradients flattened in :func:`_param_list`'s order (first_weights[k] blocks of W1,
    first_bias, hidden W2 and b2, out.weight); identically-zero ones (None) as zeros."""
    def get(k):
        return (out[k] if out.get(k) is not None else torch.zeros_like(ref[k])) \
            .reshape(ref[k].shape).double()
    parts = [blk.reshape(-1) for blk in get("W1").split(list(dims), dim=1)]
    parts += [get("b1").reshape(-1)]
    if "W2" in ref:
        parts += [get("W2").reshape(-1), get("b2").reshape(-1)]
    parts += [get("wout").reshape(-1)]
    return torch.cat(parts)


# ------------------------------------------------------- machine code per precision


#: Critics whose _gp_kernel launches are compiled per precision (m = 3, d = 64, N = 256):
#: sass_report.py's GP workload (relu, one layer) and the curved two-layer kernel.
SASS_CASES = (("relu", (128,)), ("gelu", (128, 128)))
SASS_PRECISIONS = ("tf32x3", "tf32", "bf16x3")


def _capture_gp_launches(cases) -> list:
    """Launch records of ``fused_gradient_penalty`` forward + backward on each (act, hidden)
    critic under the sm_90 launch emulation (autotune candidates 0 and 1), via
    sass_report's recorder.  Needs TRITON_INTERPRET=1 before Triton is imported."""
    import types
    import sass_report as sr
    from mdm_kernels.ops.triton_ops import fused_gradient_penalty

    def run(w):
        torch.manual_seed(0)
        dims = (64, 64, 64)
        critic = MLPCritic(dims, w.hidden, w.act)
        zs = [torch.randn(w.n, d, requires_grad=True) for d in dims]
        marg = [z[torch.randperm(w.n)] for z in zs]
        fused_gradient_penalty(critic, zs, marg, torch.rand(w.n), False).backward()

    sr._run_workload = run
    work = [types.SimpleNamespace(name=f"{act} {'x'.join(map(str, hidden))}", act=act,
                                  hidden=tuple(hidden), n=256) for act, hidden in cases]
    return sr.capture_in_process(work)


def sass_counts(cases=SASS_CASES, precisions=SASS_PRECISIONS) -> list[dict]:
    """Compile each captured launch for sm_90 at every precision (the kernel's DOT_PREC
    constexpr, nothing else changed) and count its innermost loops as
    python/sass_report.py does."""
    import os
    import subprocess
    import sass_report as sr
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, __file__, "--capture-launches",
                           json.dumps([[a, list(h)] for a, h in cases])],
                          env=env, capture_output=True, text=True, cwd=Path(__file__).parents[1])
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    records = json.loads(proc.stdout.strip().splitlines()[-1])
    rows = []
    for rec in records:
        for prec in precisions:
            r = copy.deepcopy(rec)
            r["constexprs"]["DOT_PREC"] = prec
            a = sr.analyse(r, sr.compile_launch(r))
            mma = [l for l in a["loops"] if l["role"] == "mma"]
            rows.append(dict(critic=rec["workload"], block_n=rec["constexprs"]["BLOCK_N"],
                             precision=prec, registers=a["registers"],
                             spill_stores=a["spill_stores"], shared=a["shared"],
                             loops=[(l["instructions"], l["hmma"]) for l in mma]))
    return rows


def sass_markdown(rows) -> str:
    lines = ["| critic | BLOCK_N | precision | mma loops: instructions (HMMA) | total | "
             "HMMA share | registers | spill B | shared B |", "|---" * 9 + "|"]
    for r in rows:
        total = sum(i for i, _ in r["loops"])
        hmma = sum(h for _, h in r["loops"])
        loops = ", ".join(f"{i} ({h})" for i, h in r["loops"])
        lines.append(f"| {r['critic']} | {r['block_n']} | {r['precision']} | {loops} | {total} "
                     f"| {100 * hmma / total:.1f} % | {r['registers']} | {r['spill_stores']} "
                     f"| {r['shared']} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--train-steps", type=int, default=150)
    ap.add_argument("--quick", action="store_true", help="one small case (smoke test)")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--sass", action="store_true",
                    help="instead: compile the kernel for sm_90 at each precision and count "
                         "its mma loops (python/sass_report.py's counting)")
    ap.add_argument("--capture-launches", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.capture_launches:
        cases = [(a, tuple(h)) for a, h in json.loads(args.capture_launches)]
        print(json.dumps(_capture_gp_launches(cases), default=str))
        return
    if args.sass:
        rows = sass_counts()
        print(sass_markdown(rows))
        if args.json:
            args.json.write_text(json.dumps(rows, indent=1))
        return
    torch.set_num_threads(1)
    dims = (64, 64, 64)
    if args.quick:
        cases = [((64, 64, 64), (128,), "gelu")]
        seeds, regimes = [0], ["init"]
    else:
        cases = [(dims, (h,) * depth, act) for h in (128, 256) for depth in (1, 2)
                 for act in ("relu", "gelu", "tanh")]
        seeds, regimes = list(range(args.seeds)), ["init", "trained"]
    results = []
    t0 = time.time()
    for regime in regimes:
        for d, hidden, act in cases:
            for seed in seeds:
                results.append(run_case(d, hidden, act, seed, args.n, regime, args.train_steps))
        print(f"[{regime} done, {time.time() - t0:.0f} s]", file=sys.stderr)
    print(report(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


def report(results) -> str:
    lines = []
    quantities = ["gp", "W1", "b1", "W2", "b2", "wout", "joint", "marginal", "critic_loss_grad"]
    for regime in sorted({r["regime"] for r in results}):
        rs = [r for r in results if r["regime"] == regime]
        lines.append(f"\n### regime: {regime} (max over {len({r['seed'] for r in rs})} seeds)\n")
        lines.append("| critic | median ‖∇T‖ | median abs(‖∇T‖ − 1) | GP share of ‖∇L‖ | "
                     "batch noise | mode | " + " | ".join(quantities) + " | ν bias |")
        lines.append("|---" * (7 + len(quantities)) + "|")
        configs = []
        for r in rs:
            key = (tuple(r["hidden"]), r["act"])
            if key not in configs:
                configs.append(key)
        for hidden, act in configs:
            group = [r for r in rs if (tuple(r["hidden"]), r["act"]) == (hidden, act)]
            label = f"{'×'.join(map(str, hidden))} {act}"
            for i, mode in enumerate(MODES):
                cells = []
                for q in quantities:
                    vals = [r["modes"][mode].get(q) for r in group]
                    vals = [v for v in vals if v is not None and not math.isnan(v)]
                    cells.append(f"{max(vals):.1e}" if vals else "—")
                head = (f"{label} | {min(r['median_norm'] for r in group):.2f}–"
                        f"{max(r['median_norm'] for r in group):.2f} | "
                        f"{min(r['median_abs_gap'] for r in group):.3f}–"
                        f"{max(r['median_abs_gap'] for r in group):.3f} | "
                        f"{max(r['gp_share'] for r in group):.2f} | "
                        f"{min(r['batch_noise'] for r in group):.2f}") if i == 0 else " | | | |"
                bias = sum(r["modes"][mode]["norm_bias"] for r in group) / len(group)
                lines.append(f"| {head} | {mode} | " + " | ".join(cells) + f" | {bias:+.1e} |")
        lines.append("\nworst over every critic of this regime:\n")
        lines.append("| mode | " + " | ".join(quantities) + " | ν bias (largest) |")
        lines.append("|---" * (2 + len(quantities)) + "|")
        for mode in MODES:
            cells = []
            for q in quantities:
                vals = [r["modes"][mode].get(q) for r in rs]
                vals = [v for v in vals if v is not None and not math.isnan(v)]
                cells.append(f"{max(vals):.1e}" if vals else "—")
            worst = max((r["modes"][mode]["norm_bias"] for r in rs), key=abs)
            lines.append(f"| {mode} | " + " | ".join(cells) + f" | {worst:+.1e} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

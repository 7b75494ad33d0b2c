"""The ``"all"``-negatives marginal term of a one-hidden-layer critic over a grid of two or
three factors, as outer sums: (rows × columns) score tiles built one hidden unit at a time.

The grids: ``"all"`` with m = 2 or 3 (every combination of rows of z_1, …, z_m) and InfoNCE's
``"all"`` (anchor i × candidate j, the candidate modalities kept together, two factors).
With the split first layer every grid score is

    T(i_0, …, i_{NF−1}) = w_out · σ(Σ_f F_f[i_f]) + b_out      (factors F_f: B × H)

with F_0 = P_1 + b_1 and F_f = P_{f+1} (or, for InfoNCE, F_1 = Σ_{k ≥ 2} P_k) — the critic of
an outer *sum*.  Forward: rows are the combinations of the first NF − 1 factors, columns the
last factor.  A program takes BLOCK_R rows × BLOCK_C columns and loops over the hidden units
h, adding w_out[h]·σ(z) into the (BLOCK_R × BLOCK_C) score tile: 1-2 adds, σ and 1 fma per
(sample, hidden unit), no reduction, and each value loaded from Fᵀ serves BLOCK_C (BLOCK_R)
samples — where the 2-D kernels of :mod:`~mdm_kernels.ops.gathered_tiles` re-gather one
(BLOCK_N × H) row tile per BLOCK_N samples and so read 4 bytes of L2 per (sample, hidden
unit), a bandwidth bound at about a tenth of the FP32 instruction bound (~3 instructions per
sample and hidden unit).  With three factors a row block is one index of F_0 and 16
consecutive (padded) indices of F_1, so its loads stay vectorised.

Forward: the estimator's reduction of T over the B² pairs, in registers (sum, online
log-sum-exp per tile element, or per-row log-sum-exp for InfoNCE), one partial per program.

Backward, from g = ∂term/∂T (the φ of :mod:`~mdm_kernels.ops.marginal_terms`):

    ∂F_f[i]  = w_out ⊙ Σ_{samples with i_f = i} g · σ'(z)
    ∂w_out   = Σ g · σ(z),      ∂b_out = Σ g

in one launch per factor, without atomics (deterministic): a program owns a block of that
factor's indices, one per thread, and sweeps the combinations of the other factors in
blocks.  Per tile it recomputes T with the forward's own loop — every launch sums z in the
canonical order ((F_0 + F_1) + F_2), so the scores are bitwise the forward's and e^{T − LSE}
is consistent with the saved LSE even at |T| ~ 1e4 — forms g, then loops over h again: the
sum over the swept side is in-thread and is added into ∂F_fᵀ[h, o] by the thread owning o.
The first launch also accumulates the w_out partials.  Autograd carries ∂F_0 into P_1 and
b_1, and the other factors' gradients into their projections.

Memory: Fᵀ, one ∂Fᵀ at a time and the w_out partials ((NF + 2)·B·H floats, B padded to 256),
B row LSEs, one partial per program — O(B·H).
"""
from __future__ import annotations


import torch
import triton
import triton.language as tl

from .marginal_terms import (MARGINAL_RED, NEG_BIG, score_grad, marginal_grad_args,
                            marginal_value)
from .triton_helpers import activation, activation_grad, interpreter_enabled

@triton.jit
def _pair_preact(Ft_ptr, h, S, HS, s_idx, s_scalar, o_idx, NF: tl.constexpr,
                 OWNED: tl.constexpr):
    """Pre-activation z[s, o] of hidden unit h on a (swept × owned) tile, always summed in
    the canonical order ((F_0 + F_1) + F_2) whichever factor is owned, so that every launch
    computes bitwise the same scores.  Fᵀ is (NF, H, S).  NF = 2: the swept index s_idx and
    the owned index o_idx are the other factor's and factor OWNED's.  NF = 3: the swept side
    is (s_scalar, s_idx) — one index of the lower remaining factor for the whole tile and a
    vector of the higher one."""
    if NF == 2:
        w = tl.load(Ft_ptr + (1 - OWNED) * HS + h * S + s_idx)
        o = tl.load(Ft_ptr + OWNED * HS + h * S + o_idx)
        z = w[:, None] + o[None, :]
    else:
        if OWNED == 2:
            y = tl.load(Ft_ptr + h * S + s_scalar) + tl.load(Ft_ptr + HS + h * S + s_idx)
            z = y[:, None] + tl.load(Ft_ptr + 2 * HS + h * S + o_idx)[None, :]
        else:
            if OWNED == 0:
                x = tl.load(Ft_ptr + h * S + o_idx) + tl.load(Ft_ptr + HS + h * S + s_scalar)
            else:
                x = tl.load(Ft_ptr + h * S + s_scalar) + tl.load(Ft_ptr + HS + h * S + o_idx)
            z = tl.load(Ft_ptr + 2 * HS + h * S + s_idx)[:, None] + x[None, :]
    return z


@triton.jit
def _outer_scores(Ft_ptr, wout_ptr, bout, s_idx, s_scalar, o_idx, S, H, NF: tl.constexpr,
                  OWNED: tl.constexpr, ACT: tl.constexpr):
    """T = Σ_h w_out[h]·σ(z_h) + b_out of a (swept × owned) tile, one hidden unit at a time:
    an outer sum per unit (1-2 adds, σ, 1 fma per pair — no reduction, so no shuffles),
    reading rows of the zero-padded Fᵀ (unmasked loads; S divisible by 16 lets the
    per-thread runs of 16 swept indices load as 128-bit vectors)."""
    t = tl.zeros([s_idx.shape[0], o_idx.shape[0]], tl.float32) + bout
    for h in range(0, H):
        z = _pair_preact(Ft_ptr, h, S, H * S, s_idx, s_scalar, o_idx, NF, OWNED)
        t += tl.load(wout_ptr + h) * activation(z, ACT)
    return t


@triton.jit
def _swept_block(sb, offs, B, S, NF: tl.constexpr, BLOCK: tl.constexpr):
    """Swept block sb → (s_idx vector, s_scalar, validity): NF = 2 blocks of the B indices;
    NF = 3 blocks of the B × cdiv(B, BLOCK)·BLOCK combinations (one index of the lower
    factor, BLOCK consecutive indices of the higher one, within the padded S)."""
    if NF == 2:
        s_idx = sb * BLOCK + offs
        s_scalar = 0
    else:
        per = tl.cdiv(B, BLOCK)
        s_scalar = sb // per
        s_idx = (sb % per) * BLOCK + offs
    return s_idx, s_scalar, s_idx < B


@triton.jit
def _outer_fwd_kernel(Ft_ptr, wout_ptr, bout_ptr, stats_ptr, row_lse_ptr, B, S, H,
                      NF: tl.constexpr, RED: tl.constexpr, ACT: tl.constexpr,
                      BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Per-program partial of the reduction over the grid (rows: the combinations of the
    first NF − 1 factors, columns: the last factor): stats[pid] = sum, or (max, Σ e^{T − max});
    RED_LSE_ROW (InfoNCE, NF = 2) stores LSE_r of the rows a program owns."""
    pid = tl.program_id(0)
    G = tl.num_programs(0)
    offs_r = tl.arange(0, BLOCK_R)
    offs_c = tl.arange(0, BLOCK_C)
    bout = tl.load(bout_ptr)
    acc = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)
    run_m = tl.zeros([BLOCK_R, BLOCK_C], tl.float32) + NEG_BIG
    run_s = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)
    if NF == 2:
        n_rb = tl.cdiv(B, BLOCK_R)
    else:
        n_rb = B * tl.cdiv(B, BLOCK_R)
    for rb in range(pid, n_rb, G):
        rows, r_scalar, rmask = _swept_block(rb, offs_r, B, S, NF, BLOCK_R)
        row_m = tl.zeros([BLOCK_R], tl.float32) + NEG_BIG
        row_s = tl.zeros([BLOCK_R], tl.float32)
        for cb in range(0, tl.cdiv(B, BLOCK_C)):
            cols = cb * BLOCK_C + offs_c
            cmask = cols < B
            t = _outer_scores(Ft_ptr, wout_ptr, bout, rows, r_scalar, cols, S, H, NF, NF - 1,
                              ACT)
            valid = rmask[:, None] & cmask[None, :]
            if RED == 0:
                acc += tl.where(valid, t, 0.0)
            elif RED == 2:  # softplus(T) = max(T, 0) + log(1 + e^{−|T|})
                acc += tl.where(valid, tl.maximum(t, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(t))),
                                0.0)
            elif RED == 3:
                t = tl.where(valid, t, float("-inf"))
                new_m = tl.maximum(run_m, t)
                run_s = run_s * tl.exp(run_m - new_m) + tl.exp(t - new_m)
                run_m = new_m
            else:  # per-row online log-sum-exp over the column blocks
                t = tl.where(valid, t, float("-inf"))
                new_m = tl.maximum(row_m, tl.max(t, axis=1))
                row_s = row_s * tl.exp(row_m - new_m) + tl.sum(tl.exp(t - new_m[:, None]),
                                                               axis=1)
                row_m = new_m
        if RED == 4:
            tl.store(row_lse_ptr + rows, row_m + tl.log(tl.where(rmask, row_s, 1.0)), mask=rmask)
    if RED == 3:
        mx = tl.max(tl.max(run_m, axis=1), axis=0)
        tl.store(stats_ptr + pid * 2, mx)
        tl.store(stats_ptr + pid * 2 + 1, tl.sum(tl.sum(run_s * tl.exp(run_m - mx), axis=1),
                                                 axis=0))
    elif RED != 4:
        tl.store(stats_ptr + pid * 2, tl.sum(tl.sum(acc, axis=1), axis=0))


@triton.jit
def _outer_bwd_kernel(Ft_ptr, wout_ptr, bout_ptr, scale_ptr, shift_ptr, row_lse_ptr,
                      dOt_ptr, gwt_ptr, gbout_ptr, B, S, H,
                      NF: tl.constexpr, OWNED: tl.constexpr, GMODE: tl.constexpr,
                      PARAM_GRADS: tl.constexpr, ACT: tl.constexpr, BLOCK_S: tl.constexpr,
                      BLOCK_O: tl.constexpr):
    """Gradient of factor OWNED, all other factors swept: tiles of BLOCK_S swept × BLOCK_O
    owned indices, one owned index per thread.  Per tile: T by :func:`_outer_scores`
    (bitwise the forward's), g = ∂term/∂T, then per hidden unit h the sums over the swept
    side Σ_s g·σ'(z) (in-thread) are added into ∂Fᵀ[h, o] (with PARAM_GRADS also Σ_s g·σ(z)
    into the w_out partials gwᵀ[h, o]) by the thread that owns o — the same thread on every
    tile, so no atomics and no barrier.  ∂Fᵀ must hold zeros on entry; the caller applies
    w_out."""
    pid = tl.program_id(0)
    G = tl.num_programs(0)
    offs_s = tl.arange(0, BLOCK_S)
    offs_o = tl.arange(0, BLOCK_O)
    bout = tl.load(bout_ptr)
    scale = tl.load(scale_ptr)
    shift = tl.load(shift_ptr)
    gb = tl.zeros([BLOCK_S, BLOCK_O], tl.float32)
    if NF == 2:
        n_sb = tl.cdiv(B, BLOCK_S)
    else:
        n_sb = B * tl.cdiv(B, BLOCK_S)
    for ob in range(pid, tl.cdiv(B, BLOCK_O), G):
        own = ob * BLOCK_O + offs_o
        omask = own < B
        for sb in range(0, n_sb):
            swept, s_scalar, smask = _swept_block(sb, offs_s, B, S, NF, BLOCK_S)
            valid = smask[:, None] & omask[None, :]
            t = _outer_scores(Ft_ptr, wout_ptr, bout, swept, s_scalar, own, S, H, NF, OWNED,
                              ACT)
            if GMODE == 2:  # InfoNCE (NF = 2): the anchor is factor 0
                if OWNED == 0:
                    anchor_shift = tl.load(row_lse_ptr + own, mask=omask, other=0.0)[None, :]
                else:
                    anchor_shift = tl.load(row_lse_ptr + swept, mask=smask, other=0.0)[:, None]
                g = score_grad(t, valid, scale, anchor_shift, GMODE)
            else:
                g = score_grad(t, valid, scale, shift, GMODE)
            if PARAM_GRADS:
                gb += g
            for h in range(0, H):
                z = _pair_preact(Ft_ptr, h, S, H * S, swept, s_scalar, own, NF, OWNED)
                p_own = dOt_ptr + h * S + own
                tl.store(p_own, tl.load(p_own) + tl.sum(g * activation_grad(z, ACT), axis=0))
                if PARAM_GRADS:
                    p_gw = gwt_ptr + h * S + own
                    tl.store(p_gw, tl.load(p_gw) + tl.sum(g * activation(z, ACT), axis=0))
    if PARAM_GRADS:
        tl.store(gbout_ptr + pid, tl.sum(tl.sum(gb, axis=1), axis=0))


def _fwd_tiles() -> tuple[int, int]:
    """Forward (BLOCK_R, BLOCK_C) = 16 × 256 pairs at 8 warps: Triton lays the warps along the
    columns, so a thread holds 16 rows × 1 column and reads the 16 row values of a hidden
    unit with four 128-bit loads.  In the PTX of the h loop (python/compile_sm90.py) that is
    48 of 84 instructions doing add/max/fma (57%), against 48 of 108 (16 scalar loads and
    their address arithmetic) for a 64 × 64 tile."""
    return (8, 16) if interpreter_enabled() else (16, 256)


def _bwd_tiles() -> tuple[int, int]:
    """Backward (BLOCK_S swept, BLOCK_O owned) = 16 × 256 at 8 warps: one owned index and 16
    swept ones per thread.  PTX of the h loops: T 84 instructions per 16 pairs, the ∂C sums
    102 (the ∂A pass, with the w_out partials, 139).  32 swept per thread would halve the
    read-modify-write traffic but the compiler then packs the σ' masks into 16-bit words
    (289 instructions per 32 pairs)."""
    return (4, 16) if interpreter_enabled() else (16, 256)


def _programs(blocks: int, device) -> int:
    if interpreter_enabled() or device.type != "cuda":
        return max(1, min(blocks, 3))
    return max(1, min(blocks, 4 * torch.cuda.get_device_properties(device).multi_processor_count))


def _stride(B: int) -> int:
    """Padded batch S of Fᵀ: a multiple of every block size (all powers of two)."""
    step = max(*_fwd_tiles(), *_bwd_tiles())
    return triton.cdiv(B, step) * step


class OuterGridMarginal(torch.autograd.Function):
    """Marginal term over the grid of NF = 2 or 3 factors F_f (B × H each),
    T(i_0, …) = w_out·σ(Σ_f F_f[i_f]) + b_out (module docstring); differentiable w.r.t.
    every factor, w_out (H,) and b_out (1,)."""

    @staticmethod
    def forward(ctx, kind, act, wout, bout, *factors):
        nf = len(factors)
        B, H = factors[0].shape
        S = _stride(B)
        # Fᵀ (NF, H, S), zero columns beyond B
        Ft = torch.nn.functional.pad(torch.stack(factors).transpose(1, 2), (0, S - B))
        br, bc = _fwd_tiles()
        red = MARGINAL_RED[kind]
        n_rb = triton.cdiv(B, br) if nf == 2 else B * triton.cdiv(B, br)
        G = _programs(n_rb, Ft.device)
        stats = torch.empty(G, 2, device=Ft.device, dtype=torch.float32)
        row_lse = torch.empty(B, device=Ft.device, dtype=torch.float32)
        _outer_fwd_kernel[(G,)](Ft, wout, bout, stats, row_lse, B, S, H, NF=nf, RED=red,
                                ACT=act, BLOCK_R=br, BLOCK_C=bc,
                                num_warps=1 if interpreter_enabled() else 8)
        value, stat = marginal_value(kind, stats, row_lse, B ** nf, B)
        ctx.kind, ctx.act, ctx.B = kind, act, B
        ctx.save_for_backward(Ft, wout, bout, stat)
        return value

    @staticmethod
    def backward(ctx, grad):
        Ft, wout, bout, stat = ctx.saved_tensors
        kind, act, B = ctx.kind, ctx.act, ctx.B
        nf, H, S = Ft.shape
        gmode, scale, shift, row_lse = marginal_grad_args(kind, grad, stat, B ** nf, B)
        bs, bo = _bwd_tiles()
        G = _programs(triton.cdiv(B, bo), Ft.device)
        grads = []
        for f in range(nf):  # one launch per factor, the w_out / b_out partials in the first
            dOt = torch.zeros(H, S, device=Ft.device, dtype=torch.float32)
            gwt = torch.zeros_like(dOt) if f == 0 else dOt
            gb = torch.empty(G, device=Ft.device, dtype=torch.float32)
            _outer_bwd_kernel[(G,)](Ft, wout, bout, scale, shift, row_lse, dOt, gwt, gb, B, S, H, NF=nf, OWNED=f,
                                    GMODE=gmode, PARAM_GRADS=f == 0, ACT=act, BLOCK_S=bs,
                                    BLOCK_O=bo, num_warps=1 if interpreter_enabled() else 8)
            grads.append((dOt[:, :B] * wout[:, None]).t())
            if f == 0:
                g_wout = gwt.sum(1)
                g_bout = gb.sum().reshape(1)
        return (None, None, g_wout, g_bout, *grads)


def outer_grid_terms(kind, critic, P, b1, wout, bout, act, num_factors):
    """(joint_term, marginal_term) on a two- or three-factor ``"all"`` grid from the stacked
    projections P (m × B × H, float32): the joint term (B diagonal samples) in torch, the
    marginal term with :class:`OuterGridMarginal`.  Factors: F_0 = P_1 + b_1, then P_2, P_3
    (m = 3), or the candidate sum Σ_{k ≥ 2} P_k (two factors: m = 2, InfoNCE)."""
    first = P[0] + b1
    rest = [P[1:].sum(0)] if num_factors == 2 else list(P[1:])
    factors = [first] + rest
    t_joint = critic.act(sum(factors)) @ wout + bout
    joint = (-torch.nn.functional.softplus(-t_joint) if kind == "js" else t_joint).mean()
    marginal = OuterGridMarginal.apply(kind, act, wout, bout,
                                       *[f.contiguous() for f in factors])
    return joint, marginal

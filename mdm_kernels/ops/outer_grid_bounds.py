"""The ``"all"``-negatives marginal term of a one-hidden-layer critic over a two-factor grid,
as outer sums: (rows × columns) score tiles built one hidden unit at a time.

Two-factor grids are ``"all"`` with m = 2 (every pair (i, j) of rows of z_1 and z_2) and
InfoNCE's ``"all"`` (anchor i × candidate j, the candidate modalities kept together).  With
the split first layer every grid score is

    T(r, c) = w_out · σ(A[r] + C[c]) + b_out,     A = P_1 + b_1,   C = Σ_{k ≥ 2} P_k   (B × H)

— the critic of an outer *sum*.  Forward: a program takes BLOCK_R rows × BLOCK_C columns
of the grid and loops over the hidden units h, adding w_out[h]·σ(Aᵀ[h, r] + Cᵀ[h, c]) into
the (BLOCK_R × BLOCK_C) score tile: 1 add, σ and 1 fma per (pair, hidden unit), no
reduction, and each value loaded from Aᵀ / Cᵀ serves BLOCK_C (BLOCK_R) pairs — where the 2-D
kernels of :mod:`~mdm_kernels.ops.critic_bounds` re-gather one (BLOCK_N × H) row tile per
BLOCK_N samples and so read 4 bytes of L2 per (pair, hidden unit), a bandwidth bound at
about a tenth of the FP32 instruction bound (~3 instructions per pair and hidden unit).

Forward: the estimator's reduction of T over the B² pairs, in registers (sum, online
log-sum-exp per tile element, or per-row log-sum-exp for InfoNCE), one partial per program.

Backward, from g(r, c) = ∂term/∂T(r, c) (the φ of :mod:`~mdm_kernels.ops.critic_bounds`):

    ∂A[r]   = w_out ⊙ Σ_c g(r, c) σ'(A[r] + C[c])
    ∂C[c]   = w_out ⊙ Σ_r g(r, c) σ'(A[r] + C[c])
    ∂w_out  = Σ_{r,c} g(r, c) σ(A[r] + C[c]),      ∂b_out = Σ_{r,c} g(r, c)

in two launches of one kernel, one per side, without atomics (deterministic): a program
owns a block of that side's indices, one per thread, and sweeps the other side in blocks.
Per tile it recomputes T with the forward's own loop (bitwise the same scores, so e^{T − LSE}
is consistent with the saved LSE even at |T| ~ 1e4), forms g, then loops over h again: the
sum over the swept side is in-thread and is added into ∂Oᵀ[h, o] by the thread owning o.
The ∂A launch also accumulates the w_out partials.  Autograd carries ∂A into P_1 and b_1,
and ∂C into every P_k, k ≥ 2.

Memory: Aᵀ, Cᵀ, ∂Aᵀ, ∂Cᵀ and the w_out partials (5·B·H floats, B padded to 256), B row
LSEs, one partial per program — O(B·H).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .common import activation, activation_grad
from .critic_bounds import (G_EXP_ROW, G_EXP_SHIFT, G_ONE, G_SIGMOID, RED_LSE, RED_LSE_ROW,
                            RED_SOFTPLUS, RED_SUM, _NEG_BIG, _combine_lse,
                            _score_grad)
from .triton_backend import interpreter_enabled

@triton.jit
def _outer_scores(At_ptr, Ct_ptr, wout_ptr, bout, rows, cols, S, H, ACT: tl.constexpr):
    """T(r, c) = Σ_h w_out[h]·σ(A[r, h] + C[c, h]) + b_out for a (BLOCK_R × BLOCK_C) tile,
    one hidden unit at a time: an outer sum per unit (1 add, σ, 1 fma per pair — no
    reduction, so no shuffles), reading the unit's row of Aᵀ / Cᵀ (H × S, zero-padded to a
    whole number of blocks: unmasked loads, and S divisible by 16 lets them vectorise)."""
    t = tl.zeros([rows.shape[0], cols.shape[0]], tl.float32) + bout
    for h in range(0, H):
        a = tl.load(At_ptr + h * S + rows)
        c = tl.load(Ct_ptr + h * S + cols)
        t += tl.load(wout_ptr + h) * activation(a[:, None] + c[None, :], ACT)
    return t


@triton.jit
def _outer_fwd_kernel(At_ptr, Ct_ptr, wout_ptr, bout_ptr, stats_ptr, row_lse_ptr, B, S, H,
                      RED: tl.constexpr, ACT: tl.constexpr, BLOCK_R: tl.constexpr,
                      BLOCK_C: tl.constexpr):
    """Per-program partial of the reduction (stats[pid] = sum, or (max, Σ e^{T − max}));
    RED_LSE_ROW stores LSE_r of the rows a program owns."""
    pid = tl.program_id(0)
    G = tl.num_programs(0)
    offs_r = tl.arange(0, BLOCK_R)
    offs_c = tl.arange(0, BLOCK_C)
    bout = tl.load(bout_ptr)
    acc = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)
    run_m = tl.zeros([BLOCK_R, BLOCK_C], tl.float32) + _NEG_BIG
    run_s = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)
    for rb in range(pid, tl.cdiv(B, BLOCK_R), G):
        rows = rb * BLOCK_R + offs_r
        rmask = rows < B
        row_m = tl.zeros([BLOCK_R], tl.float32) + _NEG_BIG
        row_s = tl.zeros([BLOCK_R], tl.float32)
        for cb in range(0, tl.cdiv(B, BLOCK_C)):
            cols = cb * BLOCK_C + offs_c
            cmask = cols < B
            t = _outer_scores(At_ptr, Ct_ptr, wout_ptr, bout, rows, cols, S, H, ACT)
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
def _outer_bwd_kernel(Ot_ptr, Wt_ptr, wout_ptr, bout_ptr, scale_ptr, shift_ptr, row_lse_ptr,
                      dOt_ptr, gwt_ptr, gbout_ptr, B, S, H,
                      GMODE: tl.constexpr, OWNED_IS_ROW: tl.constexpr,
                      PARAM_GRADS: tl.constexpr, ACT: tl.constexpr, BLOCK_S: tl.constexpr,
                      BLOCK_O: tl.constexpr):
    """Gradient of the owned side O (A when OWNED_IS_ROW, else C) of the grid, the other
    side W swept: tiles of BLOCK_S swept × BLOCK_O owned indices, one owned index per
    thread.  Per tile: T by :func:`_outer_scores` (bitwise the forward's: a + c commutes),
    g = ∂term/∂T, then per hidden unit h the column sums Σ_s g·σ'(z) (in-thread) are added
    into ∂Oᵀ[h, o] (and with PARAM_GRADS Σ_s g·σ(z) into the w_out partials gwᵀ[h, o]) by
    the thread that owns o — the same thread on every tile, so no atomics and no barrier.
    ∂Oᵀ must hold zeros on entry; w_out is applied by the caller."""
    pid = tl.program_id(0)
    G = tl.num_programs(0)
    offs_s = tl.arange(0, BLOCK_S)
    offs_o = tl.arange(0, BLOCK_O)
    bout = tl.load(bout_ptr)
    scale = tl.load(scale_ptr)
    shift = tl.load(shift_ptr)
    gb = tl.zeros([BLOCK_S, BLOCK_O], tl.float32)
    for ob in range(pid, tl.cdiv(B, BLOCK_O), G):
        own = ob * BLOCK_O + offs_o
        omask = own < B
        for sb in range(0, tl.cdiv(B, BLOCK_S)):
            swept = sb * BLOCK_S + offs_s
            smask = swept < B
            valid = smask[:, None] & omask[None, :]
            t = _outer_scores(Wt_ptr, Ot_ptr, wout_ptr, bout, swept, own, S, H, ACT)
            if GMODE == 2:  # InfoNCE: the anchor is the row side (A)
                if OWNED_IS_ROW:
                    anchor_shift = tl.load(row_lse_ptr + own, mask=omask, other=0.0)[None, :]
                else:
                    anchor_shift = tl.load(row_lse_ptr + swept, mask=smask, other=0.0)[:, None]
                g = _score_grad(t, valid, scale, anchor_shift, GMODE)
            else:
                g = _score_grad(t, valid, scale, shift, GMODE)
            if PARAM_GRADS:
                gb += g
            for h in range(0, H):
                w = tl.load(Wt_ptr + h * S + swept)
                o = tl.load(Ot_ptr + h * S + own)
                z = w[:, None] + o[None, :]
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


def _padded(X: torch.Tensor, S: int) -> torch.Tensor:
    """Xᵀ (H × S) with zero columns beyond B."""
    return torch.nn.functional.pad(X.t(), (0, S - X.shape[0]))


def _programs(blocks: int, device) -> int:
    if interpreter_enabled() or device.type != "cuda":
        return max(1, min(blocks, 3))
    return max(1, min(blocks, 4 * torch.cuda.get_device_properties(device).multi_processor_count))


_RED = {"dv": RED_LSE, "nwj": RED_LSE, "js": RED_SOFTPLUS, "infonce": RED_LSE_ROW,
        "wasserstein": RED_SUM}


def _stride(B: int) -> int:
    """Padded batch S of Aᵀ / Cᵀ: a multiple of every block size (all powers of two)."""
    step = max(*_fwd_tiles(), *_bwd_tiles())
    return triton.cdiv(B, step) * step


class OuterGridMarginal(torch.autograd.Function):
    """Marginal term over the B × B grid T(r, c) = w_out·σ(A[r] + C[c]) + b_out (module
    docstring); differentiable w.r.t. A, C, w_out (H,) and b_out (1,)."""

    @staticmethod
    def forward(ctx, kind, act, A, C, wout, bout):
        B, H = A.shape
        S = _stride(B)
        At, Ct = _padded(A, S), _padded(C, S)
        br, bc = _fwd_tiles()
        red = _RED[kind]
        G = _programs(triton.cdiv(B, br), A.device)
        stats = torch.empty(G, 2, device=A.device, dtype=torch.float32)
        row_lse = torch.empty(B, device=A.device, dtype=torch.float32)
        _outer_fwd_kernel[(G,)](At, Ct, wout, bout, stats, row_lse, B, S, H, RED=red, ACT=act,
                                BLOCK_R=br, BLOCK_C=bc,
                                num_warps=1 if interpreter_enabled() else 8)
        n = B * B
        stat = None
        if red == RED_LSE:
            stat = _combine_lse(stats)
            lme = stat - math.log(n)
            value = lme if kind == "dv" else torch.exp(lme - 1.0)
        elif red == RED_LSE_ROW:
            stat = row_lse
            value = row_lse.mean() - math.log(B)
        else:
            value = stats[:, 0].sum() / n
        ctx.kind, ctx.act, ctx.B = kind, act, B
        ctx.save_for_backward(At, Ct, wout, bout, stat if stat is not None else row_lse)
        return value

    @staticmethod
    def backward(ctx, grad):
        At, Ct, wout, bout, stat = ctx.saved_tensors
        kind, act, B = ctx.kind, ctx.act, ctx.B
        H, S = At.shape
        n = B * B
        grad = grad.float().reshape(1)
        zero = torch.zeros(1, device=At.device, dtype=torch.float32)
        row_lse = zero
        if kind == "dv":
            gmode, scale, shift = G_EXP_SHIFT, grad, stat.reshape(1)
        elif kind == "nwj":
            gmode, scale, shift = G_EXP_SHIFT, grad, zero + (1.0 + math.log(n))
        elif kind == "infonce":
            gmode, scale, shift, row_lse = G_EXP_ROW, grad / B, zero, stat
        else:
            gmode, scale, shift = (G_SIGMOID if kind == "js" else G_ONE), grad / n, zero
        bs, bo = _bwd_tiles()
        G = _programs(triton.cdiv(B, bo), At.device)
        grads = []
        for owned_is_row in (True, False):
            Ot, Wt = (At, Ct) if owned_is_row else (Ct, At)
            dOt = torch.zeros_like(Ot)
            gwt = torch.zeros_like(Ot) if owned_is_row else dOt
            gb = torch.empty(G, device=At.device, dtype=torch.float32)
            _outer_bwd_kernel[(G,)](Ot, Wt, wout, bout, scale.contiguous(), shift.contiguous(),
                                    row_lse, dOt, gwt, gb, B, S, H, GMODE=gmode,
                                    OWNED_IS_ROW=owned_is_row, PARAM_GRADS=owned_is_row,
                                    ACT=act, BLOCK_S=bs, BLOCK_O=bo,
                                    num_warps=1 if interpreter_enabled() else 8)
            grads.append((dOt[:, :B] * wout[:, None]).t())
            if owned_is_row:
                g_wout = gwt.sum(1)
                g_bout = gb.sum().reshape(1)
        dA, dC = grads
        return None, None, dA, dC, g_wout, g_bout


def outer_grid_applies(kind, critic, plan_idx, plan_nf, idx_grid) -> bool:
    """Whether :func:`outer_grid_terms` takes this step: an ``"all"`` grid of two factors
    and a one-hidden-layer critic."""
    return plan_idx == idx_grid and plan_nf == 2 and len(critic.hidden) == 1


def outer_grid_terms(kind, critic, P, b1, wout, bout, act):
    """(joint_term, marginal_term) on the two-factor ``"all"`` grid from the stacked
    projections P (m × B × H, float32): the joint term (B diagonal pairs) in torch, the
    marginal term with :class:`OuterGridMarginal`."""
    A = P[0] + b1
    C = P[1:].sum(0)
    t_joint = critic.act(A + C) @ wout + bout
    joint = (-torch.nn.functional.softplus(-t_joint) if kind == "js" else t_joint).mean()
    marginal = OuterGridMarginal.apply(kind, act, A.contiguous(), C.contiguous(), wout, bout)
    return joint, marginal

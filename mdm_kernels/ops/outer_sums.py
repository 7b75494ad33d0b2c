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

in one launch for every factor (:func:`_outer_bwd_fused_kernel`): per chunk of tiles the
scores once — with the forward's own loop and its canonical sum (F_0 + F_2) + F_1
(:func:`_pair_preact`), so they are bitwise the forward's and e^{T − LSE} is consistent with
the saved LSE even at |T| ~ 1e4 — then g to a per-program scratch, then per hidden unit
a = g·σ'(z) summed three ways: over the rows in-thread (the column factor; with three
factors also F_0, across threads once per tile and unit), and over the columns in-thread
across the chunk's tiles, across threads once per chunk and unit (the row factor).  sm_90
SASS, relu (docs/performance_counts.md): 3.97 + 6.00 + 0.71 instructions per pair·unit
against 33.2 for the former one-launch-per-factor backward (three score recomputations).
Two factors at small B (too few tiles to give every SM a chunk) keep one launch per factor
(:func:`_outer_bwd_kernel`, :func:`outer_backward_grid`), which fills the GPU with small
tiles instead.  No atomics in either: every partial sum has its own slot and the slots are
summed in a fixed order by :func:`_sum_splits_kernel`, so the result is bitwise the same run
to run on a given GPU model (the slot count depends on B and the SM count).  Autograd carries
∂F_0 into P_1 and b_1, and the other factors' gradients into their projections.

Memory: Fᵀ (NF·H·S floats, S = B padded to 256); the fused launch's slots (Σ of
:attr:`OuterFusedPlan.slots` × H × S floats, at most 192 slots whatever B: 25 MB at m = 3,
B = 256, H = 128 on an H200, 403 MB at B = 4,096) and its g scratch (programs × chunk × 32 ×
32 floats: 32 KB per program at chunk 8, 17 MB); the per-factor launches' split partials
(2·splits·H·S floats); B row LSEs; one partial per program.
"""
from __future__ import annotations


from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .sample_tiles import marginal_plan
from .marginal_terms import (MARGINAL_RED, NEG_BIG, score_grad, marginal_grad_args,
                            marginal_value)
from .runtime_flags import fresh_empty, sm_count, uses_gpu_launches
from .triton_helpers import (HOMOGENEOUS_ACTIVATIONS, activation, activation_grad,
                             launch_device, times_activation_grad)

@triton.jit
def _pair_preact(Ft_ptr, h, S, HS, s_idx, s_scalar, o_idx, NF: tl.constexpr,
                 OWNED: tl.constexpr):
    """Pre-activation z[s, o] of hidden unit h on a (swept × owned) tile.  Fᵀ is
    (NF, H, S).  NF = 2: the swept index s_idx and the owned index o_idx are the other
    factor's and factor OWNED's.  NF = 3 (OWNED = 2, the only layout: rows (F_0 scalar,
    F_1 vector), columns F_2): summed in the canonical order (F_0 + F_2) + F_1, the scalar
    factor joining the column once per column, so the inner loop adds once per pair (it
    added twice with ((F_0 + F_1) + F_2), the 16-row partial recomputed by every column's
    thread); the fused backward sums in the same order (bitwise the same scores)."""
    if NF == 2:
        w = tl.load(Ft_ptr + (1 - OWNED) * HS + h * S + s_idx)
        o = tl.load(Ft_ptr + OWNED * HS + h * S + o_idx)
        z = w[:, None] + o[None, :]
    else:
        tl.static_assert(OWNED == 2, "three factors: the owned (column) factor is F_2")
        c = tl.load(Ft_ptr + h * S + s_scalar) + tl.load(Ft_ptr + 2 * HS + h * S + o_idx)
        z = tl.load(Ft_ptr + HS + h * S + s_idx)[:, None] + c[None, :]
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
def _distinct_pairs(s_idx, s_scalar, o_idx, NF: tl.constexpr):
    """(swept × owned) mask of the samples of pairwise distinct factor indices (the
    ``"distinct"`` grid; InfoNCE: candidate ≠ anchor): swept ≠ owned and, with three factors,
    neither equals the swept side's scalar index — the same pairs whichever factor is owned."""
    ok = s_idx[:, None] != o_idx[None, :]
    if NF == 3:
        ok = ok & (s_idx != s_scalar)[:, None] & (o_idx != s_scalar)[None, :]
    return ok


@triton.jit
def _outer_fwd_kernel(Ft_ptr, wout_ptr, bout_ptr, stats_ptr, row_lse_ptr, B, S, H,
                      NF: tl.constexpr, RED: tl.constexpr, ACT: tl.constexpr,
                      BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                      DISTINCT: tl.constexpr = False):
    """Per-program partial of the reduction over the grid (rows: the combinations of the
    first NF − 1 factors, columns: the last factor): stats[pid] = sum, or (max, Σ e^{T − max});
    RED_LSE_ROW (InfoNCE, NF = 2) stores LSE_r of the rows a program owns.  The persistent
    programs take (row block, column block) tiles pid, pid + G, … — a row block's column
    blocks are separate tiles, so two factors at B = 1,024 (64 row blocks × 4 column blocks)
    fill 256 programs, not 64 — except for RED_LSE_ROW, whose tiles are whole row blocks (a
    row's log-sum-exp runs over every column in one program)."""
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
    n_cb = tl.cdiv(B, BLOCK_C)
    if RED == 4:
        tiles_per_row = 1
        cb_per_tile = n_cb
    else:
        tiles_per_row = n_cb
        cb_per_tile = 1
    for tile in range(pid, n_rb * tiles_per_row, G):
        rb = tile // tiles_per_row
        cb0 = tile % tiles_per_row
        rows, r_scalar, rmask = _swept_block(rb, offs_r, B, S, NF, BLOCK_R)
        row_m = tl.zeros([BLOCK_R], tl.float32) + NEG_BIG
        row_s = tl.zeros([BLOCK_R], tl.float32)
        for cb in range(cb0, cb0 + cb_per_tile):
            cols = cb * BLOCK_C + offs_c
            cmask = cols < B
            t = _outer_scores(Ft_ptr, wout_ptr, bout, rows, r_scalar, cols, S, H, NF, NF - 1,
                              ACT)
            valid = rmask[:, None] & cmask[None, :]
            if DISTINCT:  # "distinct": coinciding indices are not samples
                valid = valid & _distinct_pairs(rows, r_scalar, cols, NF)
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
                      dOt_ptr, gwt_ptr, gbout_ptr, B, S, H, SPLIT_BLOCKS,
                      NF: tl.constexpr, OWNED: tl.constexpr, GMODE: tl.constexpr,
                      PARAM_GRADS: tl.constexpr, ACT: tl.constexpr, BLOCK_S: tl.constexpr,
                      BLOCK_O: tl.constexpr, DISTINCT: tl.constexpr = False):
    """Gradient of factor OWNED (two factors; three take :func:`_outer_bwd_fused_kernel`),
    the other factor swept: tiles of BLOCK_S swept × BLOCK_O owned indices, one owned index
    per thread.  Grid (owned programs G, splits): program
    (p, q) takes the owned blocks p, p + G, … and the swept blocks [q·SPLIT_BLOCKS,
    (q + 1)·SPLIT_BLOCKS) (:func:`outer_backward_grid`); split q's partial sums go to slice q
    of ∂Fᵀ (splits × H × S), which the program zeroes first for its owned blocks.  Per tile:
    T by :func:`_outer_scores` (bitwise the forward's), g = ∂term/∂T, then per hidden unit h
    the sums over the swept side Σ_s g·σ'(z) (in-thread) are added into ∂Fᵀ[q, h, o] (with
    PARAM_GRADS also Σ_s g·σ(z) into the w_out partials gwᵀ[q, h, o]) by the thread that
    owns o — the same thread on every tile, so no atomics and no barrier.  The caller sums
    the slices in split order (:func:`_sum_splits_kernel`) and applies w_out."""
    tl.static_assert(NF == 2, "the per-factor backward takes two factors")
    pid = tl.program_id(0)
    G = tl.num_programs(0)
    split = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_o = tl.arange(0, BLOCK_O)
    bout = tl.load(bout_ptr)
    scale = tl.load(scale_ptr)
    shift = tl.load(shift_ptr)
    gb = tl.zeros([BLOCK_S, BLOCK_O], tl.float32)
    n_sb = tl.cdiv(B, BLOCK_S)
    sb_lo = split * SPLIT_BLOCKS
    sb_hi = tl.minimum(sb_lo + SPLIT_BLOCKS, n_sb)
    dO_part = dOt_ptr + split * H * S
    gw_part = gwt_ptr + split * H * S
    for ob in range(pid, tl.cdiv(B, BLOCK_O), G):
        own = ob * BLOCK_O + offs_o
        omask = own < B
        for h in range(0, H):  # this split's slice of the owned block starts at zero
            tl.store(dO_part + h * S + own, tl.zeros([BLOCK_O], tl.float32))
            if PARAM_GRADS:
                tl.store(gw_part + h * S + own, tl.zeros([BLOCK_O], tl.float32))
        for sb in range(sb_lo, sb_hi):
            swept, s_scalar, smask = _swept_block(sb, offs_s, B, S, NF, BLOCK_S)
            valid = smask[:, None] & omask[None, :]
            if DISTINCT:
                valid = valid & _distinct_pairs(swept, s_scalar, own, NF)
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
                p_own = dO_part + h * S + own
                tl.store(p_own, tl.load(p_own) + tl.sum(g * activation_grad(z, ACT), axis=0))
                if PARAM_GRADS:
                    p_gw = gw_part + h * S + own
                    tl.store(p_gw, tl.load(p_gw) + tl.sum(g * activation(z, ACT), axis=0))
    if PARAM_GRADS:
        tl.store(gbout_ptr + split * G + pid, tl.sum(tl.sum(gb, axis=1), axis=0))


@triton.jit
def _outer_bwd_fused_kernel(Ft_ptr, wout_ptr, bout_ptr, scale_ptr, shift_ptr, row_lse_ptr,
                            g_ptr, drow_ptr, dcol_ptr, dscal_ptr, gw_ptr, gb_ptr,
                            B, S, H, SPAN,
                            NF: tl.constexpr, GMODE: tl.constexpr, ACT: tl.constexpr,
                            HOMOGENEOUS: tl.constexpr, BLOCK_R: tl.constexpr,
                            BLOCK_O: tl.constexpr, CHUNK: tl.constexpr,
                            DISTINCT: tl.constexpr = False):
    """Every factor's gradient, ∂w_out and ∂b_out in one launch, the scores computed once.

    A tile is BLOCK_R rows (the row factor: F_1 of three factors, F_0 of two) × BLOCK_O
    columns (the last factor), a thread holding all BLOCK_R rows of one column; a *chunk* is
    up to CHUNK tiles that share the row block: with three factors CHUNK consecutive indices
    k of F_0 over one column block, with two factors CHUNK consecutive column blocks.
    Program (p, j, q) of the grid (row groups, column groups, splits) takes the row blocks
    p, p + n_p, … and, with three factors, the column blocks j, j + n_j, … and the F_0
    indices [q·SPAN, (q + 1)·SPAN); with two factors (n_j = 1) the column blocks
    [q·SPAN, …).

    Per chunk, two phases (the scratch slice g_ptr[pid] holds CHUNK tiles of g):

    1. for each tile: T by :func:`_outer_scores` (bitwise the forward's), g = ∂term/∂T →
       scratch, Σ g → ∂b_out;
    2. for each hidden unit h, for each tile k of the chunk: z = F_row[r] + c_k[o] (the
       forward's canonical sum, c_k = F_0[k] + F_2[o] or F_1[o]), a = g·σ'(z), and
         rowacc[r, o] += a            (in-thread; the rows' sum over o waits for the chunk)
         colsum_k[o]   = Σ_r a        (in-thread: the thread holds the column's rows)
       three factors: ∂F_0[k, h] += Σ_o colsum_k (one cross-thread sum per tile and unit),
       ∂F_2[o, h] += Σ_k colsum_k; two factors: ∂F_1[o_k, h] += colsum_k; after the tiles
       ∂F_row[r, h] += Σ_o rowacc[r, o] — one cross-thread sum per chunk, not per tile —
       and ∂w_out[h] += Σ g·σ(z) (relu, leaky relu: Σ_r F_row[r]·∂F_row + Σ_k Σ_o
       c_k[o]·colsum_k[o], since σ(z) = z·σ'(z); else σ(z) per sample).

    So each (pair, unit) costs the score loop's ≈ 3 instructions plus z, the σ' select and two
    adds — the per-factor launches recompute T once per factor.  No atomics: every partial
    sum has its own slot — ∂F_row slot (j, q) [three factors] or q, ∂F_col slot (rb, q) or
    rb, ∂F_0 slot (rb, j), ∂w_out and ∂b_out slot pid — which the program zeroes first, and
    the caller sums the slots in a fixed order (:func:`_sum_splits`): bitwise reproducible.
    Barriers separate the zero fill, the scratch writes and the scratch reads (a tile's g
    is written and read with the same layout, but nothing forces it)."""
    pr = tl.program_id(0)
    j = tl.program_id(1)
    q = tl.program_id(2)
    n_p = tl.num_programs(0)
    n_j = tl.num_programs(1)
    n_q = tl.num_programs(2)
    pid = (pr * n_j + j) * n_q + q
    HS = H * S
    offs_r = tl.arange(0, BLOCK_R)
    offs_o = tl.arange(0, BLOCK_O)
    n_rb = tl.cdiv(B, BLOCK_R)
    n_ob = tl.cdiv(B, BLOCK_O)
    bout = tl.load(bout_ptr)
    scale = tl.load(scale_ptr)
    shift = tl.load(shift_ptr)
    # slot offsets in 64 bits: slots × H × S passes 2³¹ floats at large B and H
    if NF == 3:
        row_f = 1
        drow = drow_ptr + (j * n_q + q).to(tl.int64) * HS
        dcol = dcol_ptr + (pr * n_q + q).to(tl.int64) * HS
        dscal = dscal_ptr + (pr * n_j + j).to(tl.int64) * HS
        lo = q * SPAN
        hi = tl.minimum(lo + SPAN, B)         # this program's F_0 indices
        ob_lo = j
        ob_hi = n_ob
    else:
        row_f = 0
        drow = drow_ptr + q.to(tl.int64) * HS
        dcol = dcol_ptr + pr.to(tl.int64) * HS
        dscal = dscal_ptr
        lo = q * SPAN
        hi = tl.minimum(lo + SPAN, n_ob)      # this program's column blocks
        ob_lo = 0
        ob_hi = 1
    scratch = g_ptr + pid * (CHUNK * BLOCK_R * BLOCK_O)
    tile_offs = offs_r[:, None] * BLOCK_O + offs_o[None, :]

    # ---- zero this program's slots (they are summed over every slot afterwards)
    zero_r = tl.zeros([BLOCK_R], tl.float32)
    zero_o = tl.zeros([BLOCK_O], tl.float32)
    for rb in range(pr, n_rb, n_p):
        for h in range(0, H):
            tl.store(drow + h * S + rb * BLOCK_R + offs_r, zero_r)
    for h in range(0, H):
        tl.store(gw_ptr + pid * H + h, 0.0)
    if NF == 3:
        for ob in range(ob_lo, ob_hi, n_j):
            for h in range(0, H):
                tl.store(dcol + h * S + ob * BLOCK_O + offs_o, zero_o)
        offs_c = tl.arange(0, CHUNK)
        for k0 in range(lo, hi, CHUNK):
            kk = k0 + offs_c
            for h in range(0, H):
                tl.store(dscal + h * S + kk, tl.zeros([CHUNK], tl.float32), mask=kk < hi)
    else:
        for ob in range(lo, hi):
            for h in range(0, H):
                tl.store(dcol + h * S + ob * BLOCK_O + offs_o, zero_o)
    tl.debug_barrier()

    gb = tl.zeros([BLOCK_R, BLOCK_O], tl.float32)
    for rb in range(pr, n_rb, n_p):
        rows = rb * BLOCK_R + offs_r
        rmask = rows < B
        for ob in range(ob_lo, ob_hi, n_j):
            cols = ob * BLOCK_O + offs_o           # three factors: the chunk's column block
            for c0 in range(lo, hi, CHUNK):
                n_k = tl.minimum(CHUNK, hi - c0)
                # -- phase 1: the chunk's scores, once; g to the scratch
                for k in range(0, n_k):
                    if NF == 3:
                        s_scalar = c0 + k
                        cols_k = cols
                    else:
                        s_scalar = 0
                        cols_k = (c0 + k) * BLOCK_O + offs_o
                    valid = rmask[:, None] & (cols_k < B)[None, :]
                    if DISTINCT:
                        valid = valid & _distinct_pairs(rows, s_scalar, cols_k, NF)
                    t = _outer_scores(Ft_ptr, wout_ptr, bout, rows, s_scalar, cols_k, S, H,
                                      NF, NF - 1, ACT)
                    if GMODE == 2:  # InfoNCE (two factors): the anchors are the rows
                        row_shift = tl.load(row_lse_ptr + rows, mask=rmask,
                                            other=0.0)[:, None]
                        g = score_grad(t, valid, scale, row_shift, GMODE)
                    else:
                        g = score_grad(t, valid, scale, shift, GMODE)
                    gb += g
                    tl.store(scratch + k * (BLOCK_R * BLOCK_O) + tile_offs, g)
                tl.debug_barrier()
                # -- phase 2: per hidden unit, every tile of the chunk
                for h in range(0, H):
                    f_row = tl.load(Ft_ptr + row_f * HS + h * S + rows)
                    if NF == 3:
                        f_col = tl.load(Ft_ptr + 2 * HS + h * S + cols)
                    rowacc = tl.zeros([BLOCK_R, BLOCK_O], tl.float32)
                    colacc = tl.zeros([BLOCK_O], tl.float32)
                    zc = tl.zeros([BLOCK_O], tl.float32)
                    gwv = tl.zeros([BLOCK_R, BLOCK_O], tl.float32)
                    for k in range(0, n_k):
                        g = tl.load(scratch + k * (BLOCK_R * BLOCK_O) + tile_offs)
                        if NF == 3:
                            # the forward's order: (F_0 + F_2) per column, then + F_1 per row
                            c = tl.load(Ft_ptr + h * S + c0 + k) + f_col
                        else:
                            cols_k = (c0 + k) * BLOCK_O + offs_o
                            c = tl.load(Ft_ptr + HS + h * S + cols_k)
                        z = f_row[:, None] + c[None, :]
                        a = times_activation_grad(g, z, ACT)
                        rowacc += a
                        colsum = tl.sum(a, axis=0)
                        if HOMOGENEOUS:
                            zc += c * colsum
                        else:
                            gwv += g * activation(z, ACT)
                        if NF == 3:
                            colacc += colsum
                            p_scal = dscal + h * S + c0 + k
                            tl.store(p_scal, tl.load(p_scal) + tl.sum(colsum, axis=0))
                        else:
                            p_col = dcol + h * S + cols_k
                            tl.store(p_col, tl.load(p_col) + colsum)
                    d_row = tl.sum(rowacc, axis=1)
                    p_row = drow + h * S + rows
                    tl.store(p_row, tl.load(p_row) + d_row)
                    if NF == 3:
                        p_col = dcol + h * S + cols
                        tl.store(p_col, tl.load(p_col) + colacc)
                    if HOMOGENEOUS:
                        gw_h = tl.sum(f_row * d_row, axis=0) + tl.sum(zc, axis=0)
                    else:
                        gw_h = tl.sum(tl.sum(gwv, axis=1), axis=0)
                    p_gw = gw_ptr + pid * H + h
                    tl.store(p_gw, tl.load(p_gw) + gw_h)
                tl.debug_barrier()  # the next chunk overwrites the scratch
    tl.store(gb_ptr + pid, tl.sum(tl.sum(gb, axis=1), axis=0))


@triton.jit
def _sum_splits_kernel(part_ptr, out_ptr, n, NSPLIT, BLOCK: tl.constexpr):
    """out[i] = Σ_q part[q, i] for q = 0, 1, …, NSPLIT − 1 in that order (a fixed order: the
    backward is bitwise reproducible), n elements per slice."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    acc = tl.load(part_ptr + offs, mask=mask, other=0.0)
    for q in range(1, NSPLIT):
        acc += tl.load(part_ptr + q * n + offs, mask=mask, other=0.0)
    tl.store(out_ptr + offs, acc, mask=mask)


def _fwd_tiles(device) -> tuple[int, int]:
    """Forward (BLOCK_R, BLOCK_C) = 16 × 256 pairs at :data:`OUTER_FORWARD_WARPS` = 4 warps:
    Triton lays the warps along the columns, so a thread holds 16 rows × 2 columns and reads
    the 16 row values of a hidden unit with four 128-bit loads, once for both columns.
    sm_90 SASS of the h loop (python/sass_report.py, relu, docs/performance_counts.md):
    m = 3 125 instructions per 32 pair·units = 3.91 (was 5.56 at 8 warps with the 16-row
    partial F_0 + F_1 recomputed per column, 4.62 with the order of :func:`_pair_preact`
    at 8 warps); m = 2 3.84 (was 4.31)."""
    return (16, 256) if uses_gpu_launches(device) else (8, 16)


#: Warps of the forward's 16 × 256 tile: 4, so a thread holds 16 rows × 2 columns and each
#: 16-row vector load of F_1 and each w_out load serves 32 pairs (python/sass_report.py).
OUTER_FORWARD_WARPS = 4


def _bwd_tiles(device) -> tuple[int, int]:
    """Per-factor backward (two factors at small B) (BLOCK_S swept, BLOCK_O owned) = 16 × 256
    at 8 warps (the largest of :data:`OUTER_BACKWARD_TILES`; smaller ones for launches with
    few tiles — at B = 256 on an H200, 4 × 32): one owned index and BLOCK_S swept ones per
    thread.  sm_90 SASS per pair·unit at 4 × 32 (docs/performance_counts.md): scores 4.94,
    gradients 10.00 with the w_out partials, 5.75 without."""
    return (16, 256) if uses_gpu_launches(device) else (4, 16)


#: "SMs" of the CPU interpreter for the grid computations: few, so that the tests' tiny
#: batches still split their swept blocks.
_INTERPRETER_SMS = 2


def _sm_count(device) -> int:
    """Streaming multiprocessors of ``device``, or of the emulated GPU
    (:func:`~mdm_kernels.ops.runtime_flags.emulate_gpu`); :data:`_INTERPRETER_SMS` in the
    plain interpreter."""
    sms = sm_count(device)
    return _INTERPRETER_SMS if sms is None else sms


def _programs(tiles: int, device) -> int:
    """Persistent forward grid: one program per tile, at most 4 per SM."""
    if not uses_gpu_launches(device):
        return max(1, min(tiles, 3))
    return max(1, min(tiles, 4 * _sm_count(device)))


#: Backward tiles (BLOCK_S swept, BLOCK_O owned) a GPU launch may take, largest first, at
#: BLOCK_O / 32 warps (one owned index per thread).  16 × 256 is the tile of the PTX figures
#: (:func:`_bwd_tiles`); a launch with fewer of them than two programs per SM takes the first
#: smaller tile that has enough (:func:`outer_backward_grid`) — down to 4 × 32, so that two
#: factors at B = 256 (only 16 tiles of 16 × 256) still fill an H200.  Every size divides
#: the padded batch :func:`outer_stride`.
OUTER_BACKWARD_TILES = ((16, 256), (16, 128), (16, 64), (16, 32), (8, 32), (4, 32))


@dataclass(frozen=True)
class OuterBackwardGrid:
    """One outer-sum backward launch: tiles of ``block_swept`` × ``block_owned`` indices at
    ``num_warps``; ``owned_programs`` × ``splits`` programs, program (p, q) taking the owned
    blocks p, p + owned_programs, … and the swept blocks [q·blocks_per_split,
    (q + 1)·blocks_per_split) (the last split may hold fewer)."""
    block_swept: int
    block_owned: int
    num_warps: int
    owned_programs: int
    splits: int
    blocks_per_split: int

    @property
    def grid(self) -> tuple[int, int]:
        return (self.owned_programs, self.splits)

    @property
    def programs(self) -> int:
        return self.owned_programs * self.splits


def outer_backward_grid(batch_size: int, num_factors: int, num_sms: int,
                        tiles=OUTER_BACKWARD_TILES) -> OuterBackwardGrid:
    """Tile and grid of a per-factor backward launch (two factors at small B,
    :func:`uses_fused_backward`; pure Python, unit-tested without a GPU).

    With a tile (b_s, b_o) the owned factor has n_o = ⌈B / b_o⌉ blocks and the swept one
    n_s = ⌈B / b_s⌉: n_o·n_s tiles.  Target: 2 × ``num_sms`` programs.  The tile is the
    first of ``tiles`` (largest first) with at least that many tiles, else the last.  The
    owned blocks go to min(n_o, target) persistent programs; the swept blocks are cut into
    ⌈target / programs⌉ contiguous splits of ⌊n_s / that⌋ blocks (so a few more splits,
    never fewer; at most n_s), whose partial sums are reduced in a fixed order afterwards.
    Hence programs ≥ min(2·num_sms, n_o·n_s) — with :data:`OUTER_BACKWARD_TILES`,
    ≥ 2·num_sms for every B ≥ 256 (B²/128 tiles of 4 × 32) up to 256 SMs.
    """
    for name, value in (("batch_size", batch_size), ("num_sms", num_sms)):
        if int(value) < 1:
            raise ValueError(f"outer_backward_grid: {name} must be >= 1, got {value}")
    if num_factors != 2:
        raise ValueError("outer_backward_grid: the per-factor backward takes num_factors = 2, "
                         f"got {num_factors} (three factors: outer_fused_plan)")
    if not tiles:
        raise ValueError("outer_backward_grid: tiles must name at least one tile")
    target = 2 * num_sms
    for block_swept, block_owned in tiles:
        owned_blocks = triton.cdiv(batch_size, block_owned)
        swept_blocks = triton.cdiv(batch_size, block_swept)
        if owned_blocks * swept_blocks >= target:
            break
    owned_programs = min(owned_blocks, target)
    per_split = max(1, swept_blocks // triton.cdiv(target, owned_programs))
    return OuterBackwardGrid(block_swept, block_owned, max(1, block_owned // 32),
                             owned_programs, triton.cdiv(swept_blocks, per_split), per_split)


#: Fused backward tile (BLOCK_R rows, BLOCK_O columns, CHUNK tiles per chunk) on a GPU: one
#: warp, a thread holding 32 rows of one column (python/sass_report.py counts the loops).
#: CHUNK = 8: phase 2 re-reads a chunk's g (CHUNK × 4 KB) once per hidden unit, so the four
#: programs an SM runs (:data:`FUSED_PROGRAMS_PER_SM`) should keep their scratch in L1 —
#: 4 × 32 KB of the 256 KB an sm_90 SM shares between L1 and shared memory (at 16 the four
#: would need all of it, 4 × 64 KB); each halving doubles the per-unit sums' share
#: (0.36 → 0.71 instructions per pair·unit at m = 3, docs/performance_counts.md).  The CPU
#: interpreter takes a small tile so the tests' batches span several chunks (CHUNK, like
#: the blocks, a power of two).
OUTER_FUSED_TILE = (32, 32, 8)
_INTERPRETER_FUSED_TILE = (4, 8, 2)


def _fused_tile(device) -> tuple[int, int, int]:
    return OUTER_FUSED_TILE if uses_gpu_launches(device) else _INTERPRETER_FUSED_TILE


@dataclass(frozen=True)
class OuterFusedPlan:
    """One fused outer-sum backward launch (:func:`_outer_bwd_fused_kernel`): tiles of
    ``block_rows`` × ``block_cols`` in chunks of ``chunk``; ``row_blocks`` row blocks dealt
    to ``row_groups`` programs along the grid's first axis; grid (``row_groups``,
    ``col_groups``, ``splits``), each split ``span`` F_0 indices (three factors) or column
    blocks (two); partial-sum slots per factor (``slots``: row factor, column factor, F_0)."""
    num_factors: int
    block_rows: int
    block_cols: int
    chunk: int
    row_blocks: int
    row_groups: int
    col_groups: int
    splits: int
    span: int

    @property
    def grid(self) -> tuple[int, int, int]:
        return (self.row_groups, self.col_groups, self.splits)

    @property
    def programs(self) -> int:
        return self.row_groups * self.col_groups * self.splits

    @property
    def slots(self) -> tuple[int, int, int]:
        if self.num_factors == 3:
            return (self.col_groups * self.splits, self.row_groups * self.splits,
                    self.row_groups * self.col_groups)
        return (self.splits, self.row_groups, 0)


#: Target programs per SM of the fused backward: its programs are one warp each, and an
#: sm_90 SM issues from four schedulers — two one-warp programs per SM would leave half of
#: them idle (python/sass_report.py's issue-bound model, docs/performance_counts.md).
FUSED_PROGRAMS_PER_SM = 4

#: At most this many row groups (by factor count) and, with three factors, column groups:
#: every slot is H × S floats, and the slot counts are products of the groups and splits
#: (:attr:`OuterFusedPlan.slots`), so capping the groups keeps the fused backward's memory
#: O(H·S) — about 200 slots with three factors, 50 with two, at any B — where one group
#: per row block made it grow as O(B²·H/32) (1.6 GB at m = 3, B = 4,096, H = 128).
FUSED_MAX_ROW_GROUPS = {2: 32, 3: 8}
FUSED_MAX_COL_GROUPS = 8


def _fused_plan_at(batch_size, num_factors, target, block_rows, block_cols, chunk):
    row_blocks = triton.cdiv(batch_size, block_rows)
    col_blocks = triton.cdiv(batch_size, block_cols)
    row_groups = triton.cdiv(row_blocks, triton.cdiv(row_blocks,
                                                     FUSED_MAX_ROW_GROUPS[num_factors]))
    if num_factors == 3:
        col_groups = min(col_blocks, FUSED_MAX_COL_GROUPS, max(1, target // row_groups))
        extent = batch_size
    else:
        col_groups = 1
        extent = col_blocks
    wanted = max(1, target // (row_groups * col_groups))   # ≤ target: no SM holds an extra one
    span = chunk * triton.cdiv(triton.cdiv(extent, wanted), chunk)
    return OuterFusedPlan(num_factors, block_rows, block_cols, chunk, row_blocks, row_groups,
                          col_groups, triton.cdiv(extent, span), span)


def outer_fused_plan(batch_size: int, num_factors: int, num_sms: int,
                     tile=OUTER_FUSED_TILE) -> OuterFusedPlan:
    """Grid of the fused backward (pure Python; unit-tested without a GPU).

    Rows: n_r = ⌈B / BLOCK_R⌉ blocks, dealt to n_p = ⌈n_r / ⌈n_r / P⌉⌉ row groups (P =
    :data:`FUSED_MAX_ROW_GROUPS`: 8 with three factors, 32 with two); columns:
    n_o = ⌈B / BLOCK_O⌉ blocks.  Target :data:`FUSED_PROGRAMS_PER_SM` × ``num_sms``
    programs (one warp each).  Three factors: the column blocks go to n_j = min(n_o, 8,
    max(1, target // n_p)) strided groups, the B indices of F_0 to splits of span = chunk ×
    ⌈⌈B / wanted⌉ / chunk⌉ indices (whole chunks; wanted = ⌊target / (n_p·n_j)⌋).  Two
    factors: splits of the n_o column blocks, span = chunk × ⌈⌈n_o / wanted⌉ / chunk⌉.
    The chunk is the tile's CHUNK, halved (once, to CHUNK / 2) while the grid has fewer
    programs than SMs: a program's row sums cross threads once per chunk and unit, so a
    smaller chunk costs instructions (docs/performance_counts.md) but fills the GPU.
    Slots of partial sums: (n_j·splits, n_p·splits, n_p·n_j) for three factors,
    (splits, n_p, 0) for two — × H × S floats each."""
    for name, value in (("batch_size", batch_size), ("num_sms", num_sms)):
        if int(value) < 1:
            raise ValueError(f"outer_fused_plan: {name} must be >= 1, got {value}")
    if num_factors not in (2, 3):
        raise ValueError(f"outer_fused_plan: num_factors must be 2 or 3, got {num_factors}")
    block_rows, block_cols, chunk = tile
    smallest = max(1, chunk // 2)
    while True:
        plan = _fused_plan_at(batch_size, num_factors, FUSED_PROGRAMS_PER_SM * num_sms,
                              block_rows, block_cols, chunk)
        if plan.programs >= num_sms or chunk <= smallest:
            return plan
        chunk //= 2


def fused_backward_plan(batch_size: int, num_factors: int, num_sms: int,
                        tile=OUTER_FUSED_TILE) -> OuterFusedPlan | None:
    """The fused backward's plan, or None where the per-factor launches are used: the fused
    backward for three factors always; for two factors when its plan puts at least one
    program on every SM (at small B the per-factor launches of :func:`outer_backward_grid`
    fill the GPU with 4 × 32 tiles instead: two factors at B = 256 are a few µs either way,
    docs/performance_counts.md)."""
    plan = outer_fused_plan(batch_size, num_factors, num_sms, tile)
    return plan if num_factors == 3 or plan.programs >= num_sms else None


def uses_fused_backward(batch_size: int, num_factors: int, num_sms: int,
                        tile=OUTER_FUSED_TILE) -> bool:
    """:func:`fused_backward_plan` is not None."""
    return fused_backward_plan(batch_size, num_factors, num_sms, tile) is not None


#: Elements per program of the split sums: 256 (2 per thread at 4 warps), so the H × S
#: slice of a paper-scale launch (128 × 256) is 128 programs, about one per SM of an
#: H100/H200 — each reads its column of every split serially, a memory-bound loop
#: (1,024 gave 32 programs, a quarter of the SMs drawing bandwidth; issue 24).
SPLIT_SUM_BLOCK = 256


def _sum_splits(parts: torch.Tensor) -> torch.Tensor:
    """Σ_q parts[q] over the leading (split) axis, in split order, by one launch."""
    if parts.shape[0] == 1:
        return parts[0]
    out = fresh_empty(parts.shape[1:], device=parts.device, dtype=parts.dtype)
    n = out.numel()
    gpu = uses_gpu_launches(parts.device)
    _sum_splits_kernel[(triton.cdiv(n, SPLIT_SUM_BLOCK),)](
        parts, out, n, parts.shape[0], BLOCK=SPLIT_SUM_BLOCK, num_warps=4 if gpu else 1)
    return out


def outer_stride(B, device):
    """Padded batch S of Fᵀ: a multiple of every block size (all powers of two); ``B`` may be
    a symbolic size (fake tensors)."""
    step = max(*_fwd_tiles(device), *_bwd_tiles(device), *_fused_tile(device)[:2])
    return (B + step - 1) // step * step


# ----------------------------------------------------------------------------- op bodies
# The forward and backward of the ``mdm_kernels::triton_outer_*`` custom ops
# (:mod:`~mdm_kernels.ops.triton_ops` registers them with their autograd formula).
def outer_forward(kind, act, factors, wout, bout, distinct=False):
    """(marginal term, Fᵀ, stat) over the grid of NF = 2 or 3 factors F_f (B × H each,
    float32), T(i_0, …) = w_out·σ(Σ_f F_f[i_f]) + b_out (module docstring).  Fᵀ (NF × H × S,
    zero columns beyond B, S = :func:`outer_stride`) and ``stat`` (the LSE for DV/NWJ, the B
    row LSEs for InfoNCE, else an empty (0,) tensor) are what :func:`outer_backward` needs.
    ``distinct``: the grid without coinciding indices (``"distinct"`` negatives)."""
    nf = len(factors)
    B, H = factors[0].shape
    device = factors[0].device
    S = outer_stride(B, device)
    Ft = torch.nn.functional.pad(torch.stack(factors).transpose(1, 2), (0, S - B))
    br, bc = _fwd_tiles(device)
    red = MARGINAL_RED[kind]
    n_rb = triton.cdiv(B, br) if nf == 2 else B * triton.cdiv(B, br)
    tiles = n_rb * (1 if red == MARGINAL_RED["infonce"] else triton.cdiv(B, bc))
    G = _programs(tiles, device)
    stats = fresh_empty(G, 2, device=device, dtype=torch.float32)
    row_lse = fresh_empty(B, device=device, dtype=torch.float32)
    with launch_device(Ft):
        _outer_fwd_kernel[(G,)](Ft, wout, bout, stats, row_lse, B, S, H, NF=nf, RED=red,
                                ACT=act, BLOCK_R=br, BLOCK_C=bc, DISTINCT=distinct,
                                num_warps=OUTER_FORWARD_WARPS if uses_gpu_launches(device) else 1)
    plan = marginal_plan(kind, B, nf, None, distinct)  # the sample and candidate counts
    value, stat = marginal_value(kind, stats, row_lse, plan.N, plan.candidates)
    return value, Ft, (Ft.new_empty(0) if stat is None else stat)


def outer_backward(kind, act, Ft, wout, bout, stat, grad, B, distinct=False):
    """(∂F_0, …, ∂F_{NF−1}, ∂w_out, ∂b_out) of grad·(marginal term): one fused launch
    (:func:`_outer_bwd_fused_kernel`) or, for two factors at small B, one launch per factor
    (:func:`uses_fused_backward`)."""
    nf, H, S = Ft.shape
    plan = marginal_plan(kind, B, nf, None, distinct)
    args = marginal_grad_args(kind, grad, stat, plan.N, B)
    sms = _sm_count(Ft.device)
    fused = fused_backward_plan(B, nf, sms, _fused_tile(Ft.device))
    with launch_device(Ft):
        if fused is not None:
            return _fused_backward(act, Ft, wout, bout, args, B, distinct, fused)
        return _per_factor_backward(act, Ft, wout, bout, args, B, distinct, sms)


def _fused_backward(act, Ft, wout, bout, grad_args, B, distinct, plan):
    """The fused launch, then the fixed-order sums of its slots."""
    nf, H, S = Ft.shape
    gmode, scale, shift, row_lse = grad_args
    f32 = dict(device=Ft.device, dtype=torch.float32)
    n_row, n_col, n_scal = plan.slots
    drow = fresh_empty(n_row, H, S, **f32)
    dcol = fresh_empty(n_col, H, S, **f32)
    dscal = fresh_empty(n_scal, H, S, **f32) if n_scal else drow  # two factors: unused
    scratch = fresh_empty(plan.programs, plan.chunk * plan.block_rows * plan.block_cols, **f32)
    gw = fresh_empty(plan.programs, H, **f32)
    gb = fresh_empty(plan.programs, **f32)
    _outer_bwd_fused_kernel[plan.grid](
        Ft, wout, bout, scale, shift, row_lse, scratch, drow, dcol, dscal, gw, gb, B, S, H,
        plan.span, NF=nf, GMODE=gmode, ACT=act, HOMOGENEOUS=act in HOMOGENEOUS_ACTIVATIONS,
        BLOCK_R=plan.block_rows, BLOCK_O=plan.block_cols, CHUNK=plan.chunk,
        DISTINCT=distinct, num_warps=max(1, plan.block_cols // 32))
    sums = [_sum_splits(drow), _sum_splits(dcol)]
    if nf == 3:  # slots by factor: rows are F_1, columns F_2, the scalar side F_0
        sums = [_sum_splits(dscal), *sums]
    grads = [(d[:, :B] * wout[:, None]).t() for d in sums]
    # ∂w_out: P × H partials, ∂b_out: P (torch's sums: a fixed order, no atomics)
    return (*grads, gw.sum(0), gb.sum().reshape(1))


def _per_factor_backward(act, Ft, wout, bout, grad_args, B, distinct, sms):
    """One launch per factor (:func:`_outer_bwd_kernel`) over ``sms`` SMs, the w_out / b_out
    partials in the first."""
    nf, H, S = Ft.shape
    gmode, scale, shift, row_lse = grad_args
    gpu = uses_gpu_launches(Ft.device)
    launch = outer_backward_grid(B, nf, sms,
                                 OUTER_BACKWARD_TILES if gpu else (_bwd_tiles(Ft.device),))
    f32 = dict(device=Ft.device, dtype=torch.float32)
    grads = []
    for f in range(nf):
        # per-split partials: the kernel writes every element (no zero fill)
        dOt = fresh_empty(launch.splits, H, S, **f32)
        gwt = fresh_empty(launch.splits, H, S, **f32) if f == 0 else dOt
        gb = fresh_empty(launch.programs, **f32)
        _outer_bwd_kernel[launch.grid](
            Ft, wout, bout, scale, shift, row_lse, dOt, gwt, gb, B, S, H,
            launch.blocks_per_split, NF=nf, OWNED=f, GMODE=gmode, PARAM_GRADS=f == 0,
            ACT=act, BLOCK_S=launch.block_swept, BLOCK_O=launch.block_owned,
            DISTINCT=distinct, num_warps=launch.num_warps if gpu else 1)
        grads.append((_sum_splits(dOt)[:, :B] * wout[:, None]).t())
        if f == 0:
            # only the owned blocks' columns are written (⌈B / BLOCK_O⌉·BLOCK_O ≤ S):
            # the columns up to B are the w_out partials, the rest is not ours to read
            g_wout = _sum_splits(gwt)[:, :B].sum(1)
            g_bout = gb.sum().reshape(1)
    return (*grads, g_wout, g_bout)

"""Sample tiles: the ``@triton.jit`` building blocks shared by the gathered-tile kernels
(:mod:`~mdm_kernels.ops.gathered_tiles`) and the one-program step
(:mod:`~mdm_kernels.ops.single_program`) — which rows form a sample, a tile's scores, the
estimator's gradient on a tile and its backpropagation through the critic.

Math
====
With the split first layer (:mod:`mdm_kernels.critic`) every sample s = (i_1, ..., i_m) has

    z1_s = Σ_j P_j[i_j] + b_1          P_j = z_j W_{1,j}^T  (B × H_1, one torch GEMM each)
    a1_s = σ(z1_s)
    (2 hidden layers)  z2_s = W_2 a1_s + b_2,  a2_s = σ(z2_s)
    T_s  = w_out · a_L,s + b_out

Each term of :mod:`~mdm_kernels.ops.marginal_terms` is a reduction of these scores, and its
derivative with respect to each score is g_s = scale · φ(T_s).

Backpropagating g through the MLP (recomputed tile by tile, never stored):

    ∂b_out = Σ g_s,   ∂w_out = Σ g_s a_L,s
    (2 layers)  δ2_s = g_s w_out ⊙ σ'(z2_s);  ∂W_2 = Σ δ2_s a1_sᵀ;  ∂b_2 = Σ δ2_s;
                da1_s = W_2ᵀ δ2_s        (1 layer: da1_s = g_s w_out)
    δ1_s = da1_s ⊙ σ'(z1_s);   ∂b_1 = Σ δ1_s;   ∂P_j[r] = Σ_{s : i_j = r} δ1_s

and autograd turns ∂P_j into ∂z_j and ∂W_{1,j} through the projection GEMM.

Samples are addressed as (row r, column c); a tile is the (BLOCK_N × H_1) first
pre-activation of BLOCK_N samples, built by gathering P rows by index.
Index modes
(constexpr ``IDX``):

* ``JOINT``   flat sample n = r·BLOCK_N + c, i_j = n (the diagonal).
* ``PERMS``   flat n = k·B + i, i_j = perms[k, j, i] read from memory.
* ``GRID``    ``"all"``: r is the index of the *owner* factor, c enumerates the other factors
  in row-major order (decoded from c, never materialised).  For InfoNCE the factors are
  (anchor, candidate) with the candidate modalities 2..m sharing one index (``GROUPED``).
* ``NCE``     InfoNCE with shuffles: r = anchor i, c ∈ [0, K] picks the candidate
  (c = 0: i itself, c ≥ 1: perms[c − 1, 1, i]).

``"distinct"`` negatives are the ``GRID`` layout with the constexpr ``DISTINCT``: the samples
whose factor indices coincide (InfoNCE: candidate = anchor) are masked out of each tile
(:func:`grid_distinct`), so they enter neither a reduction nor a gradient — no extra memory.

A :class:`SamplePlan` records one term's index mode and sizes (N samples as rows × columns).
"""
from __future__ import annotations

import math

import triton
import triton.language as tl

from .marginal_terms import (NEG_BIG, score_grad)
from .triton_helpers import DOT_PREC, activation, activation_grad

IDX_JOINT, IDX_PERMS, IDX_GRID, IDX_NCE = 0, 1, 2, 3


@triton.jit
def _grid_factor(q: tl.constexpr, r, cols, B, NF: tl.constexpr, OWNER: tl.constexpr):
    """Index of factor q for the "all" grid: the owner factor is the row r; the other NF − 1
    factors are the row-major digits (base B) of the column c, the last one varying fastest."""
    if q == OWNER:
        idx = tl.zeros_like(cols) + r
    else:
        rem = cols
        idx = tl.zeros_like(cols)
        for t in tl.static_range(NF):
            if NF - 1 - t != OWNER:
                if NF - 1 - t == q:
                    idx = rem % B
                rem = rem // B
    return idx


@triton.jit
def grid_distinct(valid, r, cols, B, IDX: tl.constexpr, NF: tl.constexpr,
                  OWNER: tl.constexpr, DISTINCT: tl.constexpr):
    """``valid`` restricted to the samples of pairwise distinct factor indices when DISTINCT
    (``"distinct"`` negatives on the GRID layout; InfoNCE's two factors: candidate ≠ anchor);
    ``valid`` unchanged otherwise."""
    if DISTINCT:
        if IDX == 2:
            for a in tl.static_range(NF):
                ia = _grid_factor(a, r, cols, B, NF, OWNER)
                for b in tl.static_range(a + 1, NF):
                    valid = valid & (ia != _grid_factor(b, r, cols, B, NF, OWNER))
    return valid


@triton.jit
def row_layout(N, NCOL, B, IDX: tl.constexpr, BLOCK_N: tl.constexpr):
    """(number of rows R, columns per row) of a launch: flat sample modes (IDX 0, 1) cut the
    N samples into rows of one BLOCK_N tile; grid and InfoNCE modes have B rows of NCOL."""
    if IDX <= 1:
        R = tl.cdiv(N, BLOCK_N)
        ncol = BLOCK_N
    else:
        R = B
        ncol = NCOL
    return R, ncol


@triton.jit
def tile_columns(r, c0, offs, N, ncol, BLOCK_N: tl.constexpr, IDX: tl.constexpr):
    """Sample ids of one tile and their validity mask: tile r of the N flat samples for
    memory-indexed launches (IDX 0, 1), columns c0.. of row r's ncol columns otherwise."""
    if IDX <= 1:
        cols = r * BLOCK_N + offs
        valid = cols < N
    else:
        cols = c0 + offs
        valid = cols < ncol
    return cols, valid


@triton.jit
def _owns_factor(j: tl.constexpr, OWNER: tl.constexpr, IDX: tl.constexpr,
                 GROUPED: tl.constexpr):
    """Whether modality j's projection row is the one a backward program owns (and so
    stores once, without atomics): the owner factor of an "all" grid launch (IDX 2; with
    GROUPED InfoNCE candidates, factor 1 is every modality j ≥ 1), or the anchor of the
    InfoNCE shuffle layout (IDX 3).  Plain sample launches (IDX 0, 1) own nothing."""
    owns = False
    if IDX == 2:
        if GROUPED:
            owns = (j == 0) == (OWNER == 0)
        else:
            owns = j == OWNER
    elif IDX == 3:
        owns = j == 0
    return owns


@triton.jit
def _sample_rows(j: tl.constexpr, r, cols, valid, perm_ptr, B, M: tl.constexpr,
                 IDX: tl.constexpr, NF: tl.constexpr, OWNER: tl.constexpr,
                 GROUPED: tl.constexpr):
    """Row of P_j used by each sample of the tile (0 for invalid lanes)."""
    if IDX == 0:  # JOINT: the diagonal
        idx = cols
    elif IDX == 1:  # PERMS: flat n = k·B + i -> perms[k, j, i]
        kk = cols // B
        ii = cols % B
        idx = tl.load(perm_ptr + kk * (M * B) + j * B + ii, mask=valid, other=0)
    elif IDX == 2:  # GRID ("all")
        if GROUPED:
            if j == 0:
                idx = _grid_factor(0, r, cols, B, NF, OWNER)
            else:
                idx = _grid_factor(1, r, cols, B, NF, OWNER)
        else:
            idx = _grid_factor(j, r, cols, B, NF, OWNER)
    else:  # NCE: anchor r, candidate c (0: r itself, else perms[c − 1, 1, r])
        if j == 0:
            idx = tl.zeros_like(cols) + r
        else:
            shuffled = tl.load(perm_ptr + (cols - 1) * (M * B) + B + r,
                               mask=valid & (cols > 0), other=0)
            idx = tl.where(cols > 0, shuffled, r)
    idx = tl.where(valid, idx, 0)
    return idx.to(tl.int64)


@triton.jit
def scatter_shared_rows(dP_ptr, d1, r, cols, valid, offs_h, hmask, perm_ptr, B, H1,
                         M: tl.constexpr, IDX: tl.constexpr, NF: tl.constexpr,
                         OWNER: tl.constexpr, GROUPED: tl.constexpr):
    """∂P_j[i_j] += δ1 with atomics for every factor j the program does not own (shuffle,
    joint and InfoNCE-candidate rows); "all"-grid launches skip them (each factor gets its
    own launch as owner)."""
    m2 = valid[:, None] & hmask[None, :]
    for j in tl.static_range(M):
        if not _owns_factor(j, OWNER, IDX, GROUPED):
            if IDX != 2:
                rows = _sample_rows(j, r, cols, valid, perm_ptr, B, M, IDX, NF, OWNER, GROUPED)
                tl.atomic_add(dP_ptr + j * B * H1 + rows[:, None] * H1 + offs_h[None, :], d1,
                              mask=m2)


@triton.jit
def store_owned_row(dP_ptr, own, r, offs_h, hmask, B, H1, M: tl.constexpr,
                     IDX: tl.constexpr, OWNER: tl.constexpr, GROUPED: tl.constexpr):
    """Store row r's gradient ``own`` (summed over all its columns) into every owned P_j."""
    if IDX >= 2:
        for j in tl.static_range(M):
            if _owns_factor(j, OWNER, IDX, GROUPED):
                tl.store(dP_ptr + j * B * H1 + r * H1 + offs_h, own, mask=hmask)


@triton.jit
def _first_preact(P_ptr, b1, r, cols, valid, offs_h, hmask, perm_ptr, B, H1,
                  M: tl.constexpr, IDX: tl.constexpr, NF: tl.constexpr,
                  OWNER: tl.constexpr, GROUPED: tl.constexpr):
    """z1 = Σ_j P_j[i_j] + b_1 for the tile (BLOCK_N × BLOCK_H1), float32."""
    z1 = tl.zeros([cols.shape[0], offs_h.shape[0]], tl.float32) + b1[None, :]
    m2 = valid[:, None] & hmask[None, :]
    for j in tl.static_range(M):
        rows = _sample_rows(j, r, cols, valid, perm_ptr, B, M, IDX, NF, OWNER, GROUPED)
        z1 += tl.load(P_ptr + j * B * H1 + rows[:, None] * H1 + offs_h[None, :], mask=m2,
                      other=0.0)
    return z1


@triton.jit
def _layer2_chunk(a1, W2_ptr, b2_ptr, wout_ptr, h0, offs_c, offs_h, hmask, H1, H2):
    """Second-layer units h0 .. h0 + BLOCK_H2 of a tile: z2 = a1 W_2[chunk]ᵀ + b_2[chunk]
    (tl.dot at :data:`~mdm_kernels.ops.triton_helpers.DOT_PRECISION`), with the chunk's W_2 rows, output weights and mask."""
    cmask = (h0 + offs_c) < H2
    w2 = tl.load(W2_ptr + (h0 + offs_c)[:, None] * H1 + offs_h[None, :],
                 mask=cmask[:, None] & hmask[None, :], other=0.0)
    b2 = tl.load(b2_ptr + h0 + offs_c, mask=cmask, other=0.0)
    wo = tl.load(wout_ptr + h0 + offs_c, mask=cmask, other=0.0)
    z2 = tl.dot(a1, tl.trans(w2), input_precision=DOT_PREC) + b2[None, :]
    return z2, w2, wo, cmask


@triton.jit
def _scores(a1, W2_ptr, b2_ptr, wout_ptr, bout, offs_h, hmask, H1, H2,
            TWO_LAYERS: tl.constexpr, BLOCK_H2: tl.constexpr, ACT: tl.constexpr):
    """T = w_out · a_L + b_out from the first activations a1 (BLOCK_N × BLOCK_H1).
    The second layer is done in H_2 chunks of BLOCK_H2 with tl.dot (3×TF32, about fp32 accuracy)."""
    if TWO_LAYERS:
        t = tl.zeros([a1.shape[0]], tl.float32) + bout
        offs_c = tl.arange(0, BLOCK_H2)
        for h0 in range(0, H2, BLOCK_H2):
            z2, w2, wo, cmask = _layer2_chunk(a1, W2_ptr, b2_ptr, wout_ptr, h0, offs_c,
                                              offs_h, hmask, H1, H2)
            t += tl.sum(activation(z2, ACT) * wo[None, :], axis=1)
    else:
        wo = tl.load(wout_ptr + offs_h, mask=hmask, other=0.0)
        t = tl.sum(a1 * wo[None, :], axis=1) + bout
    return t


@triton.jit
def tile_scores(P_ptr, b1, r, cols, valid, offs_h, hmask, perm_ptr, W2_ptr, b2_ptr, wout_ptr,
                 bout, B, H1, H2, M: tl.constexpr, IDX: tl.constexpr, NF: tl.constexpr,
                 OWNER: tl.constexpr, GROUPED: tl.constexpr, TWO_LAYERS: tl.constexpr,
                 BLOCK_H2: tl.constexpr, ACT: tl.constexpr):
    """(z1, a1 = σ(z1), T) of a tile: :func:`_first_preact` then :func:`_scores`."""
    z1 = _first_preact(P_ptr, b1, r, cols, valid, offs_h, hmask, perm_ptr, B, H1, M, IDX, NF,
                       OWNER, GROUPED)
    a1 = activation(z1, ACT)
    t = _scores(a1, W2_ptr, b2_ptr, wout_ptr, bout, offs_h, hmask, H1, H2, TWO_LAYERS,
                BLOCK_H2, ACT)
    return z1, a1, t


@triton.jit
def term_grad(t, valid, r, cols, scale, shift, row_lse_ptr, perm_ptr, B, M: tl.constexpr,
               IDX: tl.constexpr, NF: tl.constexpr, OWNER: tl.constexpr,
               GROUPED: tl.constexpr, GMODE: tl.constexpr):
    """:func:`score_grad` with InfoNCE's per-row shift LSE_i of each sample's anchor
    (G_EXP_ROW): row r's for the shuffle layout (IDX 3), gathered by anchor (factor 0) on
    the "all" grid."""
    if GMODE == 2:
        if IDX == 3:
            row_shift = tl.load(row_lse_ptr + r)
        else:
            anc = _sample_rows(0, r, cols, valid, perm_ptr, B, M, IDX, NF, OWNER, GROUPED)
            row_shift = tl.load(row_lse_ptr + anc)
        g = score_grad(t, valid, scale, row_shift, GMODE)
    else:
        g = score_grad(t, valid, scale, shift, GMODE)
    return g


@triton.jit
def tile_score_grads(P_ptr, b1, r, c0, offs, N, ncol, offs_h, hmask, perm_ptr, W2_ptr, b2_ptr,
                     wout_ptr, bout, scale, shift, row_lse_ptr, B, H1, H2, M: tl.constexpr,
                     IDX: tl.constexpr, NF: tl.constexpr, OWNER: tl.constexpr,
                     GROUPED: tl.constexpr, TWO_LAYERS: tl.constexpr, BLOCK_H2: tl.constexpr,
                     ACT: tl.constexpr, GMODE: tl.constexpr, DISTINCT: tl.constexpr,
                     BLOCK_N: tl.constexpr):
    """The recomputation step of every backward over sample tiles: the tile of columns
    c0.. of row r (:func:`tile_columns`, masked by :func:`grid_distinct`), its scores
    (:func:`tile_scores`) and g = ∂term/∂T (:func:`term_grad`).  Returns
    (cols, valid, z1, a1, g) for :func:`tile_backprop`."""
    cols, valid = tile_columns(r, c0, offs, N, ncol, BLOCK_N, IDX)
    valid = grid_distinct(valid, r, cols, B, IDX, NF, OWNER, DISTINCT)
    z1, a1, t = tile_scores(P_ptr, b1, r, cols, valid, offs_h, hmask, perm_ptr, W2_ptr, b2_ptr,
                            wout_ptr, bout, B, H1, H2, M, IDX, NF, OWNER, GROUPED, TWO_LAYERS,
                            BLOCK_H2, ACT)
    g = term_grad(t, valid, r, cols, scale, shift, row_lse_ptr, perm_ptr, B, M, IDX, NF, OWNER,
                  GROUPED, GMODE)
    return cols, valid, z1, a1, g


@triton.jit
def tile_backprop(g, z1, a1, valid, W2_ptr, b2_ptr, wout_ptr, offs_h, hmask, offs_c, H1, H2,
                   gW2_ptr, gb2_ptr, gwout_ptr, TWO_LAYERS: tl.constexpr,
                   PARAM_GRADS: tl.constexpr, BLOCK_H2: tl.constexpr, ACT: tl.constexpr):
    """Backpropagate g = ∂term/∂T of a tile through the MLP tail (module docstring):
    returns δ1 = ∂term/∂z1 (BLOCK_N × BLOCK_H1, 0 on invalid lanes) and, with one hidden
    layer, this tile's Σ g·a1 (the w_out gradient).  With two hidden layers and PARAM_GRADS
    the W_2, b_2 and w_out gradients are added into the private slices gW2_ptr (H2 × H1),
    gb2_ptr (H2), gwout_ptr (H2) by read-modify-write."""
    gw_inc = tl.zeros([offs_h.shape[0]], tl.float32)
    if TWO_LAYERS:
        da1 = tl.zeros_like(a1)
        for h0 in range(0, H2, BLOCK_H2):
            z2, w2, wo, cmask = _layer2_chunk(a1, W2_ptr, b2_ptr, wout_ptr, h0, offs_c,
                                              offs_h, hmask, H1, H2)
            d2 = g[:, None] * wo[None, :] * activation_grad(z2, ACT)
            if PARAM_GRADS:
                # the threads that load an element need not be the ones that stored it on
                # the previous tile (the layouts differ), so order them with a barrier
                # (global memory is not covered by Triton's shared-memory barriers)
                tl.debug_barrier()
                a2 = activation(z2, ACT)
                p_wo = gwout_ptr + h0 + offs_c
                tl.store(p_wo, tl.load(p_wo, mask=cmask, other=0.0)
                         + tl.sum(g[:, None] * a2, axis=0), mask=cmask)
                p_b2 = gb2_ptr + h0 + offs_c
                tl.store(p_b2, tl.load(p_b2, mask=cmask, other=0.0)
                         + tl.sum(d2, axis=0), mask=cmask)
                p_w2 = gW2_ptr + (h0 + offs_c)[:, None] * H1 + offs_h[None, :]
                wm = cmask[:, None] & hmask[None, :]
                tl.store(p_w2, tl.load(p_w2, mask=wm, other=0.0)
                         + tl.dot(tl.trans(d2), a1, input_precision=DOT_PREC), mask=wm)
            da1 += tl.dot(d2, w2, input_precision=DOT_PREC)
    else:
        wo = tl.load(wout_ptr + offs_h, mask=hmask, other=0.0)
        da1 = g[:, None] * wo[None, :]
        if PARAM_GRADS:
            gw_inc = tl.sum(g[:, None] * a1, axis=0)
    d1 = da1 * activation_grad(z1, ACT)
    return tl.where(valid[:, None], d1, 0.0), gw_inc


@triton.jit
def reduce_samples(P_ptr, b1, perm_ptr, W2_ptr, b2_ptr, wout_ptr, bout, row_lse_ptr, r0,
                    r_step, R, N, ncol, offs, offs_h, hmask, B, H1, H2, M: tl.constexpr,
                    IDX: tl.constexpr, RED: tl.constexpr, NF: tl.constexpr,
                    GROUPED: tl.constexpr, TWO_LAYERS: tl.constexpr, BLOCK_H2: tl.constexpr,
                    BLOCK_N: tl.constexpr, ACT: tl.constexpr, DISTINCT: tl.constexpr = False):
    """Score rows r0, r0 + r_step, … < R (every column of each; with DISTINCT only the
    samples of pairwise distinct indices, :func:`grid_distinct`) and reduce in registers:
    returns per-lane (acc, run_m, run_s) — the sum (RED_SUM, RED_NEG_SOFTPLUS_NEG,
    RED_SOFTPLUS) or the online log-sum-exp state (RED_LSE).  RED_LSE_ROW stores LSE_r of
    every row and adds it to lane 0 of acc."""
    acc = tl.zeros([BLOCK_N], tl.float32)
    run_m = tl.zeros([BLOCK_N], tl.float32) + NEG_BIG
    run_s = tl.zeros([BLOCK_N], tl.float32)
    for r in range(r0, R, r_step):
        if RED == 4:
            run_m = tl.zeros([BLOCK_N], tl.float32) + NEG_BIG
            run_s = tl.zeros([BLOCK_N], tl.float32)
        for c0 in range(0, ncol, BLOCK_N):
            cols, valid = tile_columns(r, c0, offs, N, ncol, BLOCK_N, IDX)
            valid = grid_distinct(valid, r, cols, B, IDX, NF, 0, DISTINCT)
            _, _, t = tile_scores(P_ptr, b1, r, cols, valid, offs_h, hmask, perm_ptr, W2_ptr,
                                   b2_ptr, wout_ptr, bout, B, H1, H2, M, IDX, NF, 0, GROUPED,
                                   TWO_LAYERS, BLOCK_H2, ACT)
            if RED == 0:
                acc += tl.where(valid, t, 0.0)
            elif RED == 1:  # −softplus(−T) = min(T, 0) − log(1 + e^{−|T|})
                acc += tl.where(valid, tl.minimum(t, 0.0) - tl.log(1.0 + tl.exp(-tl.abs(t))),
                                0.0)
            elif RED == 2:  # softplus(T) = max(T, 0) + log(1 + e^{−|T|})
                acc += tl.where(valid, tl.maximum(t, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(t))),
                                0.0)
            else:
                t = tl.where(valid, t, float("-inf"))
                new_m = tl.maximum(run_m, t)
                run_s = run_s * tl.exp(run_m - new_m) + tl.exp(t - new_m)
                run_m = new_m
        if RED == 4:
            mx = tl.max(run_m, axis=0)
            row_lse = mx + tl.log(tl.sum(run_s * tl.exp(run_m - mx), axis=0))
            tl.store(row_lse_ptr + r, row_lse)
            acc += tl.where(offs == 0, row_lse, 0.0)
    return acc, run_m, run_s


class SamplePlan:
    """One term's samples as (rows × columns): index mode ``idx`` (``IDX_*``), batch size B,
    N samples, NCOL columns per row, NF factors of the "all" grid, ``grouped`` (InfoNCE's
    candidate modalities share one index), ``distinct`` (the grid without coinciding
    indices: N counts only the distinct samples, the layout stays the full grid's)."""

    def __init__(self, idx, B, n, ncol, nf=1, grouped=False, distinct=False):
        self.idx, self.B, self.N, self.NCOL, self.NF, self.grouped = idx, B, n, ncol, nf, grouped
        self.distinct = distinct

    @property
    def candidates(self) -> int:
        """InfoNCE candidates per anchor (the normaliser of its row log-mean-exp): the row's
        columns, without the anchor itself on a distinct grid."""
        return self.NCOL - 1 if self.distinct else self.NCOL

    def rows(self, block_n):
        """Rows of BLOCK_N-sample tiles (flat modes) or of the grid/anchor layouts."""
        return triton.cdiv(self.N, block_n) if self.idx <= IDX_PERMS else self.B


def marginal_plan(kind, B, m, perms, distinct=False):
    """The :class:`SamplePlan` of estimator ``kind``'s marginal term (``perms``: (K, m, B)
    indices, or ``None`` for the "all" grid — the "distinct" grid with ``distinct``:
    B(B−1)···(B−m+1) samples, InfoNCE B(B−1))."""
    if distinct and perms is not None:
        raise ValueError("a distinct grid has no perms")
    if kind == "infonce":
        if perms is None:
            n = B * (B - 1) if distinct else B * B
            return SamplePlan(IDX_GRID, B, n, B, nf=2, grouped=True, distinct=distinct)
        return SamplePlan(IDX_NCE, B, B * (perms.shape[0] + 1), perms.shape[0] + 1)
    if perms is None:
        n = math.perm(B, m) if distinct else B ** m
        return SamplePlan(IDX_GRID, B, n, B ** (m - 1), nf=m, distinct=distinct)
    return SamplePlan(IDX_PERMS, B, perms.shape[0] * B, 0)

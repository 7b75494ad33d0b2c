"""Fused critic scoring + estimator reductions (DV/MINE, NWJ, JS, InfoNCE, Wasserstein).

One op, in the Liger-Kernel layout: Triton kernels (with the math), then the
``torch.autograd.Function``, then the functional API :func:`fused_dependency_terms`.

Math
====
With the split first layer (:mod:`mdm_kernels.critic`) every sample s = (i_1, ..., i_m) has

    z1_s = Σ_j P_j[i_j] + b_1          P_j = z_j W_{1,j}^T  (B × H_1, one torch GEMM each)
    a1_s = σ(z1_s)
    (2 hidden layers)  z2_s = W_2 a1_s + b_2,  a2_s = σ(z2_s)
    T_s  = w_out · a_L,s + b_out

Each estimator term is a reduction of the scores (``reference/estimators.py`` has the table):

    mean_S f(T)             f = T (joint, Wasserstein), −softplus(−T) (JS joint), softplus(T)
    LSE_S T = log Σ_S e^T   DV: LSE − log N;   NWJ: exp(LSE − log N − 1)
    mean_i LSE_c T(i, c)    InfoNCE (row-wise log-sum-exp over the candidates of anchor i)

and its derivative with respect to each score is g_s = scale · φ(T_s):

    f = T: φ = 1;  JS joint: φ = sigmoid(−T);  JS marginal: φ = sigmoid(T)
    DV:   ∂(LSE − log N)/∂T_s = e^{T_s − LSE}                 (shift = LSE)
    NWJ:  ∂ exp(LSE − log N − 1)/∂T_s = e^{T_s − 1 − log N}   (shift = 1 + log N)
    InfoNCE: ∂/∂T_{i,c} = e^{T_{i,c} − LSE_i} / B              (shift = saved LSE_i)

Backpropagating g through the MLP (recomputed tile by tile, never stored):

    ∂b_out = Σ g_s,   ∂w_out = Σ g_s a_L,s
    (2 layers)  δ2_s = g_s w_out ⊙ σ'(z2_s);  ∂W_2 = Σ δ2_s a1_sᵀ;  ∂b_2 = Σ δ2_s;
                da1_s = W_2ᵀ δ2_s        (1 layer: da1_s = g_s w_out)
    δ1_s = da1_s ⊙ σ'(z1_s);   ∂b_1 = Σ δ1_s;   ∂P_j[r] = Σ_{s : i_j = r} δ1_s

and autograd turns ∂P_j into ∂z_j and ∂W_{1,j} through the projection GEMM.

Tiling
======
Samples are addressed as (row r, column c).  A *persistent* program p loops over rows
r = p, p + G, ... and, inside a row, over column tiles of ``BLOCK_N`` samples; a tile is the
(BLOCK_N × H_1) first pre-activation, built by gathering P rows by index.  Index modes
(constexpr ``IDX``):

* ``JOINT``   flat sample n = r·BLOCK_N + c, i_j = n (the diagonal).
* ``PERMS``   flat n = k·B + i, i_j = perms[k, j, i] read from memory.
* ``GRID``    ``"all"``: r is the index of the *owner* factor, c enumerates the other factors
  in row-major order (decoded from c, never materialised).  For InfoNCE the factors are
  (anchor, candidate) with the candidate modalities 2..m sharing one index (``GROUPED``).
* ``NCE``     InfoNCE with shuffles: r = anchor i, c ∈ [0, K] picks the candidate
  (c = 0: i itself, c ≥ 1: perms[c − 1, 1, i]).

Reductions (constexpr ``RED``) stay in registers: plain sums, or an online log-sum-exp —
per lane a running max m and a rescaled sum s (s ← s·e^{m − m'} + e^{T − m'}, flash-attention
style), folded to one (max, sum) pair per program (``LSE``) or per row (``LSE_ROW``, InfoNCE,
where a row is always owned by a single program).  A tiny torch combine merges the per-program
partials.  Scores are never written to global memory; memory is O(G·H + B·m·H) whatever N.

Backward and determinism
========================
The backward kernel recomputes each tile from the saved P, the parameters and the saved LSE
statistics.  Where rows are shared:

* ``GRID`` (``"all"``): one launch per factor f with f as the owner; a program owns its rows of
  P_f, accumulates their gradient in registers over all columns and stores it once.  No atomics:
  deterministic (m launches, i.e. m× the forward work — the price of not using atomics).
* ``PERMS`` / ``NCE`` candidates / ``JOINT``: δ1 rows are scattered with ``tl.atomic_add``.  The
  joint pass touches each row once (deterministic); with K shuffles a row receives K adds whose
  order varies between runs, so the last bits of ∂z / ∂W_1 may vary on GPU.
* Parameter gradients (b_1, W_2, b_2, w_out, b_out) accumulate into per-program private slices
  (load-add-store, no atomics) that torch sums afterwards: deterministic.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..reference.estimators import KINDS
from .common import DOT_PREC, activation, activation_code, activation_grad, block_size, \
    critic_tail, interpreter_enabled, project_modalities, tile_configs

# ----------------------------------------------------------------------------- constants
IDX_JOINT, IDX_PERMS, IDX_GRID, IDX_NCE = 0, 1, 2, 3
RED_SUM, RED_NEG_SOFTPLUS_NEG, RED_SOFTPLUS, RED_LSE, RED_LSE_ROW = 0, 1, 2, 3, 4
G_ONE, G_EXP_SHIFT, G_EXP_ROW, G_SIGMOID, G_SIGMOID_NEG = 0, 1, 2, 3, 4

_NEG_BIG_VALUE = -1.0e30  # "minus infinity" that keeps e^{m − m'} finite (no inf − inf)
_NEG_BIG = tl.constexpr(_NEG_BIG_VALUE)


# ptxas for sm_90 at H_1 = 128 (python/compile_sm90.py's method): one hidden layer spills
# nothing at (16, 4 warps), (16, 8) and (32, 8) but 0.5-3.4 kB per thread at (32, 4) and
# (64, 4/8) — the gathered rows' 64-bit address tiles are what fills the registers; two
# hidden layers spill least at (16, 8): 0 forward, ~0.5 kB backward.
_GPU_CONFIGS = [
    triton.Config({"BLOCK_N": 16}, num_warps=4),
    triton.Config({"BLOCK_N": 16}, num_warps=8),
    triton.Config({"BLOCK_N": 32}, num_warps=8),
]
#: the one config of the interpreter / ``MDM_TRITON_AUTOTUNE=0``
_FIXED_CONFIG = (triton.Config({"BLOCK_N": 16}, num_warps=1) if interpreter_enabled()
                 else triton.Config({"BLOCK_N": 16}, num_warps=8))
_MIN_BLOCK_N = 16  # smallest BLOCK_N of any config: sizes the per-program buffers


def _prune_configs(configs, named_args, **kwargs):
    """Keep tiles whose (BLOCK_N × BLOCK_H1) register footprint stays reasonable (see the
    ptxas figures above): ≤ 4096 elements with one hidden layer, ≤ 2048 at 8 warps with two
    (wider hidden layers keep the smallest tile)."""
    h1 = kwargs.get("BLOCK_H1", named_args.get("BLOCK_H1", 128))
    two = kwargs.get("TWO_LAYERS", named_args.get("TWO_LAYERS", False))
    if two:
        kept = [c for c in configs if c.kwargs["BLOCK_N"] * h1 <= 2048 and c.num_warps == 8]
    else:
        kept = [c for c in configs if c.kwargs["BLOCK_N"] * h1 <= 4096]
    return kept or [min(configs, key=lambda c: (c.kwargs["BLOCK_N"], -c.num_warps))]


_PRUNE = {"early_config_prune": _prune_configs}


def _max_programs(device) -> int:
    """Cap on the persistent grid."""
    if interpreter_enabled() or device.type != "cuda":
        return 4
    return 4 * torch.cuda.get_device_properties(device).multi_processor_count


# ----------------------------------------------------------------------------- kernels
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
def _prologue(b1_ptr, bout_ptr, H1, BLOCK_H1: tl.constexpr, BLOCK_N: tl.constexpr):
    """(program id, number of programs, tile lane offsets, hidden offsets and mask, b_1,
    b_out) — what every persistent program of this module starts from."""
    offs_h = tl.arange(0, BLOCK_H1)
    hmask = offs_h < H1
    return (tl.program_id(0), tl.num_programs(0), tl.arange(0, BLOCK_N), offs_h, hmask,
            tl.load(b1_ptr + offs_h, mask=hmask, other=0.0), tl.load(bout_ptr))


@triton.jit
def _row_layout(N, NCOL, B, IDX: tl.constexpr, BLOCK_N: tl.constexpr):
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
def _tile_columns(r, c0, offs, N, ncol, BLOCK_N: tl.constexpr, IDX: tl.constexpr):
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
def _scatter_shared_rows(dP_ptr, d1, r, cols, valid, offs_h, hmask, perm_ptr, B, H1,
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
def _store_owned_row(dP_ptr, own, r, offs_h, hmask, B, H1, M: tl.constexpr,
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
    (tl.dot at :data:`~mdm_kernels.ops.common.DOT_PRECISION`), with the chunk's W_2 rows, output weights and mask."""
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
def _tile_scores(P_ptr, b1, r, cols, valid, offs_h, hmask, perm_ptr, W2_ptr, b2_ptr, wout_ptr,
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
def _score_grad(t, valid, scale, shift, GMODE: tl.constexpr):
    """g = ∂term/∂T_s = scale·φ(T_s) of a tile (0 on invalid lanes), see the module
    docstring: φ = 1 (G_ONE), e^{T − shift} (G_EXP_SHIFT; G_EXP_ROW with a per-row shift),
    sigmoid(±T) (G_SIGMOID / G_SIGMOID_NEG, from e^{−|T|}: no overflow for |T| ~ 1e4).
    Invalid lanes enter the exponentials as −inf, so nothing overflows there either."""
    if GMODE == 0:
        g = tl.zeros_like(t) + scale
    elif GMODE <= 2:
        g = scale * tl.exp(tl.where(valid, t, float("-inf")) - shift)
    else:
        e = tl.exp(-tl.abs(t))
        if GMODE == 3:
            g = scale * tl.where(t >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
        else:
            g = scale * tl.where(t >= 0, e / (1.0 + e), 1.0 / (1.0 + e))
    return tl.where(valid, g, 0.0)


@triton.jit
def _term_grad(t, valid, r, cols, scale, shift, row_lse_ptr, perm_ptr, B, M: tl.constexpr,
               IDX: tl.constexpr, NF: tl.constexpr, OWNER: tl.constexpr,
               GROUPED: tl.constexpr, GMODE: tl.constexpr):
    """:func:`_score_grad` with InfoNCE's per-row shift LSE_i of each sample's anchor
    (G_EXP_ROW): row r's for the shuffle layout (IDX 3), gathered by anchor (factor 0) on
    the "all" grid."""
    if GMODE == 2:
        if IDX == 3:
            row_shift = tl.load(row_lse_ptr + r)
        else:
            anc = _sample_rows(0, r, cols, valid, perm_ptr, B, M, IDX, NF, OWNER, GROUPED)
            row_shift = tl.load(row_lse_ptr + anc)
        g = _score_grad(t, valid, scale, row_shift, GMODE)
    else:
        g = _score_grad(t, valid, scale, shift, GMODE)
    return g


@triton.jit
def _tile_backprop(g, z1, a1, valid, W2_ptr, b2_ptr, wout_ptr, offs_h, hmask, offs_c, H1, H2,
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
def _reduce_samples(P_ptr, b1, perm_ptr, W2_ptr, b2_ptr, wout_ptr, bout, row_lse_ptr, r0,
                    r_step, R, N, ncol, offs, offs_h, hmask, B, H1, H2, M: tl.constexpr,
                    IDX: tl.constexpr, RED: tl.constexpr, NF: tl.constexpr,
                    GROUPED: tl.constexpr, TWO_LAYERS: tl.constexpr, BLOCK_H2: tl.constexpr,
                    BLOCK_N: tl.constexpr, ACT: tl.constexpr):
    """Score rows r0, r0 + r_step, … < R (every column of each) and reduce in registers:
    returns per-lane (acc, run_m, run_s) — the sum (RED_SUM, RED_NEG_SOFTPLUS_NEG,
    RED_SOFTPLUS) or the online log-sum-exp state (RED_LSE).  RED_LSE_ROW stores LSE_r of
    every row and adds it to lane 0 of acc."""
    acc = tl.zeros([BLOCK_N], tl.float32)
    run_m = tl.zeros([BLOCK_N], tl.float32) + _NEG_BIG
    run_s = tl.zeros([BLOCK_N], tl.float32)
    for r in range(r0, R, r_step):
        if RED == 4:
            run_m = tl.zeros([BLOCK_N], tl.float32) + _NEG_BIG
            run_s = tl.zeros([BLOCK_N], tl.float32)
        for c0 in range(0, ncol, BLOCK_N):
            cols, valid = _tile_columns(r, c0, offs, N, ncol, BLOCK_N, IDX)
            _, _, t = _tile_scores(P_ptr, b1, r, cols, valid, offs_h, hmask, perm_ptr, W2_ptr,
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


@triton.autotune(configs=tile_configs(_GPU_CONFIGS, _FIXED_CONFIG),
                 key=["N", "NCOL", "H1", "H2", "B"], prune_configs_by=_PRUNE,
                 restore_value=["stats_ptr"])  # unused program slots must keep their init
@triton.jit
def _bounds_fwd_kernel(
    P_ptr, perm_ptr, b1_ptr, W2_ptr, b2_ptr, wout_ptr, bout_ptr,
    stats_ptr, row_lse_ptr,
    B, N, NCOL, H1, H2,
    M: tl.constexpr, IDX: tl.constexpr, RED: tl.constexpr, NF: tl.constexpr,
    GROUPED: tl.constexpr, TWO_LAYERS: tl.constexpr, ACT: tl.constexpr,
    BLOCK_H1: tl.constexpr, BLOCK_H2: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Forward: per-program partial (sum) or (max, Σ e^{T − max}) in stats[pid, 0:2];
    RED_LSE_ROW writes LSE_r of every row it owns to row_lse[r]."""
    pid, G, offs, offs_h, hmask, b1, bout = _prologue(b1_ptr, bout_ptr, H1, BLOCK_H1, BLOCK_N)
    R, ncol = _row_layout(N, NCOL, B, IDX, BLOCK_N)
    acc, run_m, run_s = _reduce_samples(P_ptr, b1, perm_ptr, W2_ptr, b2_ptr, wout_ptr, bout,
                                        row_lse_ptr, pid, G, R, N, ncol, offs, offs_h, hmask,
                                        B, H1, H2, M, IDX, RED, NF, GROUPED, TWO_LAYERS,
                                        BLOCK_H2, BLOCK_N, ACT)
    if RED == 3:
        mx = tl.max(run_m, axis=0)
        tl.store(stats_ptr + pid * 2, mx)
        tl.store(stats_ptr + pid * 2 + 1, tl.sum(run_s * tl.exp(run_m - mx), axis=0))
    elif RED != 4:
        tl.store(stats_ptr + pid * 2, tl.sum(acc, axis=0))


@triton.autotune(configs=tile_configs(_GPU_CONFIGS, _FIXED_CONFIG),
                 key=["N", "NCOL", "H1", "H2", "B"], prune_configs_by=_PRUNE,
                 reset_to_zero=["dP_ptr", "gb1_ptr", "gW2_ptr", "gb2_ptr", "gwout_ptr",
                                "gbout_ptr"])
@triton.jit
def _bounds_bwd_kernel(
    P_ptr, perm_ptr, b1_ptr, W2_ptr, b2_ptr, wout_ptr, bout_ptr,
    scale_ptr, shift_ptr, row_lse_ptr,
    dP_ptr, gb1_ptr, gW2_ptr, gb2_ptr, gwout_ptr, gbout_ptr,
    B, N, NCOL, H1, H2,
    M: tl.constexpr, IDX: tl.constexpr, GMODE: tl.constexpr, NF: tl.constexpr,
    OWNER: tl.constexpr, GROUPED: tl.constexpr, PARAM_GRADS: tl.constexpr,
    TWO_LAYERS: tl.constexpr, ACT: tl.constexpr,
    BLOCK_H1: tl.constexpr, BLOCK_H2: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Backward: recompute each tile, g = scale·φ(T), backprop through the MLP.
    dP rows: owner rows (GRID: factor OWNER, NCE: the anchor) accumulate in registers and
    are stored once; the others are scattered with atomics.  Parameter gradients go to this
    program's private slice of the g*_ptr buffers (only when PARAM_GRADS)."""
    pid, G, offs, offs_h, hmask, b1, bout = _prologue(b1_ptr, bout_ptr, H1, BLOCK_H1, BLOCK_N)
    scale = tl.load(scale_ptr)
    shift = tl.load(shift_ptr)
    offs_c = tl.arange(0, BLOCK_H2)
    R, ncol = _row_layout(N, NCOL, B, IDX, BLOCK_N)
    if IDX == 2:
        owner = OWNER
    else:
        owner = 0  # NCE: the anchor factor; JOINT/PERMS: unused
    gb1 = tl.zeros([BLOCK_H1], tl.float32)
    gwout = tl.zeros([BLOCK_H1], tl.float32)   # 1 hidden layer only
    gbout = tl.zeros([BLOCK_N], tl.float32)
    for r in range(pid, R, G):
        own = tl.zeros([BLOCK_H1], tl.float32)  # gradient of the owner row
        for c0 in range(0, ncol, BLOCK_N):
            cols, valid = _tile_columns(r, c0, offs, N, ncol, BLOCK_N, IDX)
            z1, a1, t = _tile_scores(P_ptr, b1, r, cols, valid, offs_h, hmask, perm_ptr,
                                     W2_ptr, b2_ptr, wout_ptr, bout, B, H1, H2, M, IDX, NF,
                                     owner, GROUPED, TWO_LAYERS, BLOCK_H2, ACT)
            g = _term_grad(t, valid, r, cols, scale, shift, row_lse_ptr, perm_ptr, B, M, IDX,
                           NF, owner, GROUPED, GMODE)
            if PARAM_GRADS:
                gbout += g
            d1, gw_inc = _tile_backprop(g, z1, a1, valid, W2_ptr, b2_ptr, wout_ptr, offs_h,
                                        hmask, offs_c, H1, H2, gW2_ptr + pid * H2 * H1,
                                        gb2_ptr + pid * H2, gwout_ptr + pid * H2,
                                        TWO_LAYERS, PARAM_GRADS, BLOCK_H2, ACT)
            if PARAM_GRADS:
                gwout += gw_inc
                gb1 += tl.sum(d1, axis=0)
            _scatter_shared_rows(dP_ptr, d1, r, cols, valid, offs_h, hmask, perm_ptr, B, H1,
                                 M, IDX, NF, owner, GROUPED)
            own += tl.sum(d1, axis=0)
        _store_owned_row(dP_ptr, own, r, offs_h, hmask, B, H1, M, IDX, owner, GROUPED)
    if PARAM_GRADS:
        tl.store(gb1_ptr + pid * H1 + offs_h, gb1, mask=hmask)
        tl.store(gbout_ptr + pid, tl.sum(gbout, axis=0))
        if not TWO_LAYERS:
            tl.store(gwout_ptr + pid * H1 + offs_h, gwout, mask=hmask)


# ----------------------------------------------------------------------------- launches
class _Plan:
    """Static description of one launch family: index mode, sizes, grid."""

    def __init__(self, idx, B, n, ncol, nf=1, grouped=False):
        self.idx, self.B, self.N, self.NCOL, self.NF, self.grouped = idx, B, n, ncol, nf, grouped

    def rows(self, block_n):
        return triton.cdiv(self.N, block_n) if self.idx <= IDX_PERMS else self.B

    def max_programs(self, device):
        return max(1, min(_max_programs(device), self.rows(_MIN_BLOCK_N)))

    def grid(self, device):
        cap = self.max_programs(device)
        return lambda meta: (max(1, min(cap, self.rows(meta["BLOCK_N"]))),)


def _marginal_plan(kind, B, m, perms):
    if kind == "infonce":
        if perms is None:
            return _Plan(IDX_GRID, B, B * B, B, nf=2, grouped=True)
        return _Plan(IDX_NCE, B, B * (perms.shape[0] + 1), perms.shape[0] + 1)
    if perms is None:
        return _Plan(IDX_GRID, B, B ** m, B ** (m - 1), nf=m)
    return _Plan(IDX_PERMS, B, perms.shape[0] * B, 0)


def _common_meta(P, W2, two_layers, act):
    H1 = P.shape[2]
    H2 = W2.shape[0] if two_layers else 1
    return dict(M=P.shape[0], TWO_LAYERS=two_layers, ACT=act, BLOCK_H1=block_size(H1),
                BLOCK_H2=min(32, block_size(H2)) if two_layers else 16), H1, H2


def _launch_fwd(plan, red, P, perms, b1, W2, b2, wout, bout, act):
    device = P.device
    meta, H1, H2 = _common_meta(P, W2, W2 is not None, act)
    G = plan.max_programs(device)
    stats = torch.zeros(G, 2, device=device, dtype=torch.float32)
    if red == RED_LSE:
        stats[:, 0] = _NEG_BIG_VALUE
    row_lse = torch.empty(plan.B if red == RED_LSE_ROW else 1, device=device,
                          dtype=torch.float32)
    dummy = b1
    _bounds_fwd_kernel[plan.grid(device)](
        P, perms if perms is not None else b1, b1,
        W2 if W2 is not None else dummy, b2 if b2 is not None else dummy, wout, bout,
        stats, row_lse, plan.B, plan.N, plan.NCOL, H1, H2,
        IDX=plan.idx, RED=red, NF=plan.NF, GROUPED=plan.grouped, **meta)
    return stats, row_lse


def _combine_lse(stats):
    mx = stats[:, 0].max()
    return mx + torch.log((stats[:, 1] * torch.exp(stats[:, 0] - mx)).sum())


#: Reduction of the marginal scores (RED_*) and φ of their gradient (G_*), per estimator —
#: shared by every kernel family.
MARGINAL_RED = {"dv": RED_LSE, "nwj": RED_LSE, "js": RED_SOFTPLUS, "infonce": RED_LSE_ROW,
                "wasserstein": RED_SUM}
MARGINAL_GMODE = {"dv": G_EXP_SHIFT, "nwj": G_EXP_SHIFT, "js": G_SIGMOID,
                  "infonce": G_EXP_ROW, "wasserstein": G_ONE}


def marginal_value(kind, stats, row_lse, num_samples, num_candidates):
    """(marginal term, statistic its backward needs) from a forward launch's partials: the
    per-program (max, Σ e^{T − max}) pairs (DV, NWJ: the statistic is the LSE), the row
    LSEs (InfoNCE: the statistic), or per-program sums (JS, Wasserstein: none)."""
    red = MARGINAL_RED[kind]
    if red == RED_LSE:
        lse = _combine_lse(stats)
        lme = lse - math.log(num_samples)
        return (lme if kind == "dv" else torch.exp(lme - 1.0)), lse
    if red == RED_LSE_ROW:
        return row_lse.mean() - math.log(num_candidates), row_lse
    return stats[:, 0].sum() / num_samples, None


def marginal_grad_args(kind, g_marg, stat, num_samples, batch_size):
    """(GMODE, scale, shift, row_lse) of g = ∂(g_marg · marginal term)/∂T_s, as 1-element
    float32 device tensors (no host sync): e^{T − LSE}, e^{T − 1 − log N}, e^{T − LSE_i}/B,
    sigmoid(T)/N or 1/N, times g_marg (module docstring)."""
    g = g_marg.float().reshape(1)
    zero = torch.zeros(1, device=g.device, dtype=torch.float32)
    if kind == "dv":
        return G_EXP_SHIFT, g, stat.reshape(1), zero
    if kind == "nwj":
        return G_EXP_SHIFT, g, zero + (1.0 + math.log(num_samples)), zero
    if kind == "infonce":
        return G_EXP_ROW, g / batch_size, zero, stat
    return MARGINAL_GMODE[kind], g / num_samples, zero, zero


def _launch_bwd(plan, gmode, scale, shift, row_lse, P, perms, b1, W2, b2, wout, bout, act,
                owner=0, param_grads=True):
    device = P.device
    two = W2 is not None
    meta, H1, H2 = _common_meta(P, W2, two, act)
    G = plan.max_programs(device)
    f32 = dict(device=device, dtype=torch.float32)
    dP = torch.zeros_like(P)
    gb1 = torch.zeros(G, H1, **f32)
    gwout = torch.zeros(G, H2 if two else H1, **f32)
    gbout = torch.zeros(G, **f32)
    gW2 = torch.zeros(G, H2, H1, **f32) if two else torch.zeros(1, **f32)
    gb2 = torch.zeros(G, H2, **f32) if two else torch.zeros(1, **f32)
    _bounds_bwd_kernel[plan.grid(device)](
        P, perms if perms is not None else b1, b1,
        W2 if two else b1, b2 if two else b1, wout, bout,
        scale, shift, row_lse,
        dP, gb1, gW2, gb2, gwout, gbout,
        plan.B, plan.N, plan.NCOL, H1, H2,
        IDX=plan.idx, GMODE=gmode, NF=plan.NF, OWNER=owner, GROUPED=plan.grouped,
        PARAM_GRADS=param_grads, **meta)
    if not param_grads:
        return dP, None
    grads = [gb1.sum(0), gwout.sum(0), gbout.sum(0).reshape(1)]
    grads += [gW2.sum(0), gb2.sum(0)] if two else [None, None]
    return dP, grads


def _run_bwd(plan, gmode, scale, shift, row_lse, args, act):
    """All launches of one term; GRID runs one deterministic launch per owner factor."""
    if plan.idx != IDX_GRID:
        return _launch_bwd(plan, gmode, scale, shift, row_lse, *args, act)
    dP, grads = _launch_bwd(plan, gmode, scale, shift, row_lse, *args, act, owner=0)
    for f in range(1, plan.NF):
        dPf, _ = _launch_bwd(plan, gmode, scale, shift, row_lse, *args, act, owner=f,
                             param_grads=False)
        dP = dP + dPf
    return dP, grads


# ----------------------------------------------------------------------------- autograd
class FusedDependencyTerms(torch.autograd.Function):
    """(joint_term, marginal_term) from the stacked projections P (m × B × H_1, float32),
    the first bias and the tail parameters; gradients for all of them."""

    @staticmethod
    def forward(ctx, kind, perms, act, P, b1, wout, bout, W2, b2):
        B, m = P.shape[1], P.shape[0]
        args = (P, perms, b1, W2, b2, wout, bout)
        # joint term: the B diagonal samples
        jplan = _Plan(IDX_JOINT, B, B, 0)
        jstats, _ = _launch_fwd(jplan, RED_NEG_SOFTPLUS_NEG if kind == "js" else RED_SUM,
                                *args, act)
        joint = jstats[:, 0].sum() / B
        plan = _marginal_plan(kind, B, m, perms)
        stats, row_lse = _launch_fwd(plan, MARGINAL_RED[kind], *args, act)
        marginal, stat = marginal_value(kind, stats, row_lse, plan.N, plan.NCOL)
        ctx.kind, ctx.act, ctx.plan, ctx.jplan = kind, act, plan, jplan
        ctx.save_for_backward(P, perms, b1, wout, bout, W2, b2, stat)
        return joint, marginal

    @staticmethod
    def backward(ctx, g_joint, g_marg):
        P, perms, b1, wout, bout, W2, b2, stat = ctx.saved_tensors
        kind, act, plan, jplan = ctx.kind, ctx.act, ctx.plan, ctx.jplan
        args = (P, perms, b1, W2, b2, wout, bout)
        B = P.shape[1]
        zero = torch.zeros(1, device=P.device, dtype=torch.float32)
        g_joint = g_joint.float().reshape(1)
        dP, grads = _run_bwd(jplan, G_SIGMOID_NEG if kind == "js" else G_ONE, g_joint / B,
                             zero, zero, args, act)
        gmode, scale, shift, row_lse = marginal_grad_args(kind, g_marg, stat, plan.N, B)
        dPm, gradsm = _run_bwd(plan, gmode, scale, shift, row_lse, args, act)
        dP = dP + dPm
        out = [a + b if a is not None else None for a, b in zip(grads, gradsm)]
        gb1, gwout, gbout, gW2, gb2 = out
        return None, None, None, dP, gb1, gwout, gbout, gW2, gb2


# ----------------------------------------------------------------------------- functional
def _resolve_perms(samples, batch_size, device):
    """``samples``: a MarginalSamples, a (K, m, B) index tensor, or None/"all"."""
    if samples is None or (isinstance(samples, str) and samples == "all"):
        return None
    perms = getattr(samples, "perms", samples) if not isinstance(samples, torch.Tensor) \
        else samples
    if perms is None:
        return None
    if not isinstance(perms, torch.Tensor) or perms.dim() != 3 or perms.shape[2] != batch_size:
        raise ValueError("samples must be MarginalSamples, a (K, m, B) LongTensor or 'all'")
    return perms.to(device=device, dtype=torch.int64).contiguous()


#: ``strategy`` values of :func:`fused_dependency_terms`.
STRATEGIES = ("auto", "single", "grid")


def single_program_reason(critic, zs) -> str | None:
    """Why the one-program step (:mod:`~mdm_kernels.ops.single_program_bounds`) cannot run
    these inputs, or ``None``."""
    from .single_program_bounds import MAX_HIDDEN, MAX_MODALITIES
    if len(zs) > MAX_MODALITIES:
        return f"it takes at most {MAX_MODALITIES} modalities, got {len(zs)}"
    if max(critic.hidden) > MAX_HIDDEN:
        return (f"it holds a whole hidden layer per tile: at most {MAX_HIDDEN} units, "
                f"the critic has {max(critic.hidden)}")
    if any(p.dtype != torch.float32 for p in critic.parameters()):
        return "it takes a float32 critic"
    return None


def _route(kind, critic, zs, perms, strategy, projections):
    """(kernel family, marginal plan) for resolved ``perms``: see :func:`execution_path`."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    B, m = zs[0].shape[0], len(zs)
    plan = _marginal_plan(kind, B, m, perms)
    if strategy == "single" and projections is not None:
        raise ValueError("strategy='single' computes its own projections: "
                         "do not pass projections=")
    if strategy != "grid" and projections is None:
        reason = single_program_reason(critic, zs)
        if strategy == "single":
            if reason is not None:
                raise ValueError(f"strategy='single' cannot run this step: {reason}")
            return "single", plan
        if reason is None:
            from .single_program_bounds import SINGLE_PROGRAM_MAX_WORK, single_program_work
            work = single_program_work(B, [z.shape[1] for z in zs], critic.hidden, plan.N,
                                       plan.NF if plan.idx == IDX_GRID else 1)
            if work <= SINGLE_PROGRAM_MAX_WORK:
                return "single", plan
    # the outer-sum kernels: "all" over two or three factors, one hidden layer
    outer = plan.idx == IDX_GRID and plan.NF in (2, 3) and len(critic.hidden) == 1
    return ("outer" if outer else "grid"), plan


def execution_path(kind, critic, zs, samples, strategy="auto", projections=None) -> str:
    """The kernel family :func:`fused_dependency_terms` runs for these inputs: ``"single"``
    (:mod:`~mdm_kernels.ops.single_program_bounds`), ``"outer"``
    (:mod:`~mdm_kernels.ops.outer_grid_bounds`, ``"all"`` with m ≤ 3) or ``"grid"`` (this
    module's kernels).  Raises ``ValueError`` when ``strategy="single"`` cannot run them."""
    perms = _resolve_perms(samples, zs[0].shape[0], zs[0].device)
    return _route(kind, critic, zs, perms, strategy, projections)[0]


@torch.compiler.disable
def fused_dependency_terms(kind, critic, zs, samples, projections=None, strategy="auto"):
    """(joint_term, marginal_term) of estimator ``kind`` with the fused Triton kernels.

    Args:
        kind: ``dv``, ``nwj``, ``js``, ``infonce`` or ``wasserstein``.
        critic: ``MLPCritic`` with 1 or 2 hidden layers.
        zs: z_1, ..., z_m (B × d_k each, float32/float16/bfloat16).
        samples: :class:`~mdm_kernels.negatives.MarginalSamples`, an explicit (K, m, B) index
            tensor, or ``None``/``"all"`` for every combination (never materialised).
        projections: optional precomputed P_k = z_k W_{1,k}^T (from
            :func:`~mdm_kernels.ops.common.project_modalities`), to share them with other ops.
        strategy: ``"single"`` — the whole step (projections, both terms and their
            gradients) in one program, backward one launch
            (:mod:`~mdm_kernels.ops.single_program_bounds`); ``"grid"`` — the persistent
            multi-program kernels, for large steps: this module's gathered tiles, or the
            outer-sum tiles of :mod:`~mdm_kernels.ops.outer_grid_bounds` for ``"all"`` with
            m ≤ 3 and one hidden layer (:func:`execution_path` says which); ``"auto"``
            (default) —
            ``"single"`` when it applies (no ``projections``, m ≤ 4, float32 critic) and the
            step is small enough for one SM, else ``"grid"``.

    Returns: two 0-dim float32 tensors, differentiable w.r.t. every z and critic parameter.
    Dynamo graph-breaks around this call (``torch.compiler.disable``); autograd still flows.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if len(critic.hidden) > 2:
        raise ValueError("fused kernels support 1 or 2 hidden layers")
    perms = _resolve_perms(samples, zs[0].shape[0], zs[0].device)
    path, plan = _route(kind, critic, zs, perms, strategy, projections)
    if path == "single":
        from .single_program_bounds import single_program_dependency_terms
        return single_program_dependency_terms(kind, critic, zs, perms)
    if projections is None:
        projections = project_modalities(critic, zs)
    P = torch.stack([p.float() for p in projections]).contiguous()
    ws, bs, wout, bout = critic_tail(critic)
    W2 = ws[0] if ws else None
    b2 = bs[0] if bs else None
    b1 = critic.first_bias.float().contiguous()
    if path == "outer":
        from .outer_grid_bounds import outer_grid_terms
        return outer_grid_terms(kind, critic, P, b1, wout, bout, activation_code(critic),
                                plan.NF)
    return FusedDependencyTerms.apply(kind, perms, activation_code(critic), P, b1, wout, bout,
                                      W2, b2)

"""Whole estimator step in one program: projections, scores, reductions and every gradient.

At paper scale (B = 32 … 256, a few shuffles, H = 64 … 256) the arithmetic of a dependency
penalty is microseconds; what costs is the number of launches and the host work around
each (the multi-program path of :mod:`mdm_kernels.ops.gathered_tiles` needs a projection GEMM
per modality, two launches per term and about forty small torch ops for its buffers and
reductions).  This op runs the *whole* forward **and** the gradients of both terms in a
single Triton program (grid = 1): a loss that is the last node can compute its gradient
inside the forward pass (as Liger-Kernel's losses do), so the backward is one small launch
that scales the stored gradients by the incoming ones.  One step = 2 launches.

Math (the notation of :mod:`mdm_kernels.ops.sample_tiles`)
==========================================================

Phase A, projections:  P_j = z_j W_{1,j}^T (B × H_1, ``tl.dot`` in 3×TF32 ≈ fp32, kept in an
L2-resident scratch), for every modality j.

Phase B, joint term:  J = mean_i f_J(T_ii), with g_i = ∂J/∂T_ii = φ_J(T_ii)/B (φ_J = 1, or
sigmoid(−T) for JS).  The joint samples are the diagonal, so δ1_i is stored to ∂P^J[i] once:
the same δ1 row is ∂J/∂P_j[i] for every modality j.

Phase C, marginal term:  the sums, the online log-sum-exp (DV, NWJ) or the per-row
log-sum-exp (InfoNCE) of :mod:`~mdm_kernels.ops.marginal_terms` over the marginal samples.

Phase D, marginal gradients:  the marginal tiles are recomputed with g_s = ∂M/∂T_s now that
the statistics are known (e^{T − LSE}, e^{T − 1 − log N}, e^{T − LSE_i}/B, sigmoid(T)/N or
1/N), backpropagated through the MLP, and δ1 is scattered to ∂P^M_j (atomics for shuffled
rows; the "all" grid makes one pass per factor and stores each owned row once, so it stays
deterministic).

Both terms' gradients of b_1, W_2, b_2, w_out, b_out are stored separately (``pg[0]``: joint,
``pg[1]``: marginal), as are ∂P^J and ∂P^M: the backward needs the two terms apart because
its incoming gradients (g_J, g_M) are arbitrary (MINE's moving-average surrogate, weighted
sums...).  Backward (:func:`_single_program_bwd_kernel`, many programs, one launch):

    ∂P_j   = g_J ∂P^J + g_M ∂P^M_j
    ∂z_j   = ∂P_j W_{1,j}          ∂W_{1,j} = ∂P_jᵀ z_j
    ∂θ     = g_J pg[0] + g_M pg[1]     for θ = (b_1, w_out, b_out, W_2, b_2)

The projections P are also an output of the op, differentiable: the gradient penalty of
``wasserstein_loss`` builds on them, and their incoming gradient joins ∂P_j in the backward.

Memory: P, ∂P^J, ∂P^M (2m + 1)·B·H_1 floats, B LSE values, 2 × (parameter count after the
first layer) — O(B·H), whatever the number of samples.

When it is used: :func:`~mdm_kernels.ops.router.fused_dependency_terms` picks this
path when the step is small enough for one streaming multiprocessor
(:func:`single_program_work` ≤ :data:`SINGLE_PROGRAM_MAX_WORK`, a cost model, m ≤ 4 modalities, hidden
layers ≤ 512 wide) and falls
back to the multi-program kernels otherwise.
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from .marginal_terms import G_ONE, G_SIGMOID_NEG, MARGINAL_GMODE, MARGINAL_RED
from .sample_tiles import (marginal_plan, reduce_samples, row_layout,
                           scatter_shared_rows, store_owned_row, term_grad, tile_backprop,
                           tile_columns, tile_score_grads, tile_scores)
from .runtime_flags import fresh_empty, uses_gpu_launches
from .triton_helpers import DOT_PREC, block_size, launch_device

#: Most modalities the single-program kernels take (one pointer argument each).
MAX_MODALITIES = 4
#: Widest hidden layer: a (16 × H) tile per live tensor at 8 warps; wider critics take the
#: multi-program path (whose autotuner prunes tiles that would not fit).
MAX_HIDDEN = 512

#: Cost model of the one-program / multi-program switch, for an H100/H200 (SXM):
#:
#:   T_one(W)   = L_one·t_launch + W / (F·f)           one SM does all W multiply-adds
#:   T_multi(W) = L_multi·t_launch + W / (n_SM·F·f)    W spread evenly over every SM
#:
#: F = 128 FP32 FMA per clock per SM (4 sub-partitions × 32 FP32 lanes: NVIDIA's H100
#: whitepaper and Hopper tuning guide; issue 14), f = 1.98 GHz (the H100 SXM / H200 boost
#: clock), n_SM = 132.  L_one = 9 and L_multi = 58 dispatched ops per step: the launches
#: and torch ops of a MINE "shuffle" step on each path, counted with a TorchDispatchMode
#: (docs/triton_backend.md: 2 Triton + 7 torch ops against 4 Triton + 54).  t_launch = 5 µs
#: per dispatched op: PyTorch eager dispatch plus a CUDA kernel launch typically costs
#: 3-10 µs of host time per small op, which bounds a step that is host-bound; an estimate
#: until a GPU run measures it (docs/benchmarks.md).  Both throughputs are peaks, so the
#: model compares best cases; the one-program path wins while
#:
#:   W ≤ W* = (L_multi − L_one)·t_launch·F·f·n_SM / (n_SM − 1)   ≈ 6.3·10⁷ multiply-adds.
FMA_PER_CLOCK_PER_SM = 128
SM_CLOCK_HZ = 1.98e9
NUM_SMS = 132
LAUNCH_OVERHEAD_S = 5e-6
SINGLE_PROGRAM_OPS = 9
MULTI_PROGRAM_OPS = 58


def single_program_max_work(num_sms: int = NUM_SMS, clock_hz: float = SM_CLOCK_HZ,
                            fma_per_clock: int = FMA_PER_CLOCK_PER_SM,
                            launch_overhead_s: float = LAUNCH_OVERHEAD_S,
                            single_ops: int = SINGLE_PROGRAM_OPS,
                            multi_ops: int = MULTI_PROGRAM_OPS) -> int:
    """W* of the cost model above: the largest :func:`single_program_work` (multiply-adds)
    for which one program (T_one) is no slower than the multi-program path (T_multi)."""
    if num_sms < 2:
        raise ValueError(f"num_sms must be >= 2, got {num_sms}")
    if clock_hz <= 0 or fma_per_clock <= 0 or launch_overhead_s < 0:
        raise ValueError("clock_hz and fma_per_clock must be > 0, launch_overhead_s >= 0")
    saved_s = (multi_ops - single_ops) * launch_overhead_s
    return int(saved_s * fma_per_clock * clock_hz * num_sms / (num_sms - 1))


def _max_work_from_env(default: int) -> int:
    """``MDM_SINGLE_PROGRAM_MAX_WORK`` (a non-negative number of multiply-adds), else
    ``default``; ``ValueError`` naming the variable for anything else."""
    raw = os.environ.get("MDM_SINGLE_PROGRAM_MAX_WORK", "")
    if not raw.strip():
        return default
    try:
        value = float(raw)
        if not math.isfinite(value):
            raise ValueError
    except ValueError:
        raise ValueError(f"MDM_SINGLE_PROGRAM_MAX_WORK must be a finite number of "
                         f"multiply-adds, got {raw!r}") from None
    if value < 0:
        raise ValueError(f"MDM_SINGLE_PROGRAM_MAX_WORK must be >= 0, got {raw!r}")
    return int(value)


#: Largest :func:`single_program_work` run by one program; above it the multi-program path
#: wins: :func:`single_program_max_work` (the cost model above, ≈ 6.3·10⁷ multiply-adds,
#: ~0.25 ms of one SM at peak).  Override with the environment variable
#: ``MDM_SINGLE_PROGRAM_MAX_WORK`` (read at import; the router reads this attribute at each
#: call).
SINGLE_PROGRAM_MAX_WORK = _max_work_from_env(single_program_max_work())

KIND_CODES = {"dv": 0, "nwj": 1, "js": 2, "infonce": 3, "wasserstein": 4}


def single_program_work(batch_size, dims, hidden, num_marginal, grid_factors=1):
    """Multiply-adds one program does for a step: the projection GEMMs forward and backward
    (3·B·Σd·H_1), and per sample (B joint + ``num_marginal``) a forward, a recomputation
    and a backward through the MLP (~3 passes of m·H_1 + H_1·H_2); the "all" grid repeats
    its backward once per factor (``grid_factors``)."""
    h1 = hidden[0]
    per_sample = len(dims) * h1 + sum(a * b for a, b in zip(hidden[:-1], hidden[1:])) + h1
    passes = 2 + grid_factors
    return 3 * batch_size * sum(dims) * h1 + (batch_size + num_marginal) * passes * per_sample


# ----------------------------------------------------------------------------- kernels
@triton.jit
def _pick(j: tl.constexpr, a0, a1, a2, a3):
    """The j-th of four per-modality arguments (j is a compile-time constant)."""
    if j == 0:
        out = a0
    elif j == 1:
        out = a1
    elif j == 2:
        out = a2
    else:
        out = a3
    return out


@triton.jit
def _project(z_ptr, w_ptr, d, P_ptr, B, H1, offs_n, offs_h, hmask,
             BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """P = z Wᵀ (B × H_1, float32) for one modality: z (B × d), W (H_1 × d), any float dtype."""
    offs_k = tl.arange(0, BLOCK_K)
    for r0 in range(0, B, BLOCK_N):
        rows = r0 + offs_n
        rmask = rows < B
        acc = tl.zeros([BLOCK_N, offs_h.shape[0]], tl.float32)
        for k0 in range(0, d, BLOCK_K):
            kk = k0 + offs_k
            kmask = kk < d
            zt = tl.load(z_ptr + rows[:, None] * d + kk[None, :],
                         mask=rmask[:, None] & kmask[None, :], other=0.0).to(tl.float32)
            wt = tl.load(w_ptr + offs_h[:, None] * d + kk[None, :],
                         mask=hmask[:, None] & kmask[None, :], other=0.0).to(tl.float32)
            acc += tl.dot(zt, tl.trans(wt), input_precision=DOT_PREC)
        tl.store(P_ptr + rows[:, None] * H1 + offs_h[None, :], acc,
                 mask=rmask[:, None] & hmask[None, :])


@triton.jit
def _zero(ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    for s in range(0, n, BLOCK):
        tl.store(ptr + s + offs, tl.zeros([BLOCK], tl.float32), mask=(s + offs) < n)


@triton.jit
def _single_program_fwd_kernel(
    z0, z1, z2, z3, w0, w1, w2, w3, dim0, dim1, dim2, dim3,
    perm_ptr, b1_ptr, W2_ptr, b2_ptr, wout_ptr, bout_ptr,
    P_ptr, dPJ_ptr, dPM_ptr, row_lse_ptr, pg_ptr, joint_ptr, marg_ptr,
    B, N, NCOL, H1, H2, SP, log_n, log_ncol,
    M: tl.constexpr, KIND: tl.constexpr, RED_M: tl.constexpr, GMODE_J: tl.constexpr,
    GMODE_M: tl.constexpr,
    IDX: tl.constexpr, NF: tl.constexpr,
    GROUPED: tl.constexpr, TWO_LAYERS: tl.constexpr, ACT: tl.constexpr,
    BLOCK_H1: tl.constexpr, BLOCK_H2: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, DISTINCT: tl.constexpr = False,
):
    """One program: the joint and marginal terms; ∂P^J, ∂P^M and the two rows of pg
    (parameter gradients after the first layer, layout [b_1 | w_out | b_out | W_2 | b_2]).
    Phases A–D of the module docstring, separated by barriers (a CTA barrier also orders
    its global-memory accesses)."""
    offs_h = tl.arange(0, BLOCK_H1)
    hmask = offs_h < H1
    offs = tl.arange(0, BLOCK_N)
    offs_c = tl.arange(0, BLOCK_H2)
    H_LAST = H2 if TWO_LAYERS else H1
    # pg row layout
    o_wout = H1
    o_bout = H1 + H_LAST
    o_w2 = o_bout + 1
    o_b2 = o_w2 + H2 * H1
    # ---- phase 0: zero what is accumulated in memory ----
    if IDX == 1 or IDX == 3:           # shuffled rows take atomic adds
        _zero(dPM_ptr, M * B * H1, 1024)
    if TWO_LAYERS:                     # W_2 / b_2 / w_out: read-modify-write per tile
        _zero(pg_ptr + o_wout, H2, 1024)
        _zero(pg_ptr + o_w2, H2 * H1 + H2, 1024)
        _zero(pg_ptr + SP + o_wout, H2, 1024)
        _zero(pg_ptr + SP + o_w2, H2 * H1 + H2, 1024)
    # ---- phase A: projections ----
    for j in tl.static_range(M):
        _project(_pick(j, z0, z1, z2, z3), _pick(j, w0, w1, w2, w3), _pick(j, dim0, dim1, dim2, dim3),
                 P_ptr + j * B * H1, B, H1, offs, offs_h, hmask, BLOCK_N, BLOCK_K)
    tl.debug_barrier()
    b1 = tl.load(b1_ptr + offs_h, mask=hmask, other=0.0).to(tl.float32)
    bout = tl.load(bout_ptr).to(tl.float32)
    # ---- phase B: joint term and its gradients ----
    acc = tl.zeros([BLOCK_N], tl.float32)
    gb1 = tl.zeros([BLOCK_H1], tl.float32)
    gwout = tl.zeros([BLOCK_H1], tl.float32)
    gbout = tl.zeros([BLOCK_N], tl.float32)
    inv_b = 1.0 / B
    for r in range(0, tl.cdiv(B, BLOCK_N)):
        cols, valid = tile_columns(r, 0, offs, B, BLOCK_N, BLOCK_N, 0)
        z1t, a1, t = tile_scores(P_ptr, b1, r, cols, valid, offs_h, hmask, perm_ptr, W2_ptr,
                                  b2_ptr, wout_ptr, bout, B, H1, H2, M, 0, 1, 0, False,
                                  TWO_LAYERS, BLOCK_H2, ACT)
        if KIND == 2:  # JS: −softplus(−T)
            acc += tl.where(valid, tl.minimum(t, 0.0) - tl.log(1.0 + tl.exp(-tl.abs(t))), 0.0)
        else:
            acc += tl.where(valid, t, 0.0)
        g = term_grad(t, valid, r, cols, inv_b, 0.0, row_lse_ptr, perm_ptr, B, M, 0, 1, 0,
                       False, GMODE_J)
        gbout += g
        d1, gw_inc = tile_backprop(g, z1t, a1, valid, W2_ptr, b2_ptr, wout_ptr, offs_h, hmask,
                                    offs_c, H1, H2, pg_ptr + o_w2, pg_ptr + o_b2,
                                    pg_ptr + o_wout, TWO_LAYERS, True, BLOCK_H2, ACT)
        gwout += gw_inc
        gb1 += tl.sum(d1, axis=0)
        tl.store(dPJ_ptr + cols[:, None] * H1 + offs_h[None, :], d1,
                 mask=valid[:, None] & hmask[None, :])
    tl.store(joint_ptr, tl.sum(acc, axis=0) * inv_b)
    tl.store(pg_ptr + offs_h, gb1, mask=hmask)
    tl.store(pg_ptr + o_bout, tl.sum(gbout, axis=0))
    if not TWO_LAYERS:
        tl.store(pg_ptr + o_wout + offs_h, gwout, mask=hmask)
    # ---- phase C: marginal term ----
    R, ncol = row_layout(N, NCOL, B, IDX, BLOCK_N)
    acc, run_m, run_s = reduce_samples(P_ptr, b1, perm_ptr, W2_ptr, b2_ptr, wout_ptr, bout,
                                        row_lse_ptr, 0, 1, R, N, ncol, offs, offs_h, hmask, B,
                                        H1, H2, M, IDX, RED_M, NF, GROUPED, TWO_LAYERS, BLOCK_H2,
                                        BLOCK_N, ACT, DISTINCT)
    # value, and the shift / scale of g = ∂M/∂T
    if KIND <= 1:
        mx = tl.max(run_m, axis=0)
        lse = mx + tl.log(tl.sum(run_s * tl.exp(run_m - mx), axis=0))
        if KIND == 0:
            marginal = lse - log_n
            shift = lse
        else:
            marginal = tl.exp(lse - log_n - 1.0)
            shift = 1.0 + log_n
        scale = 1.0
    elif KIND == 3:
        marginal = tl.sum(acc, axis=0) * inv_b - log_ncol
        shift = 0.0
        scale = inv_b
    else:
        marginal = tl.sum(acc, axis=0) / N
        shift = 0.0
        scale = 1.0 / N
    tl.store(marg_ptr, marginal)
    tl.debug_barrier()  # row LSEs and zeroed buffers visible to every thread
    # ---- phase D: marginal gradients (the "all" grid: one pass per owner factor) ----
    gb1 = tl.zeros([BLOCK_H1], tl.float32)
    gwout = tl.zeros([BLOCK_H1], tl.float32)
    gbout = tl.zeros([BLOCK_N], tl.float32)
    PASSES: tl.constexpr = NF if IDX == 2 else 1
    for f in tl.static_range(PASSES):
        for r in range(0, R):
            own = tl.zeros([BLOCK_H1], tl.float32)
            for c0 in range(0, ncol, BLOCK_N):
                cols, valid, z1t, a1, g = tile_score_grads(
                    P_ptr, b1, r, c0, offs, N, ncol, offs_h, hmask, perm_ptr, W2_ptr, b2_ptr,
                    wout_ptr, bout, scale, shift, row_lse_ptr, B, H1, H2, M, IDX, NF, f,
                    GROUPED, TWO_LAYERS, BLOCK_H2, ACT, GMODE_M, DISTINCT, BLOCK_N)
                d1, gw_inc = tile_backprop(g, z1t, a1, valid, W2_ptr, b2_ptr, wout_ptr, offs_h,
                                            hmask, offs_c, H1, H2, pg_ptr + SP + o_w2,
                                            pg_ptr + SP + o_b2, pg_ptr + SP + o_wout,
                                            TWO_LAYERS, f == 0, BLOCK_H2, ACT)
                if f == 0:
                    gbout += g
                    gwout += gw_inc
                    gb1 += tl.sum(d1, axis=0)
                scatter_shared_rows(dPM_ptr, d1, r, cols, valid, offs_h, hmask, perm_ptr, B,
                                     H1, M, IDX, NF, f, GROUPED)
                own += tl.sum(d1, axis=0)
            store_owned_row(dPM_ptr, own, r, offs_h, hmask, B, H1, M, IDX, f, GROUPED)
    tl.store(pg_ptr + SP + offs_h, gb1, mask=hmask)
    tl.store(pg_ptr + SP + o_bout, tl.sum(gbout, axis=0))
    if not TWO_LAYERS:
        tl.store(pg_ptr + SP + o_wout + offs_h, gwout, mask=hmask)


@triton.jit
def _combined_dP(dPJ_ptr, dPM_ptr, gP_ptr, gj, gm, rows, rmask, hh, hm, H1,
                 HAS_GP: tl.constexpr):
    """g_J ∂P^J + g_M ∂P^M_j (+ the incoming gradient of the returned P_j when HAS_GP) on a
    (rows × hidden) block (dPM_ptr and gP_ptr already at modality j)."""
    m2 = rmask[:, None] & hm[None, :]
    off = rows[:, None] * H1 + hh[None, :]
    out = gj * tl.load(dPJ_ptr + off, mask=m2, other=0.0) \
        + gm * tl.load(dPM_ptr + off, mask=m2, other=0.0)
    if HAS_GP:
        out += tl.load(gP_ptr + off, mask=m2, other=0.0)
    return out


@triton.jit
def _dP_product(dPJ_ptr, dPM_ptr, gP_ptr, gj, gm, Y_ptr, out_ptr, idx, imask, K, d, H1,
                HAS_GP: tl.constexpr, TRANS: tl.constexpr, BLOCK_K: tl.constexpr,
                BLOCK_D: tl.constexpr):
    """out[idx, :] = Σ_k X[idx, k]·Y[k, :] with X = ∂P_j (B × H_1, TRANS=False; Y = W_{1,j},
    K = H_1) or X = ∂P_jᵀ (TRANS=True; Y = z_j, K = B); Y and out row-major with d columns."""
    offs_k = tl.arange(0, BLOCK_K)
    offs_d = tl.arange(0, BLOCK_D)
    for d0 in range(0, d, BLOCK_D):
        dd = d0 + offs_d
        dm = dd < d
        acc = tl.zeros([idx.shape[0], BLOCK_D], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + offs_k
            km = kk < K
            if TRANS:
                x = tl.trans(_combined_dP(dPJ_ptr, dPM_ptr, gP_ptr, gj, gm, kk, km, idx, imask,
                                          H1, HAS_GP))
            else:
                x = _combined_dP(dPJ_ptr, dPM_ptr, gP_ptr, gj, gm, idx, imask, kk, km, H1,
                                 HAS_GP)
            y = tl.load(Y_ptr + kk[:, None] * d + dd[None, :], mask=km[:, None] & dm[None, :],
                        other=0.0).to(tl.float32)
            acc += tl.dot(x, y, input_precision=DOT_PREC)
        tl.store(out_ptr + idx[:, None] * d + dd[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=imask[:, None] & dm[None, :])


@triton.jit
def _input_grads(z_ptr, w_ptr, dz_ptr, dw_ptr, d, task, dPJ_ptr, dPM_ptr, gP_ptr, gj, gm, B,
                 H1, HAS_GP: tl.constexpr, NRB: tl.constexpr, NEED_DZ: tl.constexpr,
                 BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """One block of ∂z_j = ∂P_j W_{1,j} (tasks 0 … NRB − 1, BLOCK_R rows of z each) or of
    ∂W_{1,j} = ∂P_jᵀ z_j (tasks NRB …, BLOCK_R rows of W each), D in BLOCK_D chunks."""
    offs_r = tl.arange(0, BLOCK_R)
    if task < NRB:
        if NEED_DZ:
            rows = task * BLOCK_R + offs_r
            _dP_product(dPJ_ptr, dPM_ptr, gP_ptr, gj, gm, w_ptr, dz_ptr, rows, rows < B, H1, d,
                        H1, HAS_GP, False, BLOCK_K, BLOCK_D)
    else:
        hrows = (task - NRB) * BLOCK_R + offs_r
        _dP_product(dPJ_ptr, dPM_ptr, gP_ptr, gj, gm, z_ptr, dw_ptr, hrows, hrows < H1, B, d,
                    H1, HAS_GP, True, BLOCK_K, BLOCK_D)


@triton.jit
def _single_program_bwd_kernel(
    z0, z1, z2, z3, w0, w1, w2, w3, dim0, dim1, dim2, dim3,
    dz0, dz1, dz2, dz3, dw0, dw1, dw2, dw3,
    dPJ_ptr, dPM_ptr, gP_ptr, pg_ptr, gj_ptr, gm_ptr, gsmall_ptr,
    B, H1, SP,
    M: tl.constexpr, HAS_GP: tl.constexpr, NRB: tl.constexpr, NHB: tl.constexpr, NEED_DZ: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    """Program p < m·(NRB + NHB): modality p // (NRB + NHB), block p % (NRB + NHB) of its ∂z
    or ∂W_1 (:func:`_input_grads`, with ∂P_j = g_J ∂P^J + g_M ∂P^M_j [+ gP_j, the incoming
    gradient of the returned projections]); the last program: gsmall = g_J pg[0] + g_M pg[1]."""
    pid = tl.program_id(0)
    gj = tl.load(gj_ptr).to(tl.float32)
    gm = tl.load(gm_ptr).to(tl.float32)
    per = NRB + NHB
    if pid == M * per:
        offs = tl.arange(0, BLOCK_S)
        for s in range(0, SP, BLOCK_S):
            o = s + offs
            msk = o < SP
            tl.store(gsmall_ptr + o, gj * tl.load(pg_ptr + o, mask=msk, other=0.0)
                     + gm * tl.load(pg_ptr + SP + o, mask=msk, other=0.0), mask=msk)
    else:
        j = pid // per
        task = pid % per
        for jj in tl.static_range(M):
            if j == jj:
                _input_grads(_pick(jj, z0, z1, z2, z3), _pick(jj, w0, w1, w2, w3),
                             _pick(jj, dz0, dz1, dz2, dz3), _pick(jj, dw0, dw1, dw2, dw3),
                             _pick(jj, dim0, dim1, dim2, dim3), task, dPJ_ptr,
                             dPM_ptr + jj * B * H1, gP_ptr + jj * B * H1, gj, gm, B, H1, HAS_GP,
                             NRB, NEED_DZ, BLOCK_R, BLOCK_K, BLOCK_D)


# ----------------------------------------------------------------------------- launches
def _four(items, fill):
    """Pad a per-modality list to the kernels' four slots."""
    return list(items) + [fill] * (MAX_MODALITIES - len(items))


def param_grad_size(H1, H2, two_layers):
    """Length of one term's gradient of (b_1, w_out, b_out[, W_2, b_2]), flattened in that
    order (a row of ``pg``, the layout of the backward's ``gsmall``)."""
    h_last = H2 if two_layers else H1
    return H1 + h_last + 1 + ((H2 * H1 + H2) if two_layers else 0)


# ----------------------------------------------------------------------------- op bodies
# The forward and backward of the ``mdm_kernels::triton_single_*`` custom ops
# (:mod:`~mdm_kernels.ops.triton_ops` registers them with their autograd formula).
def single_forward(kind, act, zs, w1s, b1, wout, bout, W2, b2, perms, distinct=False):
    """(joint_term, marginal_term, P, ∂P^J, ∂P^M, pg) in one launch (module docstring): the
    terms, the projections P (m × B × H_1), and the gradients of both terms computed in the
    same pass — ∂P^J (B × H_1), ∂P^M (m × B × H_1) and pg (2 × :func:`param_grad_size`: the
    joint and the marginal term's gradients of b_1, w_out, b_out[, W_2, b_2])."""
    m = len(zs)
    device = zs[0].device
    # the kernel indexes every operand row-major: a non-contiguous parameter (a transposed
    # or strided view) is read through a contiguous copy (a no-op when already contiguous)
    zs, w1s = [z.contiguous() for z in zs], [w.contiguous() for w in w1s]
    b1, wout, bout = b1.contiguous(), wout.contiguous(), bout.contiguous()
    W2 = W2.contiguous() if W2 is not None else None
    b2 = b2.contiguous() if b2 is not None else None
    B, H1 = zs[0].shape[0], w1s[0].shape[0]
    two = W2 is not None
    H2 = W2.shape[0] if two else 1
    sp = param_grad_size(H1, H2, two)
    plan = marginal_plan(kind, B, m, perms, distinct)
    idx, n, ncol, nf, grouped = plan.idx, plan.N, plan.NCOL, plan.NF, plan.grouped
    f32 = dict(device=device, dtype=torch.float32)
    P = fresh_empty(m, B, H1, **f32)
    dPJ = fresh_empty(B, H1, **f32)
    dPM = fresh_empty(m, B, H1, **f32)
    row_lse = fresh_empty(B, **f32)
    pg = fresh_empty(2, sp, **f32)
    joint = fresh_empty((), **f32)
    marginal = fresh_empty((), **f32)
    dims = [z.shape[1] for z in zs]
    gpu = uses_gpu_launches(device)
    with launch_device(zs[0]):
        _single_program_fwd_kernel[(1,)](
            *_four(zs, zs[0]), *_four(w1s, w1s[0]), *_four(dims, 1),
            perms if perms is not None else row_lse, b1, W2 if two else b1,
            b2 if two else b1, wout, bout,
            P, dPJ, dPM, row_lse, pg, joint, marginal,
            B, n, ncol, H1, H2, sp, math.log(n), math.log(max(plan.candidates, 1)),
            M=m, KIND=KIND_CODES[kind], RED_M=MARGINAL_RED[kind],
            GMODE_J=G_SIGMOID_NEG if kind == "js" else G_ONE,
            GMODE_M=MARGINAL_GMODE[kind], IDX=idx, NF=nf, GROUPED=grouped, TWO_LAYERS=two,
            ACT=act, BLOCK_H1=block_size(H1), BLOCK_H2=16, BLOCK_N=16,
            BLOCK_K=32 if (two and gpu) else 16, DISTINCT=plan.distinct,
            num_warps=8 if gpu else 1)
    return joint, marginal, P, dPJ, dPM, pg


def single_backward(zs, w1s, dPJ, dPM, pg, g_joint, g_marg, g_proj, need_dz):
    """(∂z_1 … ∂z_m, ∂W_{1,1} … ∂W_{1,m}, gsmall) in one launch: ∂P_j = g_J ∂P^J + g_M ∂P^M_j
    (+ g_proj_j, the incoming gradient of P, when not ``None``) through the projection GEMMs,
    and gsmall = g_J pg[0] + g_M pg[1] (flattened b_1, w_out, b_out[, W_2, b_2]).  The ∂z's
    are left out (an empty list) unless ``need_dz``."""
    m = len(zs)
    device = dPJ.device
    B, H1 = dPJ.shape
    sp = pg.shape[1]
    zs, w1s = [z.contiguous() for z in zs], [w.contiguous() for w in w1s]
    # written row-major by the kernel: plain contiguous buffers
    dzs = ([fresh_empty(z.shape, device=z.device, dtype=z.dtype) for z in zs] if need_dz
           else list(zs))
    dws = [fresh_empty(w.shape, device=w.device, dtype=w.dtype) for w in w1s]
    gsmall = fresh_empty(sp, device=device, dtype=torch.float32)
    gpu = uses_gpu_launches(device)
    block_r = 32 if gpu else 16  # tiles/warps: no ptxas spills on sm_90 (compile_sm90)
    nrb, nhb = triton.cdiv(B, block_r), triton.cdiv(H1, block_r)
    dims = [z.shape[1] for z in zs]
    with launch_device(dPJ):
        _single_program_bwd_kernel[(m * (nrb + nhb) + 1,)](
            *_four(zs, zs[0]), *_four(w1s, w1s[0]), *_four(dims, 1),
            *_four(dzs, dzs[0]), *_four(dws, dws[0]),
            dPJ, dPM, dPM if g_proj is None else g_proj.float().contiguous(), pg, g_joint,
            g_marg, gsmall, B, H1, sp, M=m, HAS_GP=g_proj is not None, NRB=nrb, NHB=nhb, NEED_DZ=need_dz, BLOCK_R=block_r,
            BLOCK_K=16, BLOCK_D=min(64, block_size(max(dims))), BLOCK_S=256,
            num_warps=8 if gpu else 1)
    return (dzs if need_dz else []), dws, gsmall

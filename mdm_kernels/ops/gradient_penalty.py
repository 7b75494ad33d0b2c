"""Fused WGAN-GP gradient penalty (Triton), in closed form — no double backward.

Gulrajani et al., "Improved Training of Wasserstein GANs", NeurIPS 2017; used by the
Wasserstein dependency measure (Ozair et al., NeurIPS 2019; Colombo et al., EMNLP 2021).
The oracle is :func:`mdm_kernels.reference.gradient_penalty.gradient_penalty_terms`
(``autograd.grad(create_graph=True)`` then a double backward).

Notation (one interpolated row n, dropped below; x = [x_1; ...; x_m], D = Σ d_k)::

    x̂       = ε·x_J + (1 − ε)·x_M                   ε ∈ [0, 1] per row, shared by modalities
    a_1     = W_1 x̂ + b_1 = ε·P_J + (1 − ε)·P_M + b_1    P = Σ_k x_k W_{1,k}ᵀ  (split first layer)

    one hidden layer  (T = w_2ᵀ σ(a_1) + b_2):
        u   = w_2 ⊙ σ'(a_1)                                   (H_1)
    two hidden layers (h_1 = σ(a_1), a_2 = W_2 h_1 + b_2, T = w_3ᵀ σ(a_2) + b_3):
        v   = w_3 ⊙ σ'(a_2)                                   (H_2)
        q   = W_2ᵀ v                                          (H_1)
        u   = q ⊙ σ'(a_1)                                     (H_1)

    g   = ∇_x T(x̂) = W_1ᵀ u                                  (D)
    s   = ‖g‖² = gᵀg = uᵀ G u,   G = W_1 W_1ᵀ                (H_1 × H_1, the Gram matrix)
    ν   = √s,  gap = ν − 1  (one-sided: max(0, ν − 1)),  GP = (1/N) Σ_n gap_n²

The kernel never builds x̂: P_J / P_M are first pre-activations computed before it — for
:func:`~mdm_kernels.ops.triton_ops.fused_gradient_penalty` one GEMM of the concatenated
joint and marginal rows with W_1 = [W_{1,1} … W_{1,m}]; for
:func:`~mdm_kernels.ops.router.fused_wasserstein_terms` the per-modality projections
P_k = z_k W_{1,k}ᵀ the estimator uses too, gathered by row index.  ‖g‖² is taken through the Gram matrix when D > H_1 (an H_1-wide
product per row instead of a D-wide one), else through g = W_1ᵀ u directly.

Backward (derived by hand; L = GP, every line is per row and summed over rows where it
feeds a parameter)::

    ∂L/∂ν   = 2·gap/N          (0 where ν < 1 one-sided)
    ∂ν/∂g   = g/ν              (taken as 0 where s = 0: a dead-ReLU row, like the oracle)
    β       = 2·gap/(N·ν)      so  ∂L/∂g = β·g
    r       = ∂L/∂u = W_1 (β g) = β·G u                       (H_1)
    ∂L/∂W_1 += β·u gᵀ                      direct path  (H_1 × D)
    ∂L/∂G   += ½·β·u uᵀ                     Gram path (torch turns it into ∂L/∂W_1 = 2·∂G·W_1
                                            = β u gᵀ through G = W_1 W_1ᵀ)
    one hidden layer:
        ∂L/∂w_2 += r ⊙ σ'(a_1)
        δ_1      = r ⊙ w_2 ⊙ σ''(a_1)
    two hidden layers:
        dq       = r ⊙ σ'(a_1);        δ_1  = r ⊙ q ⊙ σ''(a_1)     (u = q ⊙ σ'(a_1))
        ∂L/∂W_2 += v dqᵀ;              dv   = W_2 dq                  (q = W_2ᵀ v)
        ∂L/∂w_3 += dv ⊙ σ'(a_2);       δ_2  = dv ⊙ w_3 ⊙ σ''(a_2)     (v = w_3 ⊙ σ'(a_2))
        ∂L/∂W_2 += δ_2 h_1ᵀ;           ∂L/∂b_2 += δ_2                (a_2 = W_2 h_1 + b_2)
        δ_1     += (W_2ᵀ δ_2) ⊙ σ'(a_1)                              (h_1 = σ(a_1))
    ∂L/∂b_1 += δ_1;   ∂L/∂P_J[row] += ε·δ_1;   ∂L/∂P_M[row] += (1 − ε)·δ_1
    ∂L/∂b_out = 0 (the input gradient does not depend on it; left None like the oracle)

then torch's autograd carries ∂L/∂P into W_{1,k} and every z through the projection GEMMs.
For relu / leaky_relu σ'' = 0, so δ_1 (and δ_2) vanish: the constexpr ``CURVED`` skips them.

Fusion: one kernel computes the penalty *and* all of the gradients above in a single pass
over tiles of interpolated rows (GP is a scalar loss, so its gradient is the saved one
times grad_output — the same trick as Liger-Kernel's fused cross-entropy).  When no input
needs a gradient the same kernel runs value-only (``COMPUTE_GRAD=False``).  The grid is
persistent: each program loops over row tiles, keeps the weight-gradient partial sums in
registers and writes one partial per program (summed by torch: deterministic, no
contention); per-row ∂L/∂P goes to its (gathered) rows with plain stores, or atomics when
rows repeat (``wasserstein_terms``).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_helpers import (DOT_PRECISION, activation, activation_grad,
                             activation_grad2, block_size, critic_tail, launch_device,
                             launch_tuned, tile_configs)
from .runtime_flags import fresh_empty, sm_count, uses_gpu_launches


#: Interpreter (CPU) launch: one small fixed config, few programs (so the persistent loop
#: runs more than one tile per program in the tests), and 16-wide chunks of the weight
#: matrices (so the tests' odd widths loop over several chunks).
_INTERP_BLOCK_N = 16
_INTERP_PROGRAMS = 2
_INTERP_CHUNK = 16

#: Widest hidden layer (H_1 and H_2) the fused penalty takes: its per-tile vectors
#: (BLOCK_N × H_1) live in registers, and the per-program weight-gradient partials
#: (H_1 × H_1 + H_2 × H_1 floats) in global memory.  ``python/compile_sm90.py`` /
#: ``tests/test_gpu_resources.py`` compile every variant at this width for sm_80 and sm_90.
GP_MAX_HIDDEN = 256
#: Rows of the chunks of G / W_1 / W_2 that one ``tl.dot`` reads on a GPU (the matrices are
#: never whole ``tl.dot`` operands: flash-attention-style loops over these chunks).
GP_CHUNK = 32
#: Cap on the per-program partial rows (bytes): wide critics run fewer programs.
_PARTIALS_BUDGET = 64 * 2 ** 20


@triton.jit
def _load_matrix(ptr, rows, cols, n_rows, n_cols):
    """Row-major n_rows × n_cols matrix as a zero-padded [len(rows), len(cols)] block."""
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    return tl.load(ptr + rows[:, None] * n_cols + cols[None, :], mask=mask, other=0.0)


@triton.jit
def _accumulate(ptr, rows, cols, n_rows, n_cols, stride, value):
    """``ptr[rows, cols] += value`` (row stride ``stride``) for this program's private
    partial: read-modify-write, no atomics (the tile loop's barrier orders it)."""
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    off = rows[:, None] * stride + cols[None, :]
    tl.store(ptr + off, tl.load(ptr + off, mask=mask, other=0.0) + value, mask=mask)


@triton.jit
def _accumulate_vector(ptr, offs, n, value):
    """``ptr[offs] += value`` (masked ``offs < n``), this program's private partial."""
    mask = offs < n
    tl.store(ptr + offs, tl.load(ptr + offs, mask=mask, other=0.0) + value, mask=mask)


@triton.jit
def _layer2_chunk(h1, w2_ptr, b2_ptr, wout_ptr, c0, cc, c1, H1, H2, DOT_PREC: tl.constexpr):
    """Second-layer units c0 … c0 + BC of a row tile: (W_2[c] (BC × BH1, zero-padded),
    a_2[:, c] = h_1 W_2[c]ᵀ + b_2[c], w_out[c])."""
    w2c = _load_matrix(w2_ptr + c0 * H1, cc, c1, H2 - c0, H1)
    cmask = c0 + cc < H2
    a2c = tl.dot(h1, tl.trans(w2c), input_precision=DOT_PREC) \
        + tl.load(b2_ptr + c0 + cc, mask=cmask, other=0.0)[None, :]
    return w2c, a2c, tl.load(wout_ptr + c0 + cc, mask=cmask, other=0.0)


@triton.jit
def _gp_kernel(
    sj_ptr, sm_ptr, mi_ptr, eps_ptr, b1_ptr, wmat_ptr, w2_ptr, b2_ptr, wout_ptr,
    part_ptr, scr_ptr, dsj_ptr, dsm_ptr,
    N, JB, H1, H2, K, inv_n, N_BUCKET, PSTRIDE,
    M_TERMS: tl.constexpr, GATHER: tl.constexpr, ATOMIC: tl.constexpr,
    TWO_LAYERS: tl.constexpr, GRAM: tl.constexpr, ONE_SIDED: tl.constexpr,
    ACT: tl.constexpr, COMPUTE_GRAD: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_N: tl.constexpr, BH1: tl.constexpr, BH2: tl.constexpr, BK: tl.constexpr,
    BHO: tl.constexpr, BC: tl.constexpr, BJ: tl.constexpr,
):
    """GP partial sums (and, with COMPUTE_GRAD, every gradient) — see the module docstring.

    sj: (JB, H1) joint pre-projections, row n reads row n % JB.  sm: marginal source rows;
    with GATHER row n sums rows mi[t, n] for t < M_TERMS, else reads row n.  wmat: G (H1×H1,
    GRAM) or W_1 (H1×K).  part: one zero-initialised partial row per program (layout in
    :func:`_partial_layout`); scr: 2 × BLOCK_N × BH1 floats of scratch per program.

    The weight matrices are read in chunks: W_2 in BC-row chunks (a_2 chunk = h_1 W_2[c]ᵀ,
    then q += v_c W_2[c] — the score/value pattern of flash attention), G / W_1 in BJ-row
    chunks (G u = Σ_j u[:, j] G[j, :], u's column chunks read back from the scratch), so
    no tl.dot operand is larger than BLOCK_N × BH1 or BC × BH1.
    """
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    num_tiles = tl.cdiv(N, BLOCK_N)
    CURVED: tl.constexpr = ACT >= 2          # σ'' ≠ 0 (tanh, softplus, gelu)

    offs_n = tl.arange(0, BLOCK_N)
    c1 = tl.arange(0, BH1)
    ck = tl.arange(0, BK)
    cc = tl.arange(0, BC)
    cj = tl.arange(0, BJ)
    m1 = c1 < H1
    kmat = H1 if GRAM else K                 # columns of wmat

    b1 = tl.load(b1_ptr + c1, mask=m1, other=0.0)
    if not TWO_LAYERS:
        wout = tl.load(wout_ptr + c1, mask=m1, other=0.0)

    # partial row: [loss | b1 (BH1) | w_out (BHO) | G or W_1 (BH1 × BK) | W_2 (BH2 × BH1) | b2]
    row = part_ptr + pid * PSTRIDE
    o_wout = row + 1 + BH1
    o_mat = o_wout + BHO
    o_w2 = o_mat + BH1 * BK
    o_b2 = o_w2 + BH2 * BH1
    # scratch: u (BLOCK_N × BH1), then r on the direct path
    scr_u = scr_ptr + pid * (2 * BLOCK_N * BH1) + offs_n[:, None] * BH1
    scr_r = scr_u + BLOCK_N * BH1

    loss_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    db1_acc = tl.zeros([BH1], dtype=tl.float32)
    dwout_acc = tl.zeros([BH1], dtype=tl.float32)     # one hidden layer

    for tile in range(pid, num_tiles, nprog):
        # the previous tile's scratch reads and partial stores are done by every thread
        tl.debug_barrier()
        rows = tile * BLOCK_N + offs_n
        rmask = rows < N
        mask2 = rmask[:, None] & m1[None, :]
        # ---- pre-activation a_1 = ε·P_J + (1 − ε)·P_M + b_1 (gathered rows) ----
        jrow = (rows % JB).to(tl.int64)
        pj = tl.load(sj_ptr + jrow[:, None] * H1 + c1[None, :], mask=mask2, other=0.0)
        if GATHER:
            pm = tl.zeros([BLOCK_N, BH1], dtype=tl.float32)
            for t in tl.static_range(M_TERMS):
                idx = tl.load(mi_ptr + t * N + rows, mask=rmask, other=0).to(tl.int64)
                pm += tl.load(sm_ptr + idx[:, None] * H1 + c1[None, :], mask=mask2, other=0.0)
        else:
            pm = tl.load(sm_ptr + rows.to(tl.int64)[:, None] * H1 + c1[None, :], mask=mask2,
                         other=0.0)
        e = tl.load(eps_ptr + rows, mask=rmask, other=0.0)
        a1 = e[:, None] * pj + (1.0 - e)[:, None] * pm + b1[None, :]
        d1 = activation_grad(a1, ACT)
        # ---- u = ∂T/∂a_1 (padded columns are 0: w_out / W_2 are zero-padded) ----
        if TWO_LAYERS:
            h1 = activation(a1, ACT)
            q = tl.zeros([BLOCK_N, BH1], dtype=tl.float32)              # W_2ᵀ v
            for c0 in range(0, H2, BC):
                w2c, a2c, woc = _layer2_chunk(h1, w2_ptr, b2_ptr, wout_ptr, c0, cc, c1, H1,
                                              H2, DOT_PREC)
                q += tl.dot(woc[None, :] * activation_grad(a2c, ACT), w2c,
                            input_precision=DOT_PREC)
            u = q * d1
        else:
            u = wout[None, :] * d1
        tl.store(scr_u + c1[None, :], u)
        tl.debug_barrier()
        # ---- s = ‖W_1ᵀ u‖²: G u (Gram) or g = W_1ᵀ u, over BJ-row chunks of the matrix ----
        if GRAM:
            gu = tl.zeros([BLOCK_N, BH1], dtype=tl.float32)
        else:
            gu = tl.zeros([BLOCK_N, BK], dtype=tl.float32)             # g
        for j0 in range(0, H1, BJ):
            uj = tl.load(scr_u + j0 + cj[None, :], mask=(j0 + cj < BH1)[None, :], other=0.0)
            gu += tl.dot(uj, _load_matrix(wmat_ptr + j0 * kmat, cj, ck, H1 - j0, kmat),
                         input_precision=DOT_PREC)
        if GRAM:
            s = tl.sum(u * gu, axis=1)
        else:
            s = tl.sum(gu * gu, axis=1)
        s = tl.where(rmask, tl.maximum(s, 0.0), 0.0)
        alive = s > 0.0
        nu = tl.sqrt(s)
        gap = nu - 1.0
        if ONE_SIDED:
            gap = tl.maximum(gap, 0.0)
        gap = tl.where(rmask, gap, 0.0)
        loss_acc += gap * gap
        if COMPUTE_GRAD:
            # β = 2·gap/(N·ν), 0 on dead rows (s = 0) and padding rows: every gradient term
            # below is linear in β, so masking β masks them all.
            beta = tl.where(alive, 2.0 * gap * inv_n / tl.where(alive, nu, 1.0), 0.0)
            # ∂G += ½ (βu)ᵀ u  or  ∂W_1 += (βu)ᵀ g, by BJ-row chunks
            for j0 in range(0, H1, BJ):
                buj = beta[:, None] * tl.load(scr_u + j0 + cj[None, :],
                                              mask=(j0 + cj < BH1)[None, :], other=0.0)
                if GRAM:
                    _accumulate(o_mat + j0 * BK, cj, ck, H1 - j0, H1, BK,
                                0.5 * tl.dot(tl.trans(buj), u, input_precision=DOT_PREC))
                else:
                    _accumulate(o_mat + j0 * BK, cj, ck, H1 - j0, K, BK,
                                tl.dot(tl.trans(buj), gu, input_precision=DOT_PREC))
                    # r = β W_1 g, chunk j, to the scratch (read back whole below)
                    wj = _load_matrix(wmat_ptr + j0 * K, cj, ck, H1 - j0, K)
                    tl.store(scr_r + j0 + cj[None, :],
                             tl.dot(beta[:, None] * gu, tl.trans(wj), input_precision=DOT_PREC),
                             mask=(j0 + cj < BH1)[None, :])
            if GRAM:
                r = beta[:, None] * gu                                   # β G u
            else:
                tl.debug_barrier()
                r = tl.load(scr_r + c1[None, :], mask=m1[None, :], other=0.0)
            if TWO_LAYERS:
                dq = r * d1
                if CURVED:
                    back1 = tl.zeros([BLOCK_N, BH1], dtype=tl.float32)  # W_2ᵀ δ_2
                for c0 in range(0, H2, BC):
                    w2c, a2c, woc = _layer2_chunk(h1, w2_ptr, b2_ptr, wout_ptr, c0, cc, c1,
                                                  H1, H2, DOT_PREC)
                    d2c = activation_grad(a2c, ACT)
                    dvc = tl.dot(dq, tl.trans(w2c), input_precision=DOT_PREC)  # W_2 dq
                    _accumulate_vector(o_wout + c0, cc, H2 - c0, tl.sum(dvc * d2c, axis=0))
                    dw2c = tl.dot(tl.trans(woc[None, :] * d2c), dq, input_precision=DOT_PREC)
                    if CURVED:
                        delta2 = dvc * woc[None, :] * activation_grad2(a2c, ACT)
                        dw2c += tl.dot(tl.trans(delta2), h1, input_precision=DOT_PREC)
                        _accumulate_vector(o_b2 + c0, cc, H2 - c0, tl.sum(delta2, axis=0))
                        back1 += tl.dot(delta2, w2c, input_precision=DOT_PREC)
                    _accumulate(o_w2 + c0 * BH1, cc, c1, H2 - c0, H1, BH1, dw2c)
                if CURVED:
                    delta1 = r * q * activation_grad2(a1, ACT) + back1 * d1
            else:
                dwout_acc += tl.sum(r * d1, axis=0)
                if CURVED:
                    delta1 = r * wout[None, :] * activation_grad2(a1, ACT)
            if CURVED:
                db1_acc += tl.sum(delta1, axis=0)
                dj = e[:, None] * delta1
                dm = (1.0 - e)[:, None] * delta1
                joff = jrow[:, None] * H1 + c1[None, :]
                if ATOMIC:
                    tl.atomic_add(dsj_ptr + joff, dj, mask=mask2)
                else:
                    tl.store(dsj_ptr + joff, dj, mask=mask2)
                if GATHER:
                    for t in tl.static_range(M_TERMS):
                        idx = tl.load(mi_ptr + t * N + rows, mask=rmask, other=0).to(tl.int64)
                        moff = idx[:, None] * H1 + c1[None, :]
                        if ATOMIC:
                            tl.atomic_add(dsm_ptr + moff, dm, mask=mask2)
                        else:
                            tl.store(dsm_ptr + moff, dm, mask=mask2)
                else:
                    moff = rows.to(tl.int64)[:, None] * H1 + c1[None, :]
                    if ATOMIC:
                        tl.atomic_add(dsm_ptr + moff, dm, mask=mask2)
                    else:
                        tl.store(dsm_ptr + moff, dm, mask=mask2)

    # ---- the register-held parts of the partial row (the host sums the rows once) ----
    tl.store(row, tl.sum(loss_acc, axis=0) * inv_n)
    if COMPUTE_GRAD:
        tl.store(row + 1 + c1, db1_acc)
        if not TWO_LAYERS:
            tl.store(o_wout + c1, dwout_acc)


# Every weight-gradient partial is read-modify-written in global memory (the program's own
# row, L2-resident), not held in registers: ptxas showed 0.5-7 kB of spills per thread when
# the H x H accumulators lived in registers.  8 warps, BLOCK_N 16 or 32; the resource gate
# (tests/test_gpu_resources.py) compiles both at GP_MAX_HIDDEN for sm_80 and sm_90.
_GPU_CONFIGS = [
    triton.Config({"BLOCK_N": bn}, num_warps=8, num_stages=1) for bn in (16, 32)
]
_FIXED_CONFIG = triton.Config({"BLOCK_N": 16}, num_warps=8, num_stages=1)

#: Fit table: the widest hidden layer (max of H_1, H_2, padded to a power of two) at which
#: each BLOCK_N fits on sm_80 and sm_90 — shared memory within the per-block limit, spills
#: within the gate's budget — as compiled by tests/test_gpu_resources.py.
GP_CONFIG_MAX_HIDDEN = {16: 256, 32: 128}


def gp_configs(h1: int, h2: int | None) -> list:
    """The autotune configs that fit hidden widths ``h1`` / ``h2`` (fit table above)."""
    width = block_size(max(h1, h2 or 1))
    return [c for c in _GPU_CONFIGS if width <= GP_CONFIG_MAX_HIDDEN[c.kwargs["BLOCK_N"]]]


def _prune_configs(configs, named_args, **kwargs):
    h1 = named_args["H1"]
    h2 = named_args["H2"] if kwargs.get("TWO_LAYERS", named_args.get("TWO_LAYERS")) else None
    fits = {c.kwargs["BLOCK_N"] for c in gp_configs(h1, h2)}
    return [c for c in configs if c.kwargs["BLOCK_N"] in fits]


_gp_kernel_tuned = triton.autotune(
    configs=tile_configs(_GPU_CONFIGS, _FIXED_CONFIG),
    key=["H1", "H2", "K", "N_BUCKET", "M_TERMS", "TWO_LAYERS", "GRAM", "ACT", "COMPUTE_GRAD"],
    reset_to_zero=["part_ptr", "dsj_ptr", "dsm_ptr"],
    prune_configs_by={"early_config_prune": _prune_configs},
)(_gp_kernel)


def gp_fit_reason(hidden) -> str | None:
    """Why the fused penalty cannot take these hidden widths on a GPU, or ``None``."""
    if max(hidden) > GP_MAX_HIDDEN:
        return (f"the fused gradient penalty holds whole hidden layers per row tile: at most "
                f"{GP_MAX_HIDDEN} units per layer (shared memory / registers of an sm_80 or "
                f"sm_90 block), the critic has {max(hidden)}")
    return None


def gp_block_sizes(h1: int, h2: int | None, k: int, gram: bool, chunk: int = GP_CHUNK):
    """Constexpr widths of a launch: dict(BH1, BH2, BK, BHO, BC, BJ) for hidden widths
    ``h1``, ``h2`` (None: one hidden layer), wmat columns ``k`` and the Gram flag."""
    bh1 = block_size(h1)
    bh2 = block_size(h2) if h2 is not None else 16
    return dict(BH1=bh1, BH2=bh2, BK=bh1 if gram else block_size(k),
                BHO=bh2 if h2 is not None else bh1,
                BC=min(chunk, bh2), BJ=min(chunk, bh1))


def _partial_layout(blocks, two_layers: bool) -> tuple[int, int, int]:
    """(row stride, offset of the wmat gradient, offset of the W_2 gradient) of a program's
    partial row [loss | b1 | w_out | wmat (BH1 × BK) | W_2 (BH2 × BH1) | b2]."""
    bh1, bh2 = blocks["BH1"], blocks["BH2"]
    o_mat = 1 + bh1 + blocks["BHO"]
    o_w2 = o_mat + bh1 * blocks["BK"]
    return o_w2 + ((bh2 * bh1 + bh2) if two_layers else 0), o_mat, o_w2


def _num_programs(n: int, device: torch.device, pstride: int = 1) -> int:
    """Persistent grid size (independent of the tuned BLOCK_N, so every partial slot is
    written by every config), capped so the partial rows stay within _PARTIALS_BUDGET."""
    tiles_min = triton.cdiv(n, 16)
    if not uses_gpu_launches(device):
        return max(1, min(_INTERP_PROGRAMS, tiles_min))
    return max(1, min(2 * sm_count(device), tiles_min, _PARTIALS_BUDGET // (4 * pstride)))


def _launch(sj, sm, mi, eps, b1, wmat, w2, b2, wout, jb, gram, one_sided, act, compute_grad,
            atomic):
    """Run the kernel; returns (gp, grads) with grads None unless ``compute_grad``."""
    device = sj.device
    n = eps.shape[0]
    h1 = sj.shape[1]
    two_layers = w2 is not None
    h2 = w2.shape[0] if two_layers else 1
    k = wmat.shape[1]
    gpu = uses_gpu_launches(device)
    blocks = gp_block_sizes(h1, h2 if two_layers else None, k, gram,
                            GP_CHUNK if gpu else _INTERP_CHUNK)
    pstride, o_mat, o_w2 = _partial_layout(blocks, two_layers)
    if not compute_grad:
        pstride = 1
    progs = _num_programs(n, device, pstride)
    f32 = dict(device=device, dtype=torch.float32)
    parts = torch.zeros(progs, pstride, **f32)   # read-modify-written by its program
    scratch = fresh_empty(progs * 2 * 32 * blocks["BH1"], **f32)   # BLOCK_N ≤ 32
    curved = act >= 2
    if compute_grad and curved:
        dsj = torch.zeros_like(sj)   # rows are only written on curved activations
        dsm = torch.zeros_like(sm)
    else:
        dsj = dsm = parts
    gather = mi is not None
    n_bucket = triton.next_power_of_2(n)
    args = (sj, sm, mi if gather else eps, eps, b1, wmat,
            w2 if two_layers else wout, b2 if two_layers else wout, wout,
            parts, scratch, dsj, dsm, n, jb, h1, h2, k, 1.0 / n, n_bucket, pstride)
    meta = dict(M_TERMS=mi.shape[0] if gather else 1, GATHER=gather, ATOMIC=atomic,
                TWO_LAYERS=two_layers, GRAM=gram, ONE_SIDED=bool(one_sided), ACT=act,
                COMPUTE_GRAD=compute_grad, DOT_PREC=DOT_PRECISION, **blocks)
    with launch_device(sj):  # the inputs' device, whichever is current
        if gpu:
            launch_tuned(_gp_kernel_tuned, lambda _: (progs,), args, meta,
                         gp_configs(h1, h2 if two_layers else None),
                         tuple(meta.items()) + (h1, h2, k, n_bucket))
        else:
            _gp_kernel[(progs,)](*args, **meta, BLOCK_N=_INTERP_BLOCK_N, num_warps=4)
    total = parts.sum(0)
    gp = total[0]
    if not compute_grad:
        return gp, None
    bh1, bh2, bk = blocks["BH1"], blocks["BH2"], blocks["BK"]
    # relu / leaky_relu: σ'' = 0, so ∂P, ∂b_1 and ∂b_2 are identically zero — None, so
    # autograd does not push zeros through the projection GEMMs
    grads = [dsj if curved else None, dsm if curved else None,
             total[1:1 + h1] if curved else None,
             total[o_mat:o_w2].view(bh1, bk)[:h1, :k],
             total[o_w2:o_w2 + bh2 * bh1].view(bh2, bh1)[:h2, :h1] if two_layers else None,
             total[o_w2 + bh2 * bh1:o_w2 + bh2 * bh1 + h2] if two_layers and curved else None,
             total[1 + bh1:1 + bh1 + (h2 if two_layers else h1)]]
    return gp, grads


def _first_weight(critic) -> torch.Tensor:
    """W_1 = [W_{1,1} … W_{1,m}] (H1 × D, float32), differentiable."""
    return torch.cat([w.float() for w in critic.first_weights], dim=1)


def _critic_weights(critic, w1=None):
    """(b1, wmat, gram, w2, b2, wout) in float32, differentiable w.r.t. the critic
    (``w1``: :func:`_first_weight`, when the caller already has it)."""
    if len(critic.hidden) > 2:
        raise ValueError("the fused gradient penalty supports 1 or 2 hidden layers")
    reason = gp_fit_reason(critic.hidden)
    if reason is not None:      # the backend refuses these first: never launch them
        raise ValueError(reason)
    ws, bs, wout, _ = critic_tail(critic)
    w1 = _first_weight(critic) if w1 is None else w1                    # H1 × D
    gram = sum(critic.dims) > critic.hidden[0]
    wmat = (w1 @ w1.t()).contiguous() if gram else w1.contiguous()
    w2 = ws[0] if ws else None
    b2 = bs[0] if bs else None
    return critic.first_bias.float().contiguous(), wmat, gram, w2, b2, wout


# The op around these launches (``mdm_kernels::triton_gradient_penalty``) and the entries
# ``fused_gradient_penalty`` / ``fused_penalty_from_projections`` are in
# :mod:`~mdm_kernels.ops.triton_ops`.
__all__ = ["GP_MAX_HIDDEN", "gp_block_sizes", "gp_configs", "gp_fit_reason"]

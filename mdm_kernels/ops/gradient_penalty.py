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
:func:`fused_gradient_penalty` one GEMM of the concatenated joint and marginal rows with
W_1 = [W_{1,1} … W_{1,m}]; for :func:`fused_wasserstein_terms` the per-modality projections
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

from .triton_helpers import (DOT_PRECISION, activation, activation_code, activation_grad,
                             activation_grad2, block_size, critic_tail, interpreter_enabled,
                             tile_configs)


#: Interpreter (CPU) launch: one small fixed config, few programs (so the persistent loop
#: runs more than one tile per program in the tests).
_INTERP_BLOCK_N = 16
_INTERP_PROGRAMS = 2


@triton.jit
def _load_matrix(ptr, rows, cols, n_rows, n_cols):
    """Row-major n_rows × n_cols matrix as a zero-padded [len(rows), len(cols)] block."""
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    return tl.load(ptr + rows[:, None] * n_cols + cols[None, :], mask=mask, other=0.0)


@triton.jit
def _gp_kernel(
    sj_ptr, sm_ptr, mi_ptr, eps_ptr, b1_ptr, wmat_ptr, w2_ptr, b2_ptr, wout_ptr,
    part_ptr, dsj_ptr, dsm_ptr,
    N, JB, H1, H2, K, inv_n, N_BUCKET, PSTRIDE,
    M_TERMS: tl.constexpr, GATHER: tl.constexpr, ATOMIC: tl.constexpr,
    TWO_LAYERS: tl.constexpr, GRAM: tl.constexpr, ONE_SIDED: tl.constexpr,
    ACT: tl.constexpr, COMPUTE_GRAD: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_N: tl.constexpr, BH1: tl.constexpr, BH2: tl.constexpr, BK: tl.constexpr,
    BHO: tl.constexpr,
):
    """GP partial sums (and, with COMPUTE_GRAD, every gradient) — see the module docstring.

    sj: (JB, H1) joint pre-projections, row n reads row n % JB.  sm: marginal source rows;
    with GATHER row n sums rows mi[t, n] for t < M_TERMS, else reads row n.  wmat: G (H1×H1,
    GRAM) or W_1 (H1×K).  Partials are written at this program's slot (padded blocks).
    """
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    num_tiles = tl.cdiv(N, BLOCK_N)
    CURVED: tl.constexpr = ACT >= 2          # σ'' ≠ 0 (tanh, softplus, gelu)

    offs_n = tl.arange(0, BLOCK_N)
    c1 = tl.arange(0, BH1)
    ck = tl.arange(0, BK)
    c2 = tl.arange(0, BH2)
    co = tl.arange(0, BHO)
    m1 = c1 < H1

    # Vectors: loaded once per program.  The matrices (G or W_1, W_2) are re-read per tile
    # inside the loop (L2-resident): hoisted, every tl.dot operand layout of them would keep
    # its own shared-memory copy alive for the whole loop (> 228 KB at H = 128 on sm_90).
    b1 = tl.load(b1_ptr + c1, mask=m1, other=0.0)
    if TWO_LAYERS:
        b2 = tl.load(b2_ptr + c2, mask=c2 < H2, other=0.0)
        wout = tl.load(wout_ptr + c2, mask=c2 < H2, other=0.0)
    else:
        wout = tl.load(wout_ptr + c1, mask=m1, other=0.0)

    loss_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    db1_acc = tl.zeros([BH1], dtype=tl.float32)
    dwout_acc = tl.zeros([BHO], dtype=tl.float32)
    if GRAM:
        dwmat_acc = tl.zeros([BH1, BH1], dtype=tl.float32)
    else:
        dwmat_acc = tl.zeros([BH1, BK], dtype=tl.float32)
    dw2_acc = tl.zeros([BH2, BH1], dtype=tl.float32)
    db2_acc = tl.zeros([BH2], dtype=tl.float32)

    for tile in range(pid, num_tiles, nprog):
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
        if GRAM:
            wmat = _load_matrix(wmat_ptr, c1, c1, H1, H1)      # G, symmetric
        else:
            wmat = _load_matrix(wmat_ptr, c1, ck, H1, K)       # W_1
        if TWO_LAYERS:
            w2 = _load_matrix(w2_ptr, c2, c1, H2, H1)          # W_2 (H2 × H1)
        a1 = e[:, None] * pj + (1.0 - e)[:, None] * pm + b1[None, :]
        d1 = activation_grad(a1, ACT)
        # ---- u = ∂T/∂a_1 (padded columns are 0: w_out / W_2 are zero-padded) ----
        if TWO_LAYERS:
            h1 = activation(a1, ACT)
            a2 = tl.dot(h1, tl.trans(w2), input_precision=DOT_PREC) + b2[None, :]
            d2 = activation_grad(a2, ACT)
            v = wout[None, :] * d2                                       # (BN, BH2)
            q = tl.dot(v, w2, input_precision=DOT_PREC)                  # W_2ᵀ v
            u = q * d1
        else:
            u = wout[None, :] * d1
        # ---- s = ‖W_1ᵀ u‖² ----
        if GRAM:
            gu = tl.dot(u, wmat, input_precision=DOT_PREC)               # G u
            s = tl.sum(u * gu, axis=1)
        else:
            g = tl.dot(u, wmat, input_precision=DOT_PREC)                # (W_1ᵀ u)ᵀ
            s = tl.sum(g * g, axis=1)
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
            bu = beta[:, None] * u
            if GRAM:
                r = beta[:, None] * gu                                   # β G u
                dwmat_acc += 0.5 * tl.dot(tl.trans(bu), u, input_precision=DOT_PREC)
            else:
                r = tl.dot(beta[:, None] * g, tl.trans(wmat), input_precision=DOT_PREC)
                dwmat_acc += tl.dot(tl.trans(bu), g, input_precision=DOT_PREC)
            if TWO_LAYERS:
                dq = r * d1
                dw2_acc += tl.dot(tl.trans(v), dq, input_precision=DOT_PREC)
                dv = tl.dot(dq, tl.trans(w2), input_precision=DOT_PREC)  # W_2 dq
                dwout_acc += tl.sum(dv * d2, axis=0)
                if CURVED:
                    delta2 = dv * wout[None, :] * activation_grad2(a2, ACT)
                    dw2_acc += tl.dot(tl.trans(delta2), h1, input_precision=DOT_PREC)
                    db2_acc += tl.sum(delta2, axis=0)
                    delta1 = r * q * activation_grad2(a1, ACT) \
                        + tl.dot(delta2, w2, input_precision=DOT_PREC) * d1
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

    # ---- one partial row per program (padded blocks; the host sums the rows once) ----
    # row layout [loss | b1 (BH1) | w_out (BHO) | G or W_1 (BH1 × BK) | W_2 (BH2 × BH1) | b2]
    row = part_ptr + pid * PSTRIDE
    tl.store(row, tl.sum(loss_acc, axis=0) * inv_n)
    if COMPUTE_GRAD:
        tl.store(row + 1 + c1, db1_acc)
        tl.store(row + 1 + BH1 + co, dwout_acc)
        o_mat = 1 + BH1 + BHO
        tl.store(row + o_mat + c1[:, None] * BK + ck[None, :], dwmat_acc)
        if TWO_LAYERS:
            o_w2 = o_mat + BH1 * BK
            tl.store(row + o_w2 + c2[:, None] * BH1 + c1[None, :], dw2_acc)
            tl.store(row + o_w2 + BH2 * BH1 + c2, db2_acc)


# The weight-gradient accumulators (H_1 × H_1 or H_1 × K, and H_2 × H_1 with two layers)
# live in registers for the whole persistent loop, so the warps, not the tile, decide the
# register budget.  ptxas for sm_90 (H = 128, python/compile_sm90.py), 8 warps, BLOCK_N = 16:
# relu spills 0-340 bytes with one hidden layer and 1-1.9 kB with two, gelu 0.5-1.8 kB and
# 5-7 kB; 4 warps or BLOCK_N = 64 spill more.  So: 8 warps, BLOCK_N 16 or 32.  (The fix for
# the curved / two-layer cases is to keep those accumulators in global memory.)
_GPU_CONFIGS = [
    triton.Config({"BLOCK_N": bn}, num_warps=8, num_stages=1) for bn in (16, 32)
]

_gp_kernel_tuned = triton.autotune(
    configs=tile_configs(_GPU_CONFIGS, triton.Config({"BLOCK_N": 16}, num_warps=8,
                                                     num_stages=1)),
    key=["H1", "H2", "K", "N_BUCKET", "M_TERMS", "TWO_LAYERS", "GRAM", "ACT", "COMPUTE_GRAD"],
    reset_to_zero=["dsj_ptr", "dsm_ptr"],
)(_gp_kernel)


def _num_programs(n: int, device: torch.device) -> int:
    """Persistent grid size (independent of the tuned BLOCK_N, so every partial slot is
    written by every config)."""
    tiles_min = triton.cdiv(n, 16)
    if interpreter_enabled() or device.type != "cuda":
        return max(1, min(_INTERP_PROGRAMS, tiles_min))
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(2 * sms, tiles_min))


def _launch(sj, sm, mi, eps, b1, wmat, w2, b2, wout, jb, gram, one_sided, act, compute_grad,
            atomic):
    """Run the kernel; returns (gp, grads) with grads None unless ``compute_grad``."""
    device = sj.device
    n = eps.shape[0]
    h1 = sj.shape[1]
    two_layers = w2 is not None
    h2 = w2.shape[0] if two_layers else 1
    k = wmat.shape[1]
    bh1, bh2 = block_size(h1), block_size(h2)
    bk = bh1 if gram else block_size(k)
    bho = bh2 if two_layers else bh1
    progs = _num_programs(n, device)
    f32 = dict(device=device, dtype=torch.float32)
    # one partial row per program, written whole by it (no zero-fill), summed by one launch
    pstride = 1
    if compute_grad:
        pstride += bh1 + bho + bh1 * bk + ((bh2 * bh1 + bh2) if two_layers else 0)
        dsj = torch.zeros_like(sj)   # rows are only written on curved activations / scattered
        dsm = torch.zeros_like(sm)
    parts = torch.empty(progs, pstride, **f32)
    if not compute_grad:
        dsj = dsm = parts
    gather = mi is not None
    args = (sj, sm, mi if gather else eps, eps, b1, wmat,
            w2 if two_layers else wout, b2 if two_layers else wout, wout,
            parts, dsj, dsm, n, jb, h1, h2, k, 1.0 / n, triton.next_power_of_2(n), pstride)
    meta = dict(M_TERMS=mi.shape[0] if gather else 1, GATHER=gather, ATOMIC=atomic,
                TWO_LAYERS=two_layers, GRAM=gram, ONE_SIDED=bool(one_sided), ACT=act,
                COMPUTE_GRAD=compute_grad, DOT_PREC=DOT_PRECISION, BH1=bh1, BH2=bh2, BK=bk,
                BHO=bho)
    if interpreter_enabled():
        _gp_kernel[(progs,)](*args, **meta, BLOCK_N=_INTERP_BLOCK_N, num_warps=4)
    else:
        _gp_kernel_tuned[(progs,)](*args, **meta)
    total = parts.sum(0)
    gp = total[0]
    if not compute_grad:
        return gp, None
    o_mat = 1 + bh1 + bho
    o_w2 = o_mat + bh1 * bk
    grads = [dsj, dsm, total[1:1 + h1],
             total[o_mat:o_w2].view(bh1, bk)[:h1, :k],
             total[o_w2:o_w2 + bh2 * bh1].view(bh2, bh1)[:h2, :h1] if two_layers else None,
             total[o_w2 + bh2 * bh1:o_w2 + bh2 * bh1 + h2] if two_layers else None,
             total[1 + bh1:1 + bh1 + (h2 if two_layers else h1)]]
    return gp, grads


class FusedGradientPenalty(torch.autograd.Function):
    """GP from (joint source, marginal source, critic weights) -> 0-dim float32.

    Inputs (all float32, contiguous): sj (JB, H1), sm (R, H1), b1 (H1,), wmat (G or W_1),
    w2 / b2 (second hidden layer or None), wout (H_last,), eps (N,), mi (M, N) int32 gather
    indices into sm or None.  The forward computes the gradients in the same pass when any
    input needs one; backward only scales them by grad_output (once differentiable).
    """

    @staticmethod
    def forward(ctx, sj, sm, b1, wmat, w2, b2, wout, eps, mi, jb, gram, one_sided, act, atomic):
        compute_grad = any(ctx.needs_input_grad[:7])
        gp, grads = _launch(sj, sm, mi, eps, b1, wmat, w2, b2, wout, jb, gram, one_sided, act,
                            compute_grad, atomic)
        if compute_grad:
            ctx.save_for_backward(*[t for t in grads if t is not None])
            ctx.has_second = w2 is not None
        return gp

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        saved = list(ctx.saved_tensors)  # dsj, dsm, db1, dwmat, (dw2, db2,) dwout
        # one multi-tensor launch scales every saved gradient
        scaled = iter(torch._foreach_mul(saved, grad_out.to(torch.float32)))
        if ctx.has_second:
            grads = [next(scaled) for _ in range(7)]
        else:
            grads = [next(scaled) for _ in range(4)] + [None, None, next(scaled)]
        return (*grads, None, None, None, None, None, None, None)


def _first_weight(critic) -> torch.Tensor:
    """W_1 = [W_{1,1} … W_{1,m}] (H1 × D, float32), differentiable."""
    return torch.cat([w.float() for w in critic.first_weights], dim=1)


def _critic_weights(critic, w1=None):
    """(b1, wmat, gram, w2, b2, wout) in float32, differentiable w.r.t. the critic
    (``w1``: :func:`_first_weight`, when the caller already has it)."""
    if len(critic.hidden) > 2:
        raise ValueError("the fused gradient penalty supports 1 or 2 hidden layers")
    ws, bs, wout, _ = critic_tail(critic)
    w1 = _first_weight(critic) if w1 is None else w1                    # H1 × D
    gram = sum(critic.dims) > critic.hidden[0]
    wmat = (w1 @ w1.t()).contiguous() if gram else w1.contiguous()
    w2 = ws[0] if ws else None
    b2 = bs[0] if bs else None
    return critic.first_bias.float().contiguous(), wmat, gram, w2, b2, wout


def _penalty(critic, sj, sm, mi, eps, jb, one_sided, atomic, w1=None):
    b1, wmat, gram, w2, b2, wout = _critic_weights(critic, w1)
    eps = eps.detach().to(device=sj.device, dtype=torch.float32).contiguous()
    return FusedGradientPenalty.apply(sj.contiguous(), sm.contiguous(), b1, wmat, w2, b2, wout,
                                      eps, mi, jb, gram, bool(one_sided),
                                      activation_code(critic), atomic)


@torch.compiler.disable
def fused_gradient_penalty(critic, joint, marginal, eps, one_sided) -> torch.Tensor:
    """WGAN-GP of an ``MLPCritic`` at x̂ = ε·joint + (1 − ε)·marginal (validated per-modality
    tensors N × d_k, ε of shape (N,)); 0-dim float32, differentiable w.r.t. the critic's
    parameters and every joint/marginal tensor (see the module docstring)."""
    # Σ_k x_k W_{1,k}ᵀ = [x_1 … x_m] W_1ᵀ: the joint and the marginal rows' first
    # pre-activations (bias excluded) from one GEMM on the concatenated inputs
    n = joint[0].shape[0]
    w1 = _first_weight(critic)
    rows = torch.cat([torch.cat(list(joint), dim=1), torch.cat(list(marginal), dim=1)])
    sj, sm = (rows.float() @ w1.t()).chunk(2)   # split: one concatenation in the backward
    return _penalty(critic, sj, sm, None, eps, n, one_sided, atomic=False, w1=w1)


def fused_penalty_from_projections(critic, stacked, gp_perms, eps, one_sided):
    """The GP of ``wasserstein_loss`` from the estimator's projections ``stacked``
    (m × B × H_1, differentiable): GP row n = k·B + i interpolates joint row i
    (pre-activation Σ_j P_j[i]) with marginal sample (k, i) (Σ_j P_j[gp_perms[k, j, i]]),
    ε = eps[n]; so the penalty needs no projection GEMM of its own."""
    m, b = stacked.shape[0], stacked.shape[1]
    kp = gp_perms.shape[0]
    sj = stacked.sum(0)                                        # joint rows Σ_j P_j[i]
    sm = stacked.reshape(m * b, -1)                            # row j·B + r = P_j[r]
    offsets = torch.arange(m, device=gp_perms.device).unsqueeze(1) * b
    mi = (gp_perms.permute(1, 0, 2).reshape(m, kp * b) + offsets).to(torch.int32).contiguous()
    return _penalty(critic, sj, sm, mi, eps, b, one_sided, atomic=True)


__all__ = ["fused_gradient_penalty", "fused_penalty_from_projections", "FusedGradientPenalty"]

"""Estimator terms as reductions of critic scores, shared by every Triton kernel family.

Each estimator term is a reduction of the scores (``reference/estimators.py`` has the table):

    mean_S f(T)             f = T (joint, Wasserstein), −softplus(−T) (JS joint), softplus(T)
    LSE_S T = log Σ_S e^T   DV: LSE − log N;   NWJ: exp(LSE − log N − 1)
    mean_i LSE_c T(i, c)    InfoNCE (row-wise log-sum-exp over the candidates of anchor i)

and its derivative with respect to each score is g_s = scale · φ(T_s):

    f = T: φ = 1;  JS joint: φ = sigmoid(−T);  JS marginal: φ = sigmoid(T)
    DV:   ∂(LSE − log N)/∂T_s = e^{T_s − LSE}                 (shift = LSE)
    NWJ:  ∂ exp(LSE − log N − 1)/∂T_s = e^{T_s − 1 − log N}   (shift = 1 + log N)
    InfoNCE: ∂/∂T_{i,c} = e^{T_{i,c} − LSE_i} / B              (shift = saved LSE_i)

The tables below say, per estimator, which reduction of the marginal scores a forward launch
makes (``RED_*``) and which φ its backward applies (``G_*``); :func:`marginal_value` turns a
launch's per-program partials into the term, :func:`marginal_grad_args` gives the backward's
(φ, scale, shift) as device tensors (no host synchronisation).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

RED_SUM, RED_NEG_SOFTPLUS_NEG, RED_SOFTPLUS, RED_LSE, RED_LSE_ROW = 0, 1, 2, 3, 4
G_ONE, G_EXP_SHIFT, G_EXP_ROW, G_SIGMOID, G_SIGMOID_NEG = 0, 1, 2, 3, 4

NEG_BIG_VALUE = -1.0e30  # "minus infinity" that keeps e^{m − m'} finite (no inf − inf)
NEG_BIG = tl.constexpr(NEG_BIG_VALUE)


@triton.jit
def score_grad(t, valid, scale, shift, GMODE: tl.constexpr):
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


def combine_lse(stats):
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
        lse = combine_lse(stats)
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

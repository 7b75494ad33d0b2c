"""Pure-PyTorch dependency estimators: the correctness oracle for every fused backend.

Notation: T is the critic, J = {(z_1[i], ..., z_m[i])} the B joint samples and M the marginal
(product-of-marginals) samples chosen by ``negatives``/``perms`` (see
:mod:`mdm_kernels.negatives`).  Every bound is split into a *joint term* and a *marginal
term*, bound = joint_term − marginal_term, because that is what the fused kernels reduce:

==============  =========================  ===========================================
estimator       joint term                 marginal term
==============  =========================  ===========================================
``dv``          mean_J T                   log mean_M exp T     (Donsker–Varadhan, MINE)
``nwj``         mean_J T                   mean_M exp(T − 1)    (Nguyen–Wainwright–Jordan)
``js``          mean_J −softplus(−T)       mean_M softplus(T)   (f-GAN / Deep InfoMax JS)
``infonce``     mean_i T(i, i)             mean_i log mean_{c∈C_i} exp T(i, c)
``wasserstein`` mean_J T                   mean_M T             (Wasserstein dependency)
==============  =========================  ===========================================

References: Donsker & Varadhan (1983); Belghazi et al., "MINE", ICML 2018; Nguyen, Wainwright
& Jordan, IEEE TIT 2010; Nowozin et al., "f-GAN", NeurIPS 2016; Hjelm et al., "Deep
InfoMax", ICLR 2019; van den Oord et al., "CPC/InfoNCE", 2018; Ozair et al., "Wasserstein
Dependency Measure", NeurIPS 2019; Colombo et al., EMNLP 2021, Sec. 3.

Log-sum-exp is always taken with the maximum subtracted, so scores of ±1e4 do not overflow.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from .._validation import check_zs, compute_dtype
from ..negatives import MarginalSamples, all_grid_indices, product_of_marginals

#: Estimator kinds, in the order of the table above.
KINDS = ("dv", "nwj", "js", "infonce", "wasserstein")


def score_rows(critic, zs: Sequence[torch.Tensor], rows: torch.Tensor) -> torch.Tensor:
    """Scores T(z_1[rows[0, n]], ..., z_m[rows[m-1, n]]) for every column n of ``rows``.

    ``rows`` is a LongTensor (m, N); returns (N,) in the computation dtype.
    """
    dtype = compute_dtype(critic, zs)
    gathered = [z.index_select(0, r).to(dtype) for z, r in zip(zs, rows)]
    return critic(*gathered).to(dtype)


def marginal_scores(critic, zs: Sequence[torch.Tensor], samples: MarginalSamples) -> torch.Tensor:
    """Scores of every marginal sample: shape (K·B,) in (k, i) order, or (B^m,) for ``"all"``
    in the row-major order of :func:`~mdm_kernels.negatives.all_grid_indices`."""
    if samples.is_all:
        rows = all_grid_indices(samples.batch_size, samples.num_modalities, 0,
                                samples.num_samples, device=zs[0].device)
    else:
        rows = samples.perms.permute(1, 0, 2).reshape(samples.num_modalities, -1)
    return score_rows(critic, zs, rows)


def log_mean_exp(scores: torch.Tensor, dim=None) -> torch.Tensor:
    """log((1/n) Σ exp(scores)) with the maximum subtracted (finite for scores of ±1e4)."""
    if dim is None:
        scores, dim = scores.reshape(-1), 0
    return torch.logsumexp(scores, dim=dim) - math.log(scores.shape[dim])


def infonce_scores(critic, zs: Sequence[torch.Tensor], samples: MarginalSamples) -> torch.Tensor:
    """Candidate scores for InfoNCE: a (B, C) matrix whose row i holds T(i, c) for c ∈ C_i.

    ``"all"``: C_i = every row j (C = B).  Shuffles/perms: C_i = {i} ∪ {perms[k, 1, i]}_k
    (C = K + 1), the candidate modalities 2..m staying together.
    """
    b, m = samples.batch_size, samples.num_modalities
    device = zs[0].device
    anchor = torch.arange(b, device=device)
    if samples.is_all:
        cand = anchor.repeat(b)              # candidate j varies fastest
        anc = anchor.repeat_interleave(b)
        ncols = b
    else:
        cand = torch.cat([anchor.unsqueeze(0), samples.perms[:, 1]], dim=0).t().reshape(-1)
        ncols = samples.perms.shape[0] + 1
        anc = anchor.repeat_interleave(ncols)
    rows = torch.stack([anc] + [cand] * (m - 1))
    return score_rows(critic, zs, rows).reshape(b, ncols)


def dependency_terms(kind: str, critic, zs: Sequence[torch.Tensor],
                     samples: MarginalSamples) -> tuple[torch.Tensor, torch.Tensor]:
    """(joint_term, marginal_term) of estimator ``kind``; the bound is their difference."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    joint = score_rows(critic, zs, torch.arange(zs[0].shape[0], device=zs[0].device)
                       .expand(len(zs), -1))
    if kind == "infonce":
        return joint.mean(), log_mean_exp(infonce_scores(critic, zs, samples), dim=1).mean()
    marg = marginal_scores(critic, zs, samples)
    if kind == "dv":
        return joint.mean(), log_mean_exp(marg)
    if kind == "nwj":
        # mean exp(T − 1) = exp(log mean exp T − 1): overflows only if the value itself does.
        return joint.mean(), torch.exp(log_mean_exp(marg) - 1.0)
    if kind == "js":
        return (-F.softplus(-joint)).mean(), F.softplus(marg).mean()
    return joint.mean(), marg.mean()  # wasserstein


def resolve_samples(kind: str, zs: Sequence[torch.Tensor], negatives, perms,
                    generator) -> MarginalSamples:
    """The marginal samples estimator ``kind`` uses (InfoNCE keeps candidates together).

    ``negatives=None`` is each estimator's default: ``"all"`` for InfoNCE (the standard
    B-candidate estimator), ``"shuffle"`` otherwise; ``perms`` overrides it.
    """
    if negatives is None:
        negatives = "all" if kind == "infonce" and perms is None else "shuffle"
    return product_of_marginals(zs[0].shape[0], len(zs), negatives, perms, generator,
                                device=zs[0].device, candidates_together=(kind == "infonce"))


def _reference_bound(kind: str, default_negatives="shuffle"):
    def bound(critic, *zs, negatives=default_negatives, perms=None, generator=None):
        zs = check_zs(critic, zs)
        samples = resolve_samples(kind, zs, negatives, perms, generator)
        joint, marginal = dependency_terms(kind, critic, zs, samples)
        return joint - marginal

    bound.__name__ = f"{kind}_bound"
    bound.__doc__ = f"Reference {kind} bound (see :mod:`mdm_kernels.reference.estimators`)."
    return bound


dv_bound = _reference_bound("dv")
nwj_bound = _reference_bound("nwj")
js_bound = _reference_bound("js")
infonce_bound = _reference_bound("infonce", default_negatives=None)
wasserstein_dependency = _reference_bound("wasserstein")

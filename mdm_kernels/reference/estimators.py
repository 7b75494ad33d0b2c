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

``negatives="distinct"`` takes M over the combinations of pairwise distinct row indices (the
U-statistic form of the product-of-marginals expectation, B(B−1)···(B−m+1) samples) instead of
the whole B^m grid of ``"all"``, whose coinciding indices (the joint diagonal, for m ≥ 3 the
partial coincidences) bias the marginal term towards the joint.  For InfoNCE it gives anchor
i the B − 1 candidates j ≠ i: the positive leaves the partition function, so the value is no
longer capped at log B — and no longer a lower bound on the mutual information for every
critic (a critic that scores only the positives high makes it arbitrarily large).  With the
optimal critic (the pointwise mutual information) it is the leave-one-out *upper* bound
I_L1Out of Poole et al., "On Variational Bounds of Mutual Information", ICML 2019, Eq. 13;
with the positive included (``"all"``) it is van den Oord et al.'s InfoNCE lower bound
(Poole et al. 2019, Eq. 12).

Log-sum-exp is always taken with the maximum subtracted, so scores of ±1e4 do not overflow.

Memory: the reference scores every sample in one batched pass, so its working memory grows
with the number of samples — B^m for ``"all"``.  Before scoring, :func:`check_memory`
compares :func:`reference_bytes` (a stated estimate) with the device's available memory (or
the limit ``MDM_REFERENCE_MAX_BYTES``) and raises :class:`GridTooLarge` naming the size and
the alternatives (``backend="chunked"``: the same estimators in O(B·H) memory) instead of
letting the process be killed for memory.
"""
from __future__ import annotations

import math
import os
from typing import Sequence

import torch
import torch.nn.functional as F

from .._validation import check_zs, compute_dtype
from ..negatives import (MarginalSamples, all_grid_indices, distinct_mask,
                         product_of_marginals)

#: Estimator kinds, in the order of the table above.
KINDS = ("dv", "nwj", "js", "infonce", "wasserstein")

#: Environment variable: the working memory, in bytes, the reference may plan for (e.g.
#: ``8e9``); unset, the device's available memory (CPU: MemAvailable of /proc/meminfo; CUDA:
#: free memory plus the caching allocator's unused blocks).
MAX_BYTES_ENV = "MDM_REFERENCE_MAX_BYTES"

#: Without ``MDM_REFERENCE_MAX_BYTES`` the available memory is read only for estimates above
#: this (256 MiB): small batches never touch /proc or the driver.
_CHECK_FROM_BYTES = 256 << 20

#: Safety factor of :func:`reference_bytes` over the allocator model (allocator slack, RSS).
_MARGIN = 1.2


class GridTooLarge(MemoryError):
    """The reference would need more working memory than the limit to score its samples in
    one pass (raised before anything is allocated; the message names the size and the
    alternatives)."""


def reference_bytes(critic, zs: Sequence[torch.Tensor], num_scored: int,
                    grid_cells: int) -> int:
    """Predicted peak working memory (bytes) of the reference's forward + backward scoring
    ``num_scored`` samples in one pass, the grid's index tensors over ``grid_cells`` cells:

        1.2 · [num_scored · s · (Σ_k d_k + 3·H_1 + Σ_{l ≥ 2} H_l + 2) + grid_cells · 8 · (2m + 2)]

    s = 4 (8 in float64) bytes: the gathered inputs, the first layer's projections,
    pre-activation and activation (and their gradients, live one at a time), the later
    layers, and the int64 row indices of the grid (flat id, m decoded rows and their stack).
    A callable critic without ``hidden`` counts the gathered inputs only.  Calibrated on
    torch's CPU allocator (torch 2.13, DV, ``"all"``, forward + backward): m = 2,
    d = H = 128: 2,588 bytes per sample measured, 2,616 modelled (3,139 with the margin;
    max RSS 2,960); m = 3, d = 64, H = 128: 2,330 measured, 2,376 modelled; a second hidden
    layer of 128: +516 measured, +512 modelled."""
    s = 8 if compute_dtype(critic, zs) == torch.float64 else 4
    d = sum(int(z.shape[1]) for z in zs)
    hidden = tuple(getattr(critic, "hidden", ()) or ())
    per_sample = d + 2
    if hidden:
        per_sample += 3 * hidden[0] + sum(hidden[1:])
    m = len(zs)
    return int(_MARGIN * (num_scored * s * per_sample + grid_cells * 8 * (2 * m + 2)))


@torch.compiler.assume_constant_result
def _available_bytes(device_type: str, index: int) -> int:
    """Free memory of the device in bytes, or −1 where unknown.  CPU: MemAvailable of
    /proc/meminfo (else the available physical pages); CUDA: free memory plus the caching
    allocator's reserved-but-unused bytes.  A constant under ``torch.compile`` (read at
    trace time, no graph break)."""
    if device_type == "cpu":
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            pass
        try:
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return -1
    if device_type == "cuda":
        free, _ = torch.cuda.mem_get_info(index)
        return int(free + torch.cuda.memory_reserved(index) - torch.cuda.memory_allocated(index))
    return -1


def memory_limit(device: torch.device, needed: int) -> tuple[int | None, str]:
    """(limit in bytes or None, where it comes from): ``MDM_REFERENCE_MAX_BYTES`` when set,
    else the device's available memory (read only when ``needed`` ≥ 256 MiB)."""
    env = os.environ.get(MAX_BYTES_ENV)
    if env:
        try:
            value = int(float(env))
        except ValueError:
            raise ValueError(f"{MAX_BYTES_ENV} must be a number of bytes (e.g. 8e9), "
                             f"got {env!r}") from None
        return value, f"limit {MAX_BYTES_ENV}={env}"
    if needed < _CHECK_FROM_BYTES:
        return None, ""
    avail = _available_bytes(device.type, device.index or 0)
    if avail < 0:
        return None, ""
    return avail, f"memory available on {device.type} now"


def _fmt_bytes(n: int) -> str:
    return f"{n / 1024 ** 3:.1f} GiB" if n >= 1024 ** 3 else f"{n / 1024 ** 2:.1f} MiB"


def check_memory(kind: str, critic, zs: Sequence[torch.Tensor], samples: MarginalSamples) -> None:
    """Raise :class:`GridTooLarge` when :func:`reference_bytes` of this call exceeds
    :func:`memory_limit` — before the reference allocates anything."""
    b, m = samples.batch_size, samples.num_modalities
    if kind == "infonce":
        marginal = b * (b - 1 if samples.distinct else b) if samples.perms is None \
            else b * (samples.perms.shape[0] + 1)
        cells = b * b if samples.perms is None else 0
    else:
        marginal = samples.num_samples
        cells = b ** m if samples.perms is None else 0
    needed = reference_bytes(critic, zs, b + marginal, cells)
    limit, source = memory_limit(zs[0].device, needed)
    if limit is None or needed <= limit:
        return
    mode = ("distinct" if samples.distinct else "all") if samples.perms is None \
        else f"{samples.perms.shape[0]} shuffle(s)"
    raise GridTooLarge(
        f"backend='reference' would score {b + marginal:,} samples in one pass ({kind}, "
        f"negatives={mode!r}, B={b}, m={m}): about {_fmt_bytes(needed)} of working memory "
        f"(reference_bytes), more than the {_fmt_bytes(limit)} {source}.  Alternatives: "
        f"backend='chunked' (the same estimator block by block, O(B·H) memory, an MLPCritic "
        f"with at most 2 hidden layers) or backend='auto' (picks it, or the fused kernels on a "
        f"GPU); a smaller batch; negatives='shuffle' or an int K; or set {MAX_BYTES_ENV} "
        f"(bytes) to plan for more memory.")


def score_rows(critic, zs: Sequence[torch.Tensor], rows: torch.Tensor) -> torch.Tensor:
    """Scores T(z_1[rows[0, n]], ..., z_m[rows[m-1, n]]) for every column n of ``rows``.

    ``rows`` is a LongTensor (m, N); returns (N,) in the computation dtype.
    """
    dtype = compute_dtype(critic, zs)
    gathered = [z.index_select(0, r).to(dtype) for z, r in zip(zs, rows)]
    return critic(*gathered).to(dtype)


def marginal_rows(samples: MarginalSamples, device) -> torch.Tensor:
    """Row indices (m, N) of every marginal sample: the shuffles in (k, i) order, or the grid
    in the row-major order of :func:`~mdm_kernels.negatives.all_grid_indices` — for
    ``"distinct"`` the B^m grid with the columns whose indices coincide masked out, leaving
    the B(B−1)···(B−m+1) combinations of pairwise distinct indices."""
    if samples.perms is not None:
        return samples.perms.permute(1, 0, 2).reshape(samples.num_modalities, -1)
    b, m = samples.batch_size, samples.num_modalities
    rows = all_grid_indices(b, m, 0, b ** m, device=device)
    if samples.distinct:
        rows = rows[:, distinct_mask(rows)]
    if rows.shape[1] != samples.num_samples:  # the grid and the count must agree
        raise AssertionError(f"{rows.shape[1]} grid samples, expected {samples.num_samples}")
    return rows


def marginal_scores(critic, zs: Sequence[torch.Tensor], samples: MarginalSamples) -> torch.Tensor:
    """Scores of every marginal sample, (``samples.num_samples``,), in the order of
    :func:`marginal_rows`: (K·B,) for shuffles, (B^m,) for ``"all"``,
    (B(B−1)···(B−m+1),) for ``"distinct"``."""
    return score_rows(critic, zs, marginal_rows(samples, zs[0].device))


def log_mean_exp(scores: torch.Tensor, dim=None) -> torch.Tensor:
    """log((1/n) Σ exp(scores)) with the maximum subtracted (finite for scores of ±1e4)."""
    if dim is None:
        scores, dim = scores.reshape(-1), 0
    return torch.logsumexp(scores, dim=dim) - math.log(scores.shape[dim])


def infonce_scores(critic, zs: Sequence[torch.Tensor], samples: MarginalSamples) -> torch.Tensor:
    """Candidate scores for InfoNCE: a (B, C) matrix whose row i holds T(i, c) for c ∈ C_i.

    ``"all"``: C_i = every row j (C = B).  ``"distinct"``: C_i = every row j ≠ i (C = B − 1,
    the positive masked out of the anchor's row of the B × B grid).  Shuffles/perms:
    C_i = {i} ∪ {perms[k, 1, i]}_k (C = K + 1).  The candidate modalities 2..m stay together.
    """
    b, m = samples.batch_size, samples.num_modalities
    device = zs[0].device
    anchor = torch.arange(b, device=device)
    if samples.perms is None:
        cand = anchor.repeat(b)              # candidate j varies fastest
        anc = anchor.repeat_interleave(b)
        ncols = b
        if samples.distinct:
            off_diagonal = anc != cand
            cand, anc, ncols = cand[off_diagonal], anc[off_diagonal], b - 1
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
    check_memory(kind, critic, zs, samples)
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

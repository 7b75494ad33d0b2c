"""Samples from the product of marginals: which rows of each modality form a negative sample.

A *joint* sample is an aligned row (z_1[i], ..., z_m[i]).  A *marginal* (negative) sample
breaks the alignment, (z_1[i_1], ..., z_m[i_m]), so that it is distributed (empirically) as
the product of the marginals p(z_1)···p(z_m).  The ``negatives`` argument of every estimator
chooses them:

* ``"shuffle"``  one random permutation π_k per modality k ≥ 2 (modality 1 stays in order):
  (z_1[i], z_2[π_2(i)], ..., z_m[π_m(i)]),  B samples.
* int ``K`` ≥ 1  K independent shuffles, K·B samples.
* ``"all"``      every combination (i_1, ..., i_m) ∈ [B]^m: the exact product of the empirical
  marginals, B^m samples.  Never materialised by the fused kernels.  It includes the
  combinations whose indices coincide — the joint diagonal (i, ..., i) and, for m ≥ 3, the
  partial coincidences — which are not samples of the product of marginals, so it is a
  V-statistic biased towards the joint (the DV bound is biased low).
* ``"distinct"`` every combination of pairwise *distinct* indices: the U-statistic form,
  B(B−1)···(B−m+1) samples (B(B−1) for m = 2, B(B−1)(B−2) for m = 3; needs B ≥ m).
* ``perms``      an explicit LongTensor (K, m, B): sample (k, i) takes row ``perms[k, j, i]``
  of modality j.  Overrides the random draw (for reproducibility and testing).

For InfoNCE the first modality is the anchor and the others stay together as the candidate:
sample (k, i) pairs anchor i with candidate row ``perms[k, 1, i]`` of every other modality,
so an explicit ``perms`` must have ``perms[:, 0]`` = 0..B-1 and ``perms[:, j]`` equal for j ≥ 1.
``"all"`` gives anchor i the B candidates j (the positive included), ``"distinct"`` the B − 1
candidates j ≠ i (needs B ≥ 2).

Randomness comes only from the ``generator`` passed in (or the default generator of the data's
device when it is ``None``); given ``perms`` everything is deterministic.  On CPU the shuffles
are ``torch.randperm`` draws; on a GPU one batched draw (:func:`batched_permutations`), so the
same seed gives different (equally uniform) shuffles on the two devices — as ``randperm``
itself does.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ._validation import require_values


@dataclass(frozen=True)
class MarginalSamples:
    """Resolved choice of marginal samples.

    ``perms`` is a LongTensor (K, m, B) on the data's device, or ``None`` for an implicit
    grid: every combination (``"all"``, ``distinct=False``) or every combination of pairwise
    distinct indices (``"distinct"``, ``distinct=True``).  ``num_samples`` is K·B, B^m or the
    falling factorial B(B−1)···(B−m+1) (the estimators' marginal samples; InfoNCE's candidate
    pairs are B·B for ``"all"`` and B(B−1) for ``"distinct"``).  ``is_all`` is True for
    ``"all"`` only.
    """

    perms: torch.Tensor | None
    batch_size: int
    num_modalities: int
    distinct: bool = False

    def __post_init__(self):
        if self.distinct and self.perms is not None:
            raise ValueError("MarginalSamples: distinct=True is an implicit grid, perms must be None")

    @property
    def is_all(self) -> bool:
        return self.perms is None and not self.distinct

    @property
    def num_samples(self) -> int:
        if self.distinct:
            return math.perm(self.batch_size, self.num_modalities)
        if self.perms is None:
            return self.batch_size ** self.num_modalities
        return self.perms.shape[0] * self.perms.shape[2]


def draw_shuffles(batch_size: int, num_modalities: int, num_shuffles: int, generator,
                  device, candidates_together: bool = False) -> torch.Tensor:
    """K random shuffles as one (K, m, B) index tensor: row 0 of every shuffle is 0..B-1,
    the other rows are independent uniform permutations (one shared draw for rows 1..m-1
    when ``candidates_together``), taken from ``generator``.

    The draws happen on the generator's device — the data's ``device`` when ``generator``
    is ``None`` (that device's default generator) — and are moved to ``device`` once: no
    per-permutation host-device copy, and none of the stream synchronisations such copies
    imply.  On CPU they are ``torch.randperm`` calls in (k, j) order; on a GPU all of them
    come from one batched draw (:func:`batched_permutations`: a few kernels instead of a
    ``randperm`` each — K = 8 shuffles of 3 modalities were 16 of them).
    """
    gen_device = generator.device if generator is not None else torch.device(device)
    rows = 1 if candidates_together else num_modalities - 1
    perms = torch.empty(num_shuffles, num_modalities, batch_size, dtype=torch.int64,
                        device=gen_device)
    perms[:, 0] = torch.arange(batch_size, device=gen_device)
    if gen_device.type == "cuda":
        perms[:, 1:] = batched_permutations(num_shuffles, rows, batch_size, generator,
                                            gen_device)
    else:
        gen = {} if generator is None else {"generator": generator}
        for k in range(num_shuffles):
            for j in range(1, rows + 1):
                # neither out=perms[k, j] nor generator=None: those overloads specialise
                # a symbolic batch size under torch.compile(dynamic=True); same draws
                perms[k, j] = torch.randperm(batch_size, device=gen_device, **gen)
            if candidates_together:
                perms[k, 2:] = perms[k, 1]
    return perms.to(device)


def batched_permutations(num_shuffles: int, rows: int, batch_size: int, generator,
                         device) -> torch.Tensor:
    """(K, m−1, B) independent uniform permutations of 0..B-1 in one batched draw: the
    argsort of i.i.d. float64 uniform keys (a tie — probability about B²/2^54 per row —
    is broken by position).  ``rows = 1`` is broadcast to m − 1 identical rows by the
    caller's assignment (InfoNCE keeps its candidate modalities together)."""
    keys = torch.rand(num_shuffles, rows, batch_size, generator=generator, device=device,
                      dtype=torch.float64)
    return keys.argsort(dim=-1)


#: The implicit-grid modes of ``negatives`` (no index tensor).
GRID_MODES = ("all", "distinct")

_NEGATIVES_HELP = "negatives must be 'shuffle', 'all', 'distinct' or an int K >= 1"


def parse_negatives(negatives) -> int | str:
    """Validate ``negatives``: returns ``"all"``, ``"distinct"`` or the number of shuffles K."""
    if isinstance(negatives, bool):
        raise TypeError(f"{_NEGATIVES_HELP}, got {negatives!r}")
    if isinstance(negatives, int):
        if negatives < 1:
            raise ValueError(f"negatives must be >= 1 when an int, got {negatives}")
        return negatives
    if isinstance(negatives, str):
        if negatives == "shuffle":
            return 1
        if negatives in GRID_MODES:
            return negatives
        raise ValueError(f"{_NEGATIVES_HELP}, got {negatives!r}")
    raise TypeError(f"{_NEGATIVES_HELP}, got {negatives!r}")


def check_perms(perms, batch_size: int, num_modalities: int, device) -> torch.Tensor:
    """Validate an explicit ``perms`` tensor of shape (K, m, B); returns it on ``device``."""
    if not isinstance(perms, torch.Tensor):
        raise TypeError(f"perms must be a LongTensor of shape (K, m, B), got {type(perms).__name__}")
    if perms.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"perms must hold integer row indices (int64), got dtype {perms.dtype}")
    if perms.dim() != 3 or perms.shape[1] != num_modalities or perms.shape[2] != batch_size \
            or perms.shape[0] < 1:
        raise ValueError(
            f"perms must have shape (K, m={num_modalities}, B={batch_size}) with K >= 1, "
            f"got {tuple(perms.shape)}")
    if perms.device != torch.device(device):
        raise ValueError(f"perms is on {perms.device} but the z's are on {device}")
    if perms.numel():
        require_values(((perms >= 0) & (perms < batch_size)).all(),
                       f"perms holds row indices outside [0, {batch_size})",
                       lambda: f"min {int(perms.min())}, max {int(perms.max())}")
    return perms.to(torch.int64)


def product_of_marginals(batch_size: int, num_modalities: int, negatives="shuffle",
                         perms: torch.Tensor | None = None, generator=None,
                         device="cpu", candidates_together: bool = False) -> MarginalSamples:
    """Resolve ``negatives``/``perms`` into explicit row indices (or the ``"all"`` grid).

    Args:
        batch_size: B.
        num_modalities: m.
        negatives: ``"shuffle"``, ``"all"``, ``"distinct"`` or an int K.
        perms: optional explicit (K, m, B) indices; overrides random shuffles.
        generator: ``torch.Generator`` for the permutations (any device).
        device: device of the returned indices.
        candidates_together: InfoNCE layout — modality 1 is the in-order anchor and
            modalities 2..m share one permutation per shuffle.

    Returns:
        :class:`MarginalSamples`.
    """
    mode = parse_negatives(negatives)
    if perms is not None:
        if mode in GRID_MODES:
            raise ValueError(f"perms cannot be combined with negatives={mode!r}; pass one of them")
        perms = check_perms(perms, batch_size, num_modalities, device)
        if candidates_together:
            anchor = torch.arange(batch_size, device=perms.device)
            require_values((perms[:, 0] == anchor).all(),
                           "perms[:, 0] must be 0..B-1 for InfoNCE (the anchor is in order)")
            require_values((perms[:, 1:] == perms[:, 1:2]).all(),
                           "perms[:, j] must be equal for all j >= 1 for InfoNCE "
                           "(the candidate modalities stay together)")
        return MarginalSamples(perms, batch_size, num_modalities)
    if batch_size < 2:
        raise ValueError(f"negatives need a batch of at least 2 rows, got B={batch_size}")
    if mode == "all":
        return MarginalSamples(None, batch_size, num_modalities)
    if mode == "distinct":
        # InfoNCE pairs an anchor with one candidate row (the candidate modalities together)
        needed = 2 if candidates_together else num_modalities
        if batch_size < needed:
            raise ValueError(
                f"negatives='distinct' needs a batch of at least {needed} rows (one distinct "
                f"row index per factor of a sample), got B={batch_size}")
        return MarginalSamples(None, batch_size, num_modalities, distinct=True)
    perms = draw_shuffles(batch_size, num_modalities, mode, generator, device,
                          candidates_together)
    return MarginalSamples(perms, batch_size, num_modalities)


def all_grid_indices(batch_size: int, num_modalities: int, start: int, stop: int,
                     device="cpu") -> torch.Tensor:
    """Row indices (m, stop - start) of the ``"all"`` samples with flat ids [start, stop).

    Flat id n decodes in row-major order: i_1 = n // B^(m-1), ..., i_m = n % B, so the
    first modality varies slowest (the fused kernels decode program ids the same way).
    """
    flat = torch.arange(start, stop, device=device)
    idx = []
    for j in reversed(range(num_modalities)):
        idx.append(flat % batch_size)
        flat = flat // batch_size
    return torch.stack(idx[::-1])


def distinct_mask(rows: torch.Tensor) -> torch.Tensor:
    """(N,) bool: True where the m row indices of column n of ``rows`` (m, N) are pairwise
    distinct — the ``"distinct"`` samples among grid columns (m(m−1)/2 comparisons)."""
    keep = torch.ones(rows.shape[1], dtype=torch.bool, device=rows.device)
    for a in range(rows.shape[0]):
        for b in range(a + 1, rows.shape[0]):
            keep &= rows[a] != rows[b]
    return keep

"""Public estimators of the dependency between modalities, and the losses that maximise it.

Every bound is in nats, to be *maximised*, and takes

    (critic, *zs, negatives="shuffle", perms=None, generator=None, backend="auto")

with ``zs`` = (z_1, ..., z_m), each B × d_k (float16/bfloat16/float32; float64 on the
reference), ``negatives``/``perms``/``generator`` choosing the product-of-marginals samples
(:mod:`mdm_kernels.negatives`) and ``backend`` one of ``"auto"``, ``"triton"``, ``"cuda"``,
``"chunked"`` (the ``"all"``/``"distinct"`` grids in bounded memory on any device,
:mod:`mdm_kernels.chunked`), ``"reference"`` (:mod:`mdm_kernels.dispatch`).  Values are 0-dim float32 tensors (float64 for
float64 inputs), differentiable w.r.t. the critic's parameters and every z.

Colombo et al., "Improving Multimodal fusion via Mutual Dependency Maximisation",
EMNLP 2021 (arXiv 2109.00922) — the penalties; the individual bounds are credited in
:mod:`mdm_kernels.reference.estimators`.
"""
from __future__ import annotations

import math

import torch

from ._validation import check_zs, compute_dtype
from .dispatch import resolve_backend
from .distributed import broadcast_from_first, check_group, gather_batch
from .negatives import MarginalSamples, product_of_marginals
from .reference.estimators import resolve_samples
from .reference.gradient_penalty import check_pairs, interpolation_weights


def prepare_batch(kind: str, critic, zs, negatives, perms, generator, group):
    """Validate the z's, gather the global batch when ``group`` is given
    (:mod:`mdm_kernels.distributed`) and resolve the marginal samples (broadcast from
    rank 0 so that every rank uses the same shuffles)."""
    zs = check_zs(critic, zs)
    group = check_group(group)
    if group is not None:
        zs = gather_batch(zs, group)
    samples = resolve_samples(kind, zs, negatives, perms, generator)
    if group is not None and samples.perms is not None and perms is None:
        samples = MarginalSamples(broadcast_from_first(samples.perms, group),
                                  samples.batch_size, samples.num_modalities)
    return zs, samples, group


def dependency_terms(kind: str, critic, zs, negatives="shuffle", perms=None, generator=None,
                     backend="auto", group=None):
    """(joint_term, marginal_term) of estimator ``kind`` on the chosen backend."""
    zs, samples, _ = prepare_batch(kind, critic, zs, negatives, perms, generator, group)
    impl = resolve_backend(backend, kind, critic, zs, samples)
    return impl.dependency_terms(kind, critic, zs, samples)


def _bound(name: str, kind: str, formula: str, default_negatives="shuffle"):
    def bound(critic, *zs, negatives=default_negatives, perms=None, generator=None,
              backend="auto", group=None):
        joint, marginal = dependency_terms(kind, critic, zs, negatives, perms, generator, backend,
                                           group)
        return joint - marginal

    bound.__doc__ = f"""{formula}

    Args:
        critic: ``MLPCritic`` (fused backends) or any callable T(z_1, ..., z_m) -> (N,).
        *zs: z_1, ..., z_m, each (B, d_k), same B, dtype and device.
        negatives: ``"shuffle"``, an int K (K shuffles), ``"all"`` (every combination
            (i_1, ..., i_m), B^m samples, coinciding indices included) or ``"distinct"``
            (every combination of pairwise distinct indices, B(B−1)···(B−m+1) samples: the
            unbiased U-statistic form; needs B ≥ m).  Fused backends that do not implement
            ``"distinct"`` raise :class:`~mdm_kernels.dispatch.BackendUnavailable`
            (``"auto"`` then runs the reference).
        perms: optional LongTensor (K, m, B) of explicit row indices.
        generator: ``torch.Generator`` for the shuffles.
        backend: ``"auto"``, ``"triton"``, ``"cuda"``, ``"chunked"`` or ``"reference"``.
        group: optional ``torch.distributed`` process group (or ``"world"``): negatives are
            drawn from the global batch, see :mod:`mdm_kernels.distributed`.

    Returns: 0-dim tensor, the bound in nats (to maximise).
    """
    bound.__name__ = bound.__qualname__ = name
    return bound


dv_bound = _bound(
    "dv_bound", "dv", "Donsker–Varadhan / MINE bound: mean_joint T − log mean_marginal exp(T).\n\n"
    "    Belghazi et al., 'Mutual Information Neural Estimation', ICML 2018.")
nwj_bound = _bound(
    "nwj_bound", "nwj", "NWJ f-divergence bound: mean_joint T − mean_marginal exp(T − 1).\n\n"
    "    Nguyen, Wainwright & Jordan, IEEE Trans. Inf. Theory 2010.")
js_bound = _bound(
    "js_bound", "js", "Jensen–Shannon bound: mean_joint(−softplus(−T)) − mean_marginal softplus(T).\n\n"
    "    Nowozin et al., f-GAN, NeurIPS 2016; Hjelm et al., Deep InfoMax, ICLR 2019.")
infonce_bound = _bound(
    "infonce_bound", "infonce", "InfoNCE: mean_i [T(i, i) − log mean_{c∈C_i} exp T(i, c)], anchor z_1, the\n"
    "    other modalities kept together as the candidate.  ``negatives='all'`` (default):\n"
    "    C_i = all B rows, bound ≤ log B; K shuffles: C_i = {i} ∪ K shuffled rows,\n"
    "    bound ≤ log(K + 1); ``negatives='distinct'``: C_i = the B − 1 rows j ≠ i, the positive\n"
    "    dropped from the partition function — not capped at log B and not a lower bound for\n"
    "    every critic (with the optimal critic it is the leave-one-out upper bound I_L1Out).\n\n"
    "    van den Oord et al., 'Representation Learning with Contrastive Predictive Coding',\n"
    "    2018; Poole et al., 'On Variational Bounds of Mutual Information', ICML 2019\n"
    "    (Eq. 12: InfoNCE, Eq. 13: leave-one-out).", default_negatives=None)
wasserstein_dependency = _bound(
    "wasserstein_dependency", "wasserstein", "Wasserstein dependency measure: mean_joint T − mean_marginal T (keep the\n"
    "    critic 1-Lipschitz with :func:`gradient_penalty`, see :func:`wasserstein_loss`).\n\n"
    "    Ozair et al., 'Wasserstein Dependency Measure for Representation Learning',\n"
    "    NeurIPS 2019.")


def _negated(bound, name: str):
    def loss(critic, *zs, negatives=None, perms=None, generator=None, backend="auto",
             group=None):
        kwargs = {} if negatives is None else {"negatives": negatives}
        return -bound(critic, *zs, perms=perms, generator=generator, backend=backend,
                      group=group, **kwargs)

    loss.__name__ = loss.__qualname__ = name
    loss.__doc__ = f"Loss to minimise: −{bound.__name__}(...) (same arguments)."
    return loss


nwj_loss = _negated(nwj_bound, "nwj_loss")
js_loss = _negated(js_bound, "js_loss")
infonce_loss = _negated(infonce_bound, "infonce_loss")


class MineEMA:
    """Moving average of the marginal partition term for MINE's bias-corrected gradient.

    MINE (Belghazi et al., ICML 2018, Sec. 3.2) notes that the minibatch gradient of
    log mean exp(T) is biased and replaces its denominator mean exp(T) by an exponential
    moving average a_t = decay·a_{t−1} + (1 − decay)·mean exp(T), initialised with the first
    batch.  The average is kept in log space (``log_value``) so it cannot overflow.
    """

    def __init__(self, decay: float = 0.99):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must lie in [0, 1), got {decay}")
        self.decay = float(decay)
        self.log_value: torch.Tensor | None = None

    def update(self, log_mean_exp_value: torch.Tensor) -> torch.Tensor:
        """Fold in this batch's log mean exp(T) (detached); returns log a_t."""
        current = log_mean_exp_value.detach()
        if self.log_value is None or self.decay == 0.0:
            self.log_value = current.clone()
        else:
            self.log_value = torch.logaddexp(
                math.log(self.decay) + self.log_value.to(current),
                math.log1p(-self.decay) + current)
        return self.log_value

    def state_dict(self) -> dict:
        return {"decay": self.decay, "log_value": self.log_value}

    def load_state_dict(self, state: dict) -> None:
        self.decay = float(state["decay"])
        self.log_value = state["log_value"]


def mine_loss(critic, *zs, negatives="shuffle", perms=None, generator=None, backend="auto",
              ema: MineEMA | None = None, group=None):
    """MINE loss = −dv_bound(...).

    With ``ema`` (a :class:`MineEMA`), the value is still −DV but the gradient of the
    partition term uses the moving-average denominator (MINE's bias correction):
    ∇ log mean exp T ≈ ∇ mean exp T / a_t.  Implemented by the surrogate
    L + s − sg(s) with s = exp(log mean exp T − log a_t), whose value is L and whose gradient
    is exp(lme − log a_t)·∇lme = ∇(mean exp T)/a_t.
    """
    joint, marginal = dependency_terms("dv", critic, zs, negatives, perms, generator, backend,
                                       group)
    if ema is None:
        return marginal - joint
    log_avg = ema.update(marginal)
    surrogate = torch.exp(marginal - log_avg)
    return marginal.detach() + (surrogate - surrogate.detach()) - joint


def gradient_penalty(critic, joint, marginal, epsilon=None, generator=None, one_sided=False,
                     backend="auto"):
    """WGAN-GP: mean over rows of (‖∇_x T(x̂)‖₂ − 1)², x̂_k = ε·joint_k + (1 − ε)·marginal_k.

    Gulrajani et al., NeurIPS 2017.  ``joint`` and ``marginal`` are sequences of per-modality
    tensors (z_1, ..., z_m) of equal shapes (N × d_k); one ε ~ U[0, 1] per row is shared by all
    modalities (``epsilon``: optional tensor (N,)); the norm is over the concatenated input.
    ``one_sided=True`` penalises max(0, ‖∇T‖ − 1)² only.  Rows with a zero input gradient give
    penalty 1 and finite gradients.  Returns a 0-dim tensor.
    """
    joint, marginal = check_pairs(critic, joint, marginal)
    eps = interpolation_weights(epsilon, joint[0].shape[0], generator, joint[0].device,
                                compute_dtype(critic, joint))
    impl = resolve_backend(backend, "gradient_penalty", critic, joint)
    return impl.gradient_penalty(critic, joint, marginal, eps, bool(one_sided))


def gradient_penalty_pairs(samples: MarginalSamples, generator, device) -> torch.Tensor:
    """Marginal rows (K', m, B) at which :func:`wasserstein_loss` takes its GP: the drawn
    shuffles/perms themselves, or one fresh shuffle for the ``"all"``/``"distinct"`` grids
    (interpolating towards each of the B^m grid samples would cost B^m critic gradients for
    a regulariser)."""
    if samples.perms is not None:
        return samples.perms
    return product_of_marginals(samples.batch_size, samples.num_modalities, "shuffle",
                                generator=generator, device=device).perms


def wasserstein_loss(critic, *zs, negatives="shuffle", perms=None, generator=None,
                     backend="auto", gp_weight=10.0, epsilon=None, one_sided=False, group=None):
    """Critic loss of the Wasserstein dependency measure: −dependency + gp_weight·GP.

    The GP interpolates each joint row i with its marginal samples (k, i) (K'·B rows, ε per
    row from ``generator`` or ``epsilon``).  Fused backends compute both parts in one call
    sharing the per-modality projections.  Ozair et al., NeurIPS 2019; Gulrajani et al. 2017.
    """
    if not isinstance(gp_weight, (int, float)) or isinstance(gp_weight, bool) or gp_weight < 0:
        raise ValueError(f"gp_weight must be a non-negative number, got {gp_weight!r}")
    zs, samples, group = prepare_batch("wasserstein", critic, zs, negatives, perms, generator,
                                       group)
    gp_perms = gradient_penalty_pairs(samples, generator, zs[0].device)
    eps = interpolation_weights(epsilon, gp_perms.shape[0] * gp_perms.shape[2], generator,
                                zs[0].device, compute_dtype(critic, zs))
    if group is not None:
        if samples.perms is None:  # the GP's fresh shuffle of a grid mode
            gp_perms = broadcast_from_first(gp_perms, group)
        if epsilon is None:
            eps = broadcast_from_first(eps, group)
    impl = resolve_backend(backend, "wasserstein", critic, zs, samples)
    joint, marginal, gp = impl.wasserstein_terms(critic, zs, samples, gp_perms, eps,
                                                 bool(one_sided))
    return marginal - joint + gp_weight * gp

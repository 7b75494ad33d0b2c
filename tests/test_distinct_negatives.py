"""``negatives="distinct"``: combinations of pairwise distinct indices (the U-statistic form).

The reference is checked against an independent brute force — ``itertools.permutations``
over the distinct index tuples, float64, the estimator formulas written out — in value and
gradient on odd shapes; then on correlated Gaussians with the analytic critic, where the true
mutual information is known, ``"all"`` is shown biased low and ``"distinct"`` is not.
"""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

import mdm_kernels as mk
from mdm_kernels import MLPCritic
from mdm_kernels.dispatch import Backend, BackendUnavailable, _negatives_reason
from mdm_kernels.negatives import MarginalSamples, parse_negatives, product_of_marginals

BOUNDS = {"dv": mk.dv_bound, "nwj": mk.nwj_bound, "js": mk.js_bound,
          "infonce": mk.infonce_bound, "wasserstein": mk.wasserstein_dependency}


def _inputs(batch, m, seed=0):
    torch.manual_seed(seed)
    dims = tuple(2 + k for k in range(m))  # odd widths: 2, 3, 4, 5
    critic = MLPCritic(dims, hidden=(5,), activation="tanh").double()
    zs = [torch.randn(batch, d, dtype=torch.float64, requires_grad=True) for d in dims]
    return critic, zs


def _scores(critic, zs, tuples):
    """T(z_1[t_1], ..., z_m[t_m]) for each index tuple t, one critic call."""
    columns = list(zip(*tuples))
    return critic(*[z[list(col)] for z, col in zip(zs, columns)])


def brute_force_bound(kind, critic, zs):
    """The "distinct" bound from its definition: the marginal samples are every ordered tuple
    of pairwise distinct rows (itertools.permutations), InfoNCE's candidates every j ≠ i."""
    b, m = zs[0].shape[0], len(zs)
    joint = _scores(critic, zs, [(i,) * m for i in range(b)])
    if kind == "infonce":
        lse = []
        for i in range(b):
            cand = _scores(critic, zs, [(i,) + (j,) * (m - 1) for j in range(b) if j != i])
            lse.append(torch.log(torch.exp(cand).mean()))
        return joint.mean() - torch.stack(lse).mean()
    marg = _scores(critic, zs, list(itertools.permutations(range(b), m)))
    assert marg.numel() == math.perm(b, m)
    if kind == "dv":
        return joint.mean() - torch.log(torch.exp(marg).mean())
    if kind == "nwj":
        return joint.mean() - torch.exp(marg - 1).mean()
    if kind == "js":
        return -F.softplus(-joint).mean() - F.softplus(marg).mean()
    return joint.mean() - marg.mean()  # wasserstein


SHAPES = [(2, 2), (3, 2), (3, 3), (5, 3), (5, 4), (7, 2), (7, 4)]


@pytest.mark.parametrize("kind", ["dv", "nwj", "js", "wasserstein"])
@pytest.mark.parametrize("batch,m", SHAPES)
def test_distinct_matches_brute_force(kind, batch, m):
    critic, zs = _inputs(batch, m, seed=batch * 10 + m)
    params = list(critic.parameters()) + zs
    got = BOUNDS[kind](critic, *zs, negatives="distinct", backend="reference")
    want = brute_force_bound(kind, critic, zs)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for g, w in zip(torch.autograd.grad(got, params), torch.autograd.grad(want, params)):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
    # the coincident combinations matter: "all" differs on these inputs
    assert not torch.allclose(BOUNDS[kind](critic, *zs, negatives="all"), want)


@pytest.mark.parametrize("batch,m", [(2, 2), (3, 4), (5, 3), (7, 2)])
def test_distinct_infonce_matches_brute_force(batch, m):
    critic, zs = _inputs(batch, m, seed=batch + m)
    params = list(critic.parameters()) + zs
    got = mk.infonce_bound(critic, *zs, negatives="distinct")
    want = brute_force_bound("infonce", critic, zs)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for g, w in zip(torch.autograd.grad(got, params), torch.autograd.grad(want, params)):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def test_distinct_infonce_is_not_capped_at_log_b():
    """Without the positive in the partition function a critic that scores only the
    positives high exceeds log B (with it, the bound is ≤ log B)."""
    b = 4
    z = torch.eye(b, dtype=torch.float64)

    def critic(x, y):  # 20 on the positives, 0 elsewhere
        return 20.0 * (x * y).sum(-1)

    assert float(mk.infonce_bound(critic, z, z, negatives="all")) <= math.log(b)
    assert float(mk.infonce_bound(critic, z, z, negatives="distinct")) == pytest.approx(20.0)


def test_distinct_samples_and_validation():
    assert parse_negatives("distinct") == "distinct"
    s = product_of_marginals(7, 3, "distinct")
    assert s.perms is None and s.distinct and not s.is_all
    assert s.num_samples == 7 * 6 * 5
    assert product_of_marginals(7, 3, "all").is_all
    assert product_of_marginals(5, 4, "distinct").num_samples == 5 * 4 * 3 * 2
    # InfoNCE needs an anchor and one other candidate row only
    assert product_of_marginals(2, 3, "distinct", candidates_together=True).distinct
    with pytest.raises(ValueError, match="distinct.*at least 3 rows"):
        product_of_marginals(2, 3, "distinct")
    with pytest.raises(ValueError, match="perms cannot be combined with negatives='distinct'"):
        product_of_marginals(3, 2, "distinct", perms=torch.zeros(1, 2, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="distinct=True"):
        MarginalSamples(torch.zeros(1, 2, 3, dtype=torch.int64), 3, 2, distinct=True)
    with pytest.raises(ValueError, match="'distinct'"):
        parse_negatives("distinc")
    critic, zs = _inputs(2, 3)
    with pytest.raises(ValueError, match="B=2"):
        mk.dv_bound(critic, *zs, negatives="distinct")


def test_wasserstein_loss_distinct_takes_gp_at_a_fresh_shuffle():
    critic, zs = _inputs(5, 2)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    loss = mk.wasserstein_loss(critic, *zs, negatives="distinct", generator=g1, gp_weight=0.0)
    torch.testing.assert_close(loss, -brute_force_bound("wasserstein", critic, zs))
    assert torch.isfinite(mk.wasserstein_loss(critic, *zs, negatives="distinct", generator=g2))


def test_backends_without_distinct_refuse_it():
    """A backend that does not implement "distinct" is refused with the reason (dispatch
    layer), never run as "all"; the reference implements it."""

    class NoDistinct(Backend):
        name = "nodistinct"

    samples = product_of_marginals(4, 2, "distinct")
    reason = _negatives_reason(NoDistinct(), samples)
    assert "negatives='distinct' is not implemented by the nodistinct kernels" in reason
    assert _negatives_reason(NoDistinct(), product_of_marginals(4, 2, "all")) is None
    assert _negatives_reason(mk.dispatch.get_backend("reference"), samples) is None
    for name in ("triton", "cuda"):  # both implement it (tests/test_triton_bounds.py,
        # tests/test_cuda_backend.py): a refusal would send "auto" to the reference
        assert mk.dispatch._BACKEND_MODULES[name]
        try:
            backend = mk.dispatch.get_backend(name)
        except BackendUnavailable:  # not importable here
            continue
        assert backend.supports_distinct_negatives, name


def test_distinct_removes_the_bias_of_all_on_gaussians():
    """Known MI: z_1, z_2 ∈ R^d standard normal with per-coordinate correlation ρ, the
    analytic critic T = log p(z_1, z_2)/(p(z_1)p(z_2)) (the optimal DV critic), true
    I = −(d/2)·log(1 − ρ²) = 2.554 nats for d = 5, ρ = 0.8.

    Statistics.  The joint term mean_J T is unbiased for I.  For ``"distinct"`` the marginal
    term is log Ẑ with Ẑ a U-statistic, unbiased for E_q[e^T] = 1; its variance
    (E_q[e^{2T}] − 1)/(B(B−1)) is finite (E_q[e^{2T}] = (|Σ|·|2Σ⁻¹ − I|^{1/2})^{−d} ≈ 165,
    Σ = [[1, ρ], [ρ, 1]]), so by the CLT the mean of R independent batches lies within 4
    standard errors of I but for a 6e-5 chance (Jensen's bias, about −82/B², is ~1e-3 here,
    far below the tolerance).  ``"all"`` adds the B diagonal terms, whose mean E_p[e^T] ≈ 165
    inflates the partition estimate by ≈ log(1 + 164/B) ≈ 0.5 nats at B = 256: the bound
    is biased low, by many standard errors (the log keeps the estimate's variance finite,
    so its standard error is meaningful), and below the "distinct" value in every batch.
    """
    d, rho, batch, repeats = 5, 0.8, 256, 16
    true_mi = -d / 2 * math.log(1 - rho ** 2)

    def critic(x, y):
        s = 1 - rho ** 2
        return (-0.5 * math.log(s) - (rho ** 2 * (x * x + y * y) - 2 * rho * x * y) / (2 * s)).sum(-1)

    gen = torch.Generator().manual_seed(0)
    values = {"all": [], "distinct": []}
    for _ in range(repeats):
        x = torch.randn(batch, d, generator=gen, dtype=torch.float64)
        y = rho * x + math.sqrt(1 - rho ** 2) * torch.randn(batch, d, generator=gen,
                                                            dtype=torch.float64)
        for mode in values:
            values[mode].append(float(mk.dv_bound(critic, x, y, negatives=mode)))
    distinct, every = torch.tensor(values["distinct"]), torch.tensor(values["all"])
    se_distinct = float(distinct.std()) / math.sqrt(repeats)
    se_all = float(every.std()) / math.sqrt(repeats)
    assert abs(float(distinct.mean()) - true_mi) < 4 * se_distinct
    assert float(every.mean()) < true_mi - 4 * se_all
    assert bool((every < distinct).all())

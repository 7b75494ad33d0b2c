"""The pure-PyTorch reference: hand-computed values, known mutual information, gradients,
the "all" grid, numerical safety and bad input."""
import math

import pytest
import torch
import torch.nn.functional as F

import mdm_kernels as mk
from mdm_kernels import reference
from mdm_kernels.negatives import all_grid_indices, product_of_marginals


def product_critic(a, b):
    """T(a, b) = a·b summed over features: easy to evaluate by hand."""
    return (a * b).sum(dim=1)


# ----------------------------------------------------------------------------- hand-computed
A = [1.0, 2.0, -1.0]
Bv = [0.5, -1.0, 2.0]
PERMS = torch.tensor([[[0, 1, 2], [2, 0, 1]]])  # one shuffle: b index 2, 0, 1


def _tiny():
    return (torch.tensor(A, dtype=torch.float64).unsqueeze(1),
            torch.tensor(Bv, dtype=torch.float64).unsqueeze(1))


def _hand_scores():
    joint = [a * b for a, b in zip(A, Bv)]
    marg = [A[i] * Bv[j] for i, j in zip([0, 1, 2], [2, 0, 1])]
    return joint, marg


def _softplus(x):
    return math.log1p(math.exp(-abs(x))) + max(x, 0.0)


def test_dv_by_hand():
    joint, marg = _hand_scores()
    expected = sum(joint) / 3 - math.log(sum(math.exp(t) for t in marg) / 3)
    got = mk.dv_bound(product_critic, *_tiny(), perms=PERMS)
    assert got.item() == pytest.approx(expected, abs=1e-12)


def test_nwj_by_hand():
    joint, marg = _hand_scores()
    expected = sum(joint) / 3 - sum(math.exp(t - 1) for t in marg) / 3
    assert mk.nwj_bound(product_critic, *_tiny(), perms=PERMS).item() == pytest.approx(expected)


def test_js_by_hand():
    joint, marg = _hand_scores()
    expected = sum(-_softplus(-t) for t in joint) / 3 - sum(_softplus(t) for t in marg) / 3
    assert mk.js_bound(product_critic, *_tiny(), perms=PERMS).item() == pytest.approx(expected)


def test_wasserstein_by_hand():
    joint, marg = _hand_scores()
    expected = sum(joint) / 3 - sum(marg) / 3
    got = mk.wasserstein_dependency(product_critic, *_tiny(), perms=PERMS)
    assert got.item() == pytest.approx(expected)


def test_infonce_all_by_hand():
    # C_i = every row j: mean_i [a_i b_i − log mean_j exp(a_i b_j)]
    expected = sum(A[i] * Bv[i] - math.log(sum(math.exp(A[i] * b) for b in Bv) / 3)
                   for i in range(3)) / 3
    got = mk.infonce_bound(product_critic, *_tiny())  # default negatives="all"
    assert got.item() == pytest.approx(expected)
    assert got.item() <= math.log(3)


def test_infonce_shuffles_by_hand():
    # C_i = {i} ∪ {perms[k, 1, i]}: here K = 1 → two candidates per anchor.
    perms = torch.tensor([[[0, 1, 2], [2, 0, 1]]])
    expected = sum(A[i] * Bv[i] - math.log((math.exp(A[i] * Bv[i]) + math.exp(A[i] * Bv[j])) / 2)
                   for i, j in zip(range(3), [2, 0, 1])) / 3
    got = mk.infonce_bound(product_critic, *_tiny(), perms=perms)
    assert got.item() == pytest.approx(expected)


def test_losses_are_negated_bounds():
    zs = _tiny()
    for loss, bound in [(mk.mine_loss, mk.dv_bound), (mk.nwj_loss, mk.nwj_bound),
                        (mk.js_loss, mk.js_bound), (mk.infonce_loss, mk.infonce_bound)]:
        kw = {} if loss is mk.infonce_loss else {"perms": PERMS}
        assert loss(product_critic, *zs, **kw).item() == pytest.approx(
            -bound(product_critic, *zs, **kw).item())


# ------------------------------------------------------------------------- "all" negatives
def test_all_grid_matches_explicit_loop():
    torch.manual_seed(0)
    critic = mk.MLPCritic((2, 3, 5), hidden=(7,), activation="tanh").double()
    zs = [torch.randn(4, d, dtype=torch.float64) for d in (2, 3, 5)]
    scores = []
    for i in range(4):
        for j in range(4):
            for k in range(4):
                scores.append(critic(zs[0][i:i + 1], zs[1][j:j + 1], zs[2][k:k + 1]))
    scores = torch.cat(scores)
    joint = critic(*zs)
    expected = joint.mean() - (torch.logsumexp(scores, 0) - math.log(64))
    got = mk.dv_bound(critic, *zs, negatives="all")
    torch.testing.assert_close(got, expected)
    marg = reference.marginal_scores(
        critic, zs, product_of_marginals(4, 3, "all", device="cpu"))
    torch.testing.assert_close(marg, scores)


def test_all_grid_decoding_is_row_major():
    rows = all_grid_indices(3, 2, 0, 9)
    assert rows[0].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert rows[1].tolist() == [0, 1, 2, 0, 1, 2, 0, 1, 2]
    assert all_grid_indices(3, 3, 5, 6).flatten().tolist() == [0, 1, 2]


# ------------------------------------------------------------------- known mutual information
def _correlated_gaussians(n, d, rho, generator):
    x = torch.randn(n, d, generator=generator, dtype=torch.float64)
    noise = torch.randn(n, d, generator=generator, dtype=torch.float64)
    y = rho * x + math.sqrt(1 - rho ** 2) * noise
    return x, y


def _optimal_critic(d, rho):
    """log p(x, y) / (p(x) p(y)) for unit-variance Gaussians with per-dimension correlation ρ."""
    def critic(x, y):
        quad = (rho ** 2 * (x * x + y * y) - 2 * rho * x * y).sum(dim=1)
        return -0.5 * d * math.log(1 - rho ** 2) - quad / (2 * (1 - rho ** 2))
    return critic


@pytest.mark.parametrize("d,rho", [(1, 0.5), (2, 0.4)])
def test_optimal_critic_recovers_mi(d, rho):
    g = torch.Generator().manual_seed(1234)
    x, y = _correlated_gaussians(100_000, d, rho, g)
    true_mi = -0.5 * d * math.log(1 - rho ** 2)
    critic = _optimal_critic(d, rho)
    dv = mk.dv_bound(critic, x, y, negatives=4, generator=g).item()
    shifted = lambda a, b: critic(a, b) + 1.0  # NWJ's optimum is T* + 1
    nwj = mk.nwj_bound(shifted, x, y, negatives=4, generator=g).item()
    assert dv == pytest.approx(true_mi, abs=0.02)
    assert nwj == pytest.approx(true_mi, abs=0.02)


def test_infonce_at_most_log_batch():
    g = torch.Generator().manual_seed(7)
    x, y = _correlated_gaussians(64, 2, 0.99, g)
    value = mk.infonce_bound(_optimal_critic(2, 0.99), x, y).item()
    assert value <= math.log(64) + 1e-9
    assert value > 0.5 * math.log(64)  # strong dependency: the bound is near its ceiling


def test_mine_training_lands_near_true_mi():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    d, rho = 1, 0.8
    true_mi = -0.5 * d * math.log(1 - rho ** 2)  # 0.51 nats
    critic = mk.MLPCritic((d, d), hidden=(64,), activation="relu")
    opt = torch.optim.Adam(critic.parameters(), lr=3e-3)
    ema = mk.MineEMA(0.95)
    for _ in range(300):
        x, y = _correlated_gaussians(256, d, rho, g)
        loss = mk.mine_loss(critic, x.float(), y.float(), negatives=4, generator=g, ema=ema)
        opt.zero_grad()
        loss.backward()
        opt.step()
    x, y = _correlated_gaussians(20_000, d, rho, g)
    with torch.no_grad():
        estimate = mk.dv_bound(critic, x.float(), y.float(), negatives=4, generator=g).item()
    assert estimate == pytest.approx(true_mi, abs=0.12)


# ------------------------------------------------------------------------------ gradients
def _double_setup(activation="tanh", dims=(3, 2, 5), hidden=(6,), b=5):
    torch.manual_seed(3)
    critic = mk.MLPCritic(dims, hidden=hidden, activation=activation).double()
    zs = [torch.randn(b, d, dtype=torch.float64, requires_grad=True) for d in dims]
    return critic, zs


@pytest.mark.parametrize("bound", [mk.dv_bound, mk.nwj_bound, mk.js_bound, mk.infonce_bound,
                                   mk.wasserstein_dependency])
@pytest.mark.parametrize("negatives", [2, "all"])
def test_gradcheck_bounds(bound, negatives):
    critic, zs = _double_setup(dims=(2, 3, 2), hidden=(3, 2), b=4)
    perms = None if negatives == "all" else product_of_marginals(
        4, 3, negatives, generator=torch.Generator().manual_seed(0),
        candidates_together=bound is mk.infonce_bound).perms
    params = list(critic.parameters())

    def f(*inputs):
        zs_, ps = inputs[:3], inputs[3:]
        with torch.nn.utils.stateless._reparametrize_module(
                critic, {n: p for (n, _), p in zip(critic.named_parameters(), ps)}):
            return bound(critic, *zs_, negatives=negatives, perms=perms)

    inputs = tuple(zs) + tuple(p.detach().clone().requires_grad_(True) for p in params)
    assert torch.autograd.gradcheck(f, inputs)


def test_gradcheck_gradient_penalty():
    critic, zs = _double_setup(activation="softplus", hidden=(5, 4))
    marg = [torch.randn_like(z).requires_grad_(True) for z in zs]
    eps = torch.rand(5, dtype=torch.float64)
    f = lambda *t: mk.gradient_penalty(critic, t[:3], t[3:], epsilon=eps)
    assert torch.autograd.gradcheck(f, tuple(zs) + tuple(marg))


def test_gradient_penalty_matches_closed_form():
    # One hidden layer: ∇_x T = W1ᵀ (w2 ⊙ σ'(a)).
    critic, zs = _double_setup(activation="tanh")
    marg = [torch.randn_like(z) for z in zs]
    eps = torch.rand(5, dtype=torch.float64)
    xs = [eps[:, None] * a + (1 - eps[:, None]) * b for a, b in zip(zs, marg)]
    w1 = critic.first_weight()
    pre = torch.cat(xs, 1) @ w1.t() + critic.first_bias
    u = critic.out.weight.reshape(-1) * (1 - torch.tanh(pre) ** 2)
    norm = (u @ w1).norm(dim=1)
    expected = ((norm - 1) ** 2).mean()
    got = mk.gradient_penalty(critic, zs, marg, epsilon=eps)
    torch.testing.assert_close(got, expected)
    one_sided = mk.gradient_penalty(critic, zs, marg, epsilon=eps, one_sided=True)
    torch.testing.assert_close(one_sided, (torch.clamp(norm - 1, min=0) ** 2).mean())


def test_gradient_penalty_dead_relu_is_finite():
    critic, zs = _double_setup(activation="relu")
    with torch.no_grad():
        critic.first_bias.fill_(-1e3)  # every unit dead: ∇_x T = 0 on every row
    marg = [torch.randn_like(z) for z in zs]
    gp = mk.gradient_penalty(critic, zs, marg, generator=torch.Generator().manual_seed(0))
    assert gp.item() == pytest.approx(1.0)
    gp.backward()
    for t in list(critic.parameters()) + zs:
        assert t.grad is None or torch.isfinite(t.grad).all()


def test_mine_ema_gradient_uses_moving_average():
    critic, zs = _double_setup()
    perms = product_of_marginals(5, 3, 1, generator=torch.Generator().manual_seed(0)).perms
    ema = mk.MineEMA(0.5)
    ema.log_value = torch.tensor(0.3, dtype=torch.float64)
    loss = mk.mine_loss(critic, *zs, perms=perms, ema=ema)
    torch.testing.assert_close(loss, -mk.dv_bound(critic, *zs, perms=perms))
    joint, marg_lme = mk.dependency_terms("dv", critic, zs, perms=perms)
    log_avg = torch.logaddexp(math.log(0.5) + torch.tensor(0.3, dtype=torch.float64),
                              math.log(0.5) + marg_lme.detach())
    torch.testing.assert_close(ema.log_value, log_avg)
    # expected gradient: −∇joint + ∇(mean exp T)/a = −∇joint + exp(lme − log a)·∇lme
    expected_surrogate = -joint + torch.exp(marg_lme.detach() - log_avg) * marg_lme
    w = critic.out.weight
    g_got, = torch.autograd.grad(loss, w)
    g_exp, = torch.autograd.grad(expected_surrogate, w)
    torch.testing.assert_close(g_got, g_exp)
    g_plain, = torch.autograd.grad(-mk.dv_bound(critic, *zs, perms=perms), w)
    assert not torch.allclose(g_got, g_plain)  # the correction changes the gradient


# ---------------------------------------------------------------------- numerical safety
def test_extreme_scores_do_not_overflow():
    torch.manual_seed(0)
    critic = mk.MLPCritic((3, 4), hidden=(8,))
    zs = [torch.randn(6, 3), torch.randn(6, 4)]
    with torch.no_grad():
        critic.out.weight.mul_(1e5)
    scores = critic(*zs)
    assert scores.abs().max() > 1e3
    for bound in (mk.dv_bound, mk.infonce_bound, mk.js_bound, mk.wasserstein_dependency):
        value = bound(critic, *zs, negatives="all")
        assert torch.isfinite(value), bound.__name__
        value.backward()
        assert all(torch.isfinite(p.grad).all() for p in critic.parameters())
        critic.zero_grad()
    # DV against a float64 evaluation of the same critic
    ref = mk.dv_bound(critic.double(), *[z.double() for z in zs], negatives="all")
    critic.float()
    torch.testing.assert_close(mk.dv_bound(critic, *zs, negatives="all").double(), ref,
                               rtol=1e-4, atol=1e-2)


def test_half_inputs_accumulate_in_float32():
    torch.manual_seed(0)
    critic = mk.MLPCritic((3, 4), hidden=(8,))
    zs = [torch.randn(6, 3), torch.randn(6, 4)]
    g = torch.Generator().manual_seed(0)
    perms = product_of_marginals(6, 2, 2, generator=g).perms
    full = mk.dv_bound(critic, *zs, perms=perms)
    for dtype in (torch.float16, torch.bfloat16):
        value = mk.dv_bound(critic, *[z.to(dtype) for z in zs], perms=perms)
        assert value.dtype == torch.float32
        torch.testing.assert_close(value, full, rtol=0.05, atol=0.02)


# ---------------------------------------------------------------------------- bad input
@pytest.fixture
def setup2():
    torch.manual_seed(0)
    return mk.MLPCritic((3, 4), hidden=(5,)), torch.randn(6, 3), torch.randn(6, 4)


@pytest.mark.parametrize("make_args,exc,match", [
    (lambda c, a, b: (c, a, b[:5]), ValueError, "batch sizes differ"),
    (lambda c, a, b: (c, a[:1], b[:1]), ValueError, "at least 2 rows"),
    (lambda c, a, b: (c, a, b[:, :3]), ValueError, r"dims\[1\]=4"),
    (lambda c, a, b: (c, a[0], b), ValueError, r"zs\[0\] must be 2-D"),
    (lambda c, a, b: (c, a.long(), b), TypeError, r"zs\[0\] must be float"),
    (lambda c, a, b: (c, a, b.double()), TypeError, "dtype"),
    (lambda c, a, b: (c, a), ValueError, "at least 2 modalities"),
    (lambda c, a, b: (c, a, b, b), ValueError, "critic has 2 modalities"),
    (lambda c, a, b: (c, a.double(), b.double()), TypeError, "critic.double"),
    (lambda c, a, b: (c, a.numpy(), b), TypeError, "torch.Tensor"),
    (lambda c, a, b: ("critic", a, b), TypeError, "critic must be callable"),
])
def test_bad_inputs_raise(setup2, make_args, exc, match):
    with pytest.raises(exc, match=match):
        mk.dv_bound(*make_args(*setup2))


@pytest.mark.parametrize("kwargs,exc,match", [
    ({"negatives": "random"}, ValueError, "negatives"),
    ({"negatives": 0}, ValueError, "negatives"),
    ({"negatives": 1.5}, TypeError, "negatives"),
    ({"negatives": True}, TypeError, "negatives"),
    ({"backend": "jax"}, ValueError, "backend"),
    ({"perms": torch.zeros(1, 2, 5, dtype=torch.long)}, ValueError, "perms must have shape"),
    ({"perms": torch.zeros(1, 3, 6, dtype=torch.long)}, ValueError, "perms must have shape"),
    ({"perms": torch.full((1, 2, 6), 6)}, ValueError, "outside"),
    ({"perms": torch.full((1, 2, 6), -1)}, ValueError, "outside"),
    ({"perms": torch.zeros(1, 2, 6)}, TypeError, "integer"),
    ({"perms": [[0, 1]]}, TypeError, "LongTensor"),
    ({"perms": torch.zeros(1, 2, 6, dtype=torch.long), "negatives": "all"}, ValueError, "perms"),
])
def test_bad_options_raise(setup2, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        mk.dv_bound(*setup2, **kwargs)


def test_infonce_perms_must_keep_candidates_together():
    torch.manual_seed(0)
    critic = mk.MLPCritic((2, 2, 2), hidden=(3,))
    zs = [torch.randn(4, 2) for _ in range(3)]
    bad = torch.stack([torch.arange(4), torch.tensor([1, 2, 3, 0]), torch.tensor([2, 3, 0, 1])])
    with pytest.raises(ValueError, match="equal for all j >= 1"):
        mk.infonce_bound(critic, *zs, perms=bad.unsqueeze(0))
    with pytest.raises(ValueError, match="anchor"):
        mk.infonce_bound(critic, *zs, perms=bad.flip(1).unsqueeze(0))


def test_gradient_penalty_bad_inputs(setup2):
    critic, a, b = setup2
    with pytest.raises(TypeError, match="sequences"):
        mk.gradient_penalty(critic, a, b)
    with pytest.raises(ValueError, match="must match"):
        mk.gradient_penalty(critic, (a, b), (a[:5], b[:5]))
    with pytest.raises(ValueError, match="epsilon must have shape"):
        mk.gradient_penalty(critic, (a, b), (a, b), epsilon=torch.rand(5))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        mk.gradient_penalty(critic, (a, b), (a, b), epsilon=torch.full((6,), 1.5))
    with pytest.raises(ValueError, match="gp_weight"):
        mk.wasserstein_loss(critic, a, b, gp_weight=-1.0)


def test_critic_construction_errors():
    with pytest.raises(ValueError, match="at least 2 modalities"):
        mk.MLPCritic((3,))
    with pytest.raises(ValueError, match=r"dims\[1\]"):
        mk.MLPCritic((3, 0))
    with pytest.raises(ValueError, match="activation"):
        mk.MLPCritic((3, 4), activation="swish")
    with pytest.raises(ValueError, match="hidden"):
        mk.MLPCritic((3, 4), hidden=())
    with pytest.raises(TypeError, match="dims"):
        mk.MLPCritic(5)


# ------------------------------------------------------------------------- critic and API
def test_critic_split_first_layer_equals_concatenated_linear():
    torch.manual_seed(0)
    for act in mk.ACTIVATIONS:
        critic = mk.MLPCritic((3, 4, 2), hidden=(6, 5), activation=act)
        zs = [torch.randn(7, d) for d in (3, 4, 2)]
        x = torch.cat(zs, 1)
        h = mk.ACTIVATIONS[act](F.linear(x, critic.first_weight(), critic.first_bias))
        h = mk.ACTIVATIONS[act](critic.hidden_layers[0](h))
        torch.testing.assert_close(critic(*zs), critic.out(h).squeeze(-1))
        proj = critic.project(zs)
        torch.testing.assert_close(critic.head(sum(proj) + critic.first_bias), critic(*zs))


def test_shuffles_come_from_the_generator():
    torch.manual_seed(0)
    critic = mk.MLPCritic((3, 4), hidden=(5,))
    zs = [torch.randn(16, 3), torch.randn(16, 4)]
    v1 = mk.dv_bound(critic, *zs, negatives=3, generator=torch.Generator().manual_seed(5))
    v2 = mk.dv_bound(critic, *zs, negatives=3, generator=torch.Generator().manual_seed(5))
    v3 = mk.dv_bound(critic, *zs, negatives=3, generator=torch.Generator().manual_seed(6))
    assert v1.item() == v2.item() and v1.item() != v3.item()
    samples = product_of_marginals(16, 2, 3, generator=torch.Generator().manual_seed(5))
    assert samples.perms.shape == (3, 2, 16) and samples.num_samples == 48
    assert (samples.perms[:, 0] == torch.arange(16)).all()
    for k in range(3):  # each shuffle is a permutation
        assert sorted(samples.perms[k, 1].tolist()) == list(range(16))


def test_batched_permutations_are_uniform_permutations():
    """The GPU draw of draw_shuffles (one batched argsort of random keys): every row is a
    permutation, the same generator state gives the same draw, and positions are uniform
    (chi-square over 6,000 draws of B = 6, far from any plausible threshold if biased)."""
    from mdm_kernels.negatives import batched_permutations
    p1 = batched_permutations(4, 2, 9, torch.Generator().manual_seed(3), "cpu")
    p2 = batched_permutations(4, 2, 9, torch.Generator().manual_seed(3), "cpu")
    assert p1.shape == (4, 2, 9) and p1.dtype == torch.int64 and torch.equal(p1, p2)
    assert all(torch.equal(r.sort().values, torch.arange(9)) for r in p1.reshape(-1, 9))
    draws = batched_permutations(6000, 1, 6, torch.Generator().manual_seed(0), "cpu")[:, 0]
    counts = torch.stack([torch.bincount(draws[:, pos], minlength=6) for pos in range(6)])
    expected = 6000 / 6
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 70.0, chi2  # 25 dof (rows and columns fixed): mean 25, sd ~7


def test_backend_dispatch():
    torch.manual_seed(0)
    critic = mk.MLPCritic((3, 4), hidden=(5,))
    zs = [torch.randn(6, 3), torch.randn(6, 4)]
    perms = product_of_marginals(6, 2, 1, generator=torch.Generator().manual_seed(0)).perms
    ref = mk.dv_bound(critic, *zs, perms=perms, backend="reference")
    assert mk.dv_bound(critic, *zs, perms=perms, backend="auto").item() == ref.item()
    with pytest.raises(mk.BackendUnavailable, match="cuda"):
        mk.dv_bound(critic, *zs, perms=perms, backend="cuda")
    # custom callables only run on the reference
    with pytest.raises(mk.BackendUnavailable, match="MLPCritic"):
        mk.dv_bound(product_critic, torch.randn(6, 3), torch.randn(6, 3), backend="triton")


def test_dependency_penalty_two_stage_update():
    torch.manual_seed(0)
    zs = [torch.randn(8, d, requires_grad=True) for d in (3, 4, 5)]
    for kind in ("mine", "nwj", "js", "infonce", "wasserstein"):
        pen = mk.DependencyPenalty(kind, (3, 4, 5), hidden=(6,), weight=0.5,
                                   ema_decay=0.9 if kind == "mine" else None)
        g = torch.Generator().manual_seed(1)
        crit = pen.critic_loss(*zs, generator=g)
        crit.backward()
        assert all(z.grad is None for z in zs)  # the critic step never touches the model
        assert all(p.grad is not None for p in pen.critic.parameters())
        bound = pen.bound(*zs, generator=torch.Generator().manual_seed(2))
        term = pen(*zs, generator=torch.Generator().manual_seed(2))
        torch.testing.assert_close(term, -0.5 * bound)
        term.backward()
        assert all(z.grad is not None and torch.isfinite(z.grad).all() for z in zs)
        est = pen.estimate(*zs, generator=torch.Generator().manual_seed(2))
        assert not est.requires_grad and est.item() == pytest.approx(bound.item())
        for z in zs:
            z.grad = None
    with pytest.raises(ValueError, match="kind"):
        mk.DependencyPenalty("mutual", (3, 4))
    with pytest.raises(ValueError, match="ema_decay"):
        mk.DependencyPenalty("js", (3, 4), ema_decay=0.9)


def test_mine_ema_state_round_trips_through_state_dict():
    pen = mk.DependencyPenalty("mine", (3, 4), hidden=(5,), ema_decay=0.9)
    zs = [torch.randn(8, 3), torch.randn(8, 4)]
    pen.critic_loss(*zs).backward()
    state = pen.state_dict()
    other = mk.DependencyPenalty("mine", (3, 4), hidden=(5,), ema_decay=0.9)
    other.load_state_dict(state)
    assert other.ema.log_value.item() == pen.ema.log_value.item()


def test_wasserstein_loss_combines_dependency_and_penalty():
    torch.manual_seed(0)
    critic = mk.MLPCritic((3, 4), hidden=(5,), activation="gelu")
    zs = [torch.randn(6, 3), torch.randn(6, 4)]
    perms = product_of_marginals(6, 2, 2, generator=torch.Generator().manual_seed(0)).perms
    eps = torch.rand(12)
    loss = mk.wasserstein_loss(critic, *zs, perms=perms, epsilon=eps, gp_weight=3.0)
    dep = mk.wasserstein_dependency(critic, *zs, perms=perms)
    joint = [z.repeat(2, 1) for z in zs]
    marg = [z[perms[:, j].reshape(-1)] for j, z in enumerate(zs)]
    gp = mk.gradient_penalty(critic, joint, marg, epsilon=eps)
    torch.testing.assert_close(loss, -dep + 3.0 * gp)

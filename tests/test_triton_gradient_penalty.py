"""Fused gradient penalty (``mdm_kernels.ops.gradient_penalty``) against the float64
double-backward oracle (``mdm_kernels.reference.gradient_penalty``).

Without a GPU the kernels run in Triton's CPU interpreter (tests/conftest.py).  Every axis
(activation, depth, Gram/direct path, shapes, one-sided, ε, dtype, dead rows) is covered
against a small base case so the file stays fast.
"""
from __future__ import annotations

import copy
import importlib

import pytest
import torch

from mdm_kernels import estimators
from mdm_kernels.critic import MLPCritic
from mdm_kernels.dispatch import get_backend
from mdm_kernels.negatives import product_of_marginals
ref_gp = importlib.import_module("mdm_kernels.reference.gradient_penalty")

gp_ops = pytest.importorskip("mdm_kernels.ops.gradient_penalty")
# the entry (a torch.library custom op around gp_ops' launches)
gp_entry = pytest.importorskip("mdm_kernels.ops.triton_ops")

# triton 3.6's interpreter converts the persistent loop's range() bounds with a numpy
# deprecation warning; harmless (compiled kernels never see it).
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")

ACTS = ("relu", "leaky_relu", "gelu", "softplus", "tanh")


def make_critic(dims, hidden, act, seed=0):
    torch.manual_seed(seed)
    critic = MLPCritic(dims, hidden, act)
    with torch.no_grad():  # O(1) input gradients so both sides of ‖∇T‖ = 1 are visited
        for p in critic.parameters():
            p.mul_(2.0)
    return critic


def make_pairs(dims, n, device, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    joint = [torch.randn(n, d, generator=g).to(device=device, dtype=dtype).requires_grad_()
             for d in dims]
    marginal = [torch.randn(n, d, generator=g).to(device=device, dtype=dtype).requires_grad_()
                for d in dims]
    eps = torch.rand(n, generator=g).to(device)
    return joint, marginal, eps


def reference_gp(critic, joint, marginal, eps, one_sided, scale=1.0):
    """Float64 oracle: value, parameter grads (name -> tensor or None), input grads."""
    c64 = copy.deepcopy(critic).double()
    j64 = [t.detach().double().requires_grad_() for t in joint]
    m64 = [t.detach().double().requires_grad_() for t in marginal]
    gp = ref_gp.gradient_penalty_terms(c64, j64, m64, eps.detach().double(), one_sided)
    (scale * gp).backward()
    params = {name: p.grad for name, p in c64.named_parameters()}
    return gp.detach(), params, [t.grad for t in j64 + m64]


def assert_close_grad(got, want, rtol, what):
    if want is None or not bool(torch.any(want != 0)):
        assert got is None or bool(torch.all(got == 0)), f"{what}: expected no/zero gradient"
        return
    assert got is not None, f"{what}: missing gradient"
    assert torch.isfinite(got).all(), f"{what}: non-finite gradient"
    got = got.detach().double().cpu()
    want = want.cpu()
    err = float((got - want).abs().max())
    scale = float(want.abs().max())
    assert err <= rtol * scale + 1e-9, f"{what}: max err {err:.3e} vs max |ref| {scale:.3e}"


def check_against_reference(critic, joint, marginal, eps, one_sided=False, rtol=2e-4,
                            value_rtol=2e-5):
    gp = gp_entry.fused_gradient_penalty(critic, joint, marginal, eps, one_sided)
    assert gp.dim() == 0 and gp.dtype == torch.float32
    gp.backward()
    gp = gp.detach()
    want, pgrads, zgrads = reference_gp(critic, joint, marginal, eps, one_sided)
    assert torch.isfinite(gp)
    assert abs(float(gp) - float(want)) <= value_rtol * max(1.0, abs(float(want))), \
        (float(gp), float(want))
    for name, p in critic.named_parameters():
        assert_close_grad(p.grad, pgrads[name], rtol, name)
    for k, (t, w) in enumerate(zip(list(joint) + list(marginal), zgrads)):
        assert t.grad is None or t.grad.dtype == t.dtype
        assert_close_grad(t.grad, w, rtol, f"z[{k}]")
    return gp


# (dims, hidden): Σd > H_1 takes the Gram path, Σd ≤ H_1 the direct W_1ᵀu path.
GRAM_1 = ((3, 5), (7,))           # D = 8 > 7
DIRECT_1 = ((3, 5), (11,))        # D = 8 ≤ 11
GRAM_2 = ((5, 7), (6, 9))         # D = 12 > 6
DIRECT_2 = ((3, 2), (13, 5))      # D = 5 ≤ 13


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("shape", [GRAM_1, DIRECT_1], ids=["gram", "direct"])
def test_one_hidden_layer(device, act, shape):
    dims, hidden = shape
    critic = make_critic(dims, hidden, act).to(device)
    joint, marginal, eps = make_pairs(dims, 37, device)
    check_against_reference(critic, joint, marginal, eps)


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("shape", [GRAM_2, DIRECT_2], ids=["gram", "direct"])
def test_two_hidden_layers(device, act, shape):
    dims, hidden = shape
    critic = make_critic(dims, hidden, act, seed=3).to(device)
    joint, marginal, eps = make_pairs(dims, 37, device, seed=4)
    check_against_reference(critic, joint, marginal, eps)


# Widths above the interpreter's 16-wide chunks of G / W_1 / W_2 (gradient_penalty
# ._INTERP_CHUNK), none a multiple of 16: the kernel loops over several chunks, the last
# one partial, on both paths and depths.
CHUNKED = {"gram-1": ((29, 20), (37,)), "direct-1": ((9, 11), (37,)),
           "gram-2": ((30, 17), (37, 21)), "direct-2": ((13, 6), (41, 35))}


@pytest.mark.parametrize("act", ["gelu", "relu"])
@pytest.mark.parametrize("shape", list(CHUNKED.values()), ids=list(CHUNKED))
def test_chunked_weight_matrices(device, act, shape):
    dims, hidden = shape
    assert max(hidden) > gp_ops._INTERP_CHUNK
    critic = make_critic(dims, hidden, act, seed=7).to(device)
    with torch.no_grad():  # keep ‖∇T‖ around 1 at these widths
        for p in critic.parameters():
            p.mul_(0.5)
    joint, marginal, eps = make_pairs(dims, 37, device, seed=8)
    check_against_reference(critic, joint, marginal, eps)


@pytest.mark.parametrize("act", ["relu", "leaky_relu"])
@pytest.mark.parametrize("hidden", [(7,), (6, 9)])
def test_piecewise_linear_gradients_that_vanish_are_none(device, act, hidden):
    """relu / leaky_relu: σ'' = 0, so the penalty's gradients w.r.t. the inputs, b_1 and b_2
    are identically zero; the op returns None for them (autograd then runs no projection
    GEMM backward) while the weights get theirs."""
    dims = (5, 7)
    critic = make_critic(dims, hidden, act).to(device)
    joint, marginal, eps = make_pairs(dims, 23, device)
    gp = gp_entry.fused_gradient_penalty(critic, joint, marginal, eps, False)
    gp.backward()
    assert all(t.grad is None for t in joint + marginal)
    assert critic.first_bias.grad is None
    for layer in critic.hidden_layers:
        assert layer.bias.grad is None and layer.weight.grad is not None
    assert all(w.grad is not None and bool(w.grad.any()) for w in critic.first_weights)
    assert critic.out.weight.grad is not None
    # a curved activation keeps every gradient
    critic = make_critic(dims, hidden, "tanh").to(device)
    joint, marginal, eps = make_pairs(dims, 23, device)
    gp_entry.fused_gradient_penalty(critic, joint, marginal, eps, False).backward()
    assert all(t.grad is not None for t in joint + marginal)
    assert critic.first_bias.grad is not None


def test_paths_are_selected():
    assert gp_ops._critic_weights(make_critic(*GRAM_1, "tanh"))[2] is True
    assert gp_ops._critic_weights(make_critic(*DIRECT_1, "tanh"))[2] is False


@pytest.mark.parametrize("n", [2, 3, 37])
@pytest.mark.parametrize("dims,hidden", [((13, 7, 3), (11,)), ((2, 3), (5, 3)),
                                         ((17, 5), (19, 6))],
                         ids=["m3-gram", "m2-2layer-gram", "m2-2layer-direct"])
def test_odd_shapes(device, n, dims, hidden):
    critic = make_critic(dims, hidden, "gelu", seed=n).to(device)
    joint, marginal, eps = make_pairs(dims, n, device, seed=n + 1)
    check_against_reference(critic, joint, marginal, eps)


@pytest.mark.parametrize("act,shape", [("softplus", GRAM_1), ("tanh", DIRECT_2),
                                       ("relu", GRAM_2)])
def test_one_sided(device, act, shape):
    dims, hidden = shape
    critic = make_critic(dims, hidden, act, seed=5).to(device)
    joint, marginal, eps = make_pairs(dims, 37, device, seed=6)
    gp = check_against_reference(critic, joint, marginal, eps, one_sided=True)
    two_sided = gp_entry.fused_gradient_penalty(critic, joint, marginal, eps, False).detach()
    assert float(gp) <= float(two_sided) + 1e-6


def test_one_sided_all_below_one_is_zero(device):
    critic = make_critic((3, 4), (6,), "tanh").to(device)
    with torch.no_grad():
        critic.out.weight.mul_(1e-3)  # ‖∇T‖ ≪ 1 everywhere
    joint, marginal, eps = make_pairs((3, 4), 5, device)
    gp = check_against_reference(critic, joint, marginal, eps, one_sided=True)
    assert float(gp) == 0.0


def test_explicit_eps_endpoints(device):
    """ε = 0 / 1 / ½ rows: x̂ is exactly the marginal / joint / midpoint row."""
    dims, hidden = (3, 5), (7, 4)
    critic = make_critic(dims, hidden, "gelu").to(device)
    joint, marginal, _ = make_pairs(dims, 6, device)
    eps = torch.tensor([0.0, 1.0, 0.5, 0.0, 1.0, 0.25], device=device)
    check_against_reference(critic, joint, marginal, eps)
    # ε = 1 everywhere: the marginal rows get no gradient.
    for t in joint + marginal:
        t.grad = None
    gp = gp_entry.fused_gradient_penalty(critic, joint, marginal, torch.ones(6, device=device),
                                       False)
    gp.backward()
    assert all(t.grad is None or not bool(t.grad.any()) for t in marginal)


@pytest.mark.parametrize("hidden", [(7,), (7, 5)])
def test_dead_relu_rows(device, hidden):
    """Rows with an all-zero input gradient: penalty 1 each, finite gradients = oracle."""
    dims = (3, 5)
    critic = make_critic(dims, hidden, "relu").to(device)
    with torch.no_grad():
        critic.first_bias.fill_(-1.0)  # zero inputs → a_1 = −1 → every unit dead
    joint, marginal, eps = make_pairs(dims, 10, device)
    with torch.no_grad():
        for t in joint + marginal:
            t[::2] = 0.0      # even rows dead, odd rows (mostly) alive
            t[1::2] *= 4.0
    gp = check_against_reference(critic, joint, marginal, eps)
    assert torch.isfinite(gp)


def test_fully_dead_critic(device):
    dims = (3, 5)
    critic = make_critic(dims, (7,), "relu").to(device)
    with torch.no_grad():
        critic.first_bias.fill_(-1e3)
    joint, marginal, eps = make_pairs(dims, 9, device)
    gp = check_against_reference(critic, joint, marginal, eps)
    assert float(gp) == 1.0
    for p in critic.parameters():
        assert p.grad is None or torch.isfinite(p.grad).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [GRAM_1, DIRECT_2], ids=["gram-1", "direct-2"])
def test_half_inputs(device, dtype, shape):
    dims, hidden = shape
    critic = make_critic(dims, hidden, "tanh").to(device)
    joint, marginal, eps = make_pairs(dims, 19, device, dtype=dtype)
    # the oracle sees the same (rounded) half values; the kernel accumulates in float32 and
    # only the returned z-gradients are rounded to half.
    rtol = 1e-2 if dtype == torch.float16 else 2e-2
    check_against_reference(critic, joint, marginal, eps, rtol=rtol, value_rtol=1e-4)


def test_grad_output_scaling_and_value_only(device):
    dims, hidden = GRAM_2
    critic = make_critic(dims, hidden, "softplus").to(device)
    joint, marginal, eps = make_pairs(dims, 11, device)
    gp = gp_entry.fused_gradient_penalty(critic, joint, marginal, eps, False)
    (-3.0 * gp).backward()
    want, pgrads, zgrads = reference_gp(critic, joint, marginal, eps, False, scale=-3.0)
    for name, p in critic.named_parameters():
        assert_close_grad(p.grad, pgrads[name], 2e-4, name)
    for t, w in zip(joint + marginal, zgrads):
        assert_close_grad(t.grad, w, 2e-4, "z")
    with torch.no_grad():
        value = gp_entry.fused_gradient_penalty(critic, joint, marginal, eps, False)
    assert not value.requires_grad
    assert abs(float(value) - float(want)) < 2e-5 * max(1.0, float(want))


def test_public_gradient_penalty_backend(device):
    dims, hidden = (4, 3, 2), (5,)
    critic = make_critic(dims, hidden, "gelu").to(device)
    joint, marginal, _ = make_pairs(dims, 13, device)
    out = {}
    for backend in ("triton", "reference"):
        critic.zero_grad(set_to_none=True)
        for t in joint + marginal:
            t.grad = None
        gen = torch.Generator(device=device).manual_seed(7)
        gp = estimators.gradient_penalty(critic, joint, marginal, generator=gen,
                                         backend=backend)
        gp.backward()
        out[backend] = (gp.detach(), [None if p.grad is None else p.grad.clone()
                                      for p in critic.parameters()],
                        [t.grad.clone() for t in joint + marginal])
    (v1, p1, z1), (v2, p2, z2) = out["triton"], out["reference"]
    assert torch.allclose(v1, v2, rtol=1e-5, atol=1e-6)
    for a, b in zip(p1 + z1, p2 + z2):
        if b is None:
            assert a is None or not bool(a.any())
        else:
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)


def test_reference_gradcheck():
    """The oracle itself is right: its double-backward gradient passes gradcheck (float64,
    smooth activation) w.r.t. the inputs and a first-layer weight."""
    torch.manual_seed(0)
    critic = MLPCritic((2, 3), (4, 3), "softplus").double()
    joint = [torch.randn(4, d, dtype=torch.float64, requires_grad=True) for d in (2, 3)]
    marginal = [torch.randn(4, d, dtype=torch.float64, requires_grad=True) for d in (2, 3)]
    eps = torch.rand(4, dtype=torch.float64)

    assert torch.autograd.gradcheck(
        lambda *xs: ref_gp.gradient_penalty(critic, xs[:2], xs[2:], epsilon=eps),
        tuple(joint + marginal), eps=1e-6, atol=1e-5)
    assert torch.autograd.gradcheck(
        lambda *xs: ref_gp.gradient_penalty(critic, xs[:2], xs[2:], epsilon=eps,
                                            one_sided=True),
        tuple(joint + marginal), eps=1e-6, atol=1e-5)
    # w.r.t. the parameters: through torch.func.functional_call
    names = [n for n, _ in critic.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_() for p in critic.parameters())

    def gp_of_params(*ps):
        mod = lambda *zs: torch.func.functional_call(critic, dict(zip(names, ps)), zs)  # noqa
        return ref_gp.gradient_penalty(mod, [t.detach() for t in joint],
                                       [t.detach() for t in marginal], epsilon=eps)

    assert torch.autograd.gradcheck(gp_of_params, params, eps=1e-6, atol=1e-5)


def _wasserstein_case(device, negatives, act="gelu", hidden=(7,), dims=(3, 5, 2), b=9):
    if negatives == "all":
        b = 4  # the dependency part scores all B^m grid samples
    critic = make_critic(dims, hidden, act, seed=11).to(device)
    g = torch.Generator().manual_seed(12)
    zs = [torch.randn(b, d, generator=g).to(device).requires_grad_() for d in dims]
    return critic, zs


@pytest.mark.parametrize("negatives,act,hidden", [("shuffle", "gelu", (7,)),
                                                  (3, "tanh", (6, 5)),
                                                  (2, "relu", (11,)),
                                                  ("all", "softplus", (4,))])
def test_wasserstein_loss_matches_reference(device, negatives, act, hidden):
    critic, zs = _wasserstein_case(device, negatives, act, hidden)
    out = {}
    for backend in ("triton", "reference"):
        critic.zero_grad(set_to_none=True)
        for z in zs:
            z.grad = None
        gen = torch.Generator(device=device).manual_seed(21)
        loss = estimators.wasserstein_loss(critic, *zs, negatives=negatives, generator=gen,
                                           backend=backend, gp_weight=10.0)
        loss.backward()
        out[backend] = (loss.detach(), [None if p.grad is None else p.grad.clone()
                                        for p in critic.parameters()],
                        [z.grad.clone() for z in zs])
    (v1, p1, z1), (v2, p2, z2) = out["triton"], out["reference"]
    assert torch.allclose(v1, v2, rtol=1e-5, atol=1e-5), (float(v1), float(v2))
    for a, b in zip(p1 + z1, p2 + z2):
        if b is None:
            assert a is None or not bool(a.any())
        else:
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-5), float((a - b).abs().max())


@pytest.mark.parametrize("path", ["single", "grid"])
@pytest.mark.parametrize("one_sided", [False, True], ids=["two-sided", "one-sided"])
def test_wasserstein_terms_all_three(device, one_sided, path, monkeypatch):
    """The backend's combined call (shared projections — the one-program kernel's or torch
    GEMMs —, repeated joint rows → atomics) against the float64 reference composition, term
    by term, values and gradients."""
    from mdm_kernels.ops import single_program
    monkeypatch.setattr(single_program, "SINGLE_PROGRAM_MAX_WORK",
                        10 ** 9 if path == "single" else 0)
    dims, b, kp = (3, 4, 2), 7, 3
    critic = make_critic(dims, (5, 4), "tanh", seed=2).to(device)
    g = torch.Generator().manual_seed(3)
    zs = [torch.randn(b, d, generator=g).to(device).requires_grad_() for d in dims]
    samples = product_of_marginals(b, len(dims), kp, generator=g, device=device)
    gp_perms = product_of_marginals(b, len(dims), kp, generator=g, device=device).perms
    eps = torch.rand(kp * b, generator=g).to(device)

    terms = get_backend("triton").wasserstein_terms(critic, zs, samples, gp_perms, eps,
                                                    one_sided)
    c64 = copy.deepcopy(critic).double()
    z64 = [z.detach().double().requires_grad_() for z in zs]
    want = get_backend("reference").wasserstein_terms(c64, z64, samples, gp_perms,
                                                      eps.double(), one_sided)
    weights = (1.0, -2.0, 5.0)
    for t, w in zip(terms, want):
        t, w = t.detach(), w.detach()
        assert abs(float(t) - float(w)) <= 2e-5 * max(1.0, abs(float(w))), (float(t), float(w))
    sum(c * t for c, t in zip(weights, terms)).backward()
    sum(c * t for c, t in zip(weights, want)).backward()
    for (name, p), q in zip(critic.named_parameters(), c64.parameters()):
        assert_close_grad(p.grad, q.grad, 2e-4, name)
    for k, (z, w) in enumerate(zip(zs, z64)):
        assert_close_grad(z.grad, w.grad, 2e-4, f"z[{k}]")


def test_torch_compile_traces_fused_ops(device):
    """wasserstein_loss and gradient_penalty on the Triton backend inside torch.compile:
    one graph (``fullgraph=True``: the fused ops are custom ops, ``ops/triton_ops.py``) and
    the values and z-gradients equal the eager call's."""
    critic = make_critic((3, 4), (7,), "relu", seed=5).to(device)
    g = torch.Generator().manual_seed(6)
    zs = [torch.randn(5, d, generator=g).to(device).requires_grad_() for d in (3, 4)]
    perms = product_of_marginals(5, 2, 2, generator=g, device=device).perms
    eps = torch.rand(10, generator=g).to(device)

    def loss(a, b):
        w = estimators.wasserstein_loss(critic, a, b, perms=perms, epsilon=eps,
                                        backend="triton")
        gp = estimators.gradient_penalty(critic, [a, b], [a.flip(0), b.flip(0)],
                                         epsilon=eps[:5], backend="triton")
        return 2.0 * w + gp

    eager = loss(*zs)
    g_eager = torch.autograd.grad(eager, zs)
    compiled = torch.compile(loss, backend="eager", fullgraph=True)(*zs)
    g_comp = torch.autograd.grad(compiled, zs)
    assert torch.allclose(compiled, eager)
    for a, b in zip(g_comp, g_eager):
        assert torch.allclose(a, b)

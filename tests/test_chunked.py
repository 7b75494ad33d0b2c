"""The chunked plain-torch path (``backend="chunked"``, :mod:`mdm_kernels.chunked`) against the
float64 reference, its dispatch, and the reference's memory guard (issue 27).

Every estimator, every activation, one and two hidden layers, ``"all"`` and ``"distinct"``,
m = 2, 3, 4 on odd shapes (B prime or 2, non-power-of-two widths), with block sizes that
split the grid into many row and column blocks: values and the gradients of the critic's
parameters and of every z.  Then extreme scores (|T| ~ 1e4), gradcheck, half inputs,
``torch.compile(fullgraph=True)`` and opcheck of the custom ops, the memory bound, ``"auto"``'s threshold, and the
:class:`~mdm_kernels.reference.estimators.GridTooLarge` guard.
"""
import math

import pytest
import torch

import mdm_kernels as mk
from mdm_kernels import MLPCritic, chunked
from mdm_kernels.critic import ACTIVATIONS
from mdm_kernels.dispatch import (CHUNKED_AUTO_MIN_GRID, BackendUnavailable, grid_cells,
                                  resolve_backend)
from mdm_kernels.reference import estimators as ref

KINDS = ref.KINDS
DIMS = (3, 5, 2, 7)


def _case(m, batch, hidden=(7,), activation="tanh", dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    critic = MLPCritic(DIMS[:m], hidden=hidden, activation=activation).to(dtype)
    zs = [torch.randn(batch, d, dtype=dtype, requires_grad=True) for d in DIMS[:m]]
    return critic, zs


def _value_and_grads(terms, kind, critic, zs, samples):
    joint, marginal = terms(kind, critic, zs, samples)
    bound = joint - marginal
    grads = torch.autograd.grad(bound, list(critic.parameters()) + list(zs))
    return bound, grads


def _assert_matches(kind, critic, zs, negatives, block_elements, atol=1e-10):
    samples = ref.resolve_samples(kind, zs, negatives, None, None)
    want, want_g = _value_and_grads(ref.dependency_terms, kind, critic, zs, samples)
    got, got_g = _value_and_grads(
        lambda *a: chunked.dependency_terms(*a, block_elements=block_elements),
        kind, critic, zs, samples)
    torch.testing.assert_close(got, want, atol=atol, rtol=1e-9)
    names = [n for n, _ in critic.named_parameters()] + [f"z{k}" for k in range(len(zs))]
    for name, g, w in zip(names, got_g, want_g):
        torch.testing.assert_close(g, w, atol=atol, rtol=1e-8, msg=lambda s: f"{name}: {s}")


@pytest.mark.parametrize("m", (2, 3, 4))
@pytest.mark.parametrize("negatives", ("all", "distinct"))
@pytest.mark.parametrize("kind", KINDS)
def test_matches_reference_every_activation_and_depth(kind, negatives, m):
    """float64 values and gradients equal the reference's, for every activation and one or
    two hidden layers; block_elements = 37 cuts the grid into blocks of 1-5 rows."""
    batch = {2: 7, 3: 5, 4: 4}[m]
    for activation in ACTIVATIONS:
        for hidden in ((7,), (6, 5)):
            critic, zs = _case(m, batch, hidden, activation)
            _assert_matches(kind, critic, zs, negatives, block_elements=37)


@pytest.mark.parametrize("kind", KINDS)
def test_column_blocks_and_tiny_batch(kind):
    """Blocks narrower than a row (block_elements < B·H: columns split too, down to one
    sample per block) and B = 2, the smallest batch."""
    critic, zs = _case(2, 11, hidden=(9,), activation="gelu")
    for block_elements in (1, 20, 45):
        _assert_matches(kind, critic, zs, "all", block_elements)
        _assert_matches(kind, critic, zs, "distinct", block_elements)
    critic, zs = _case(3, 3, hidden=(4, 3), activation="softplus")
    _assert_matches(kind, critic, zs, "distinct", 5)
    critic, zs = _case(2, 2, hidden=(3,), activation="relu")
    _assert_matches(kind, critic, zs, "all", 1)
    _assert_matches(kind, critic, zs, "distinct", 1)


@pytest.mark.parametrize("kind", KINDS)
def test_extreme_scores_do_not_overflow(kind):
    """|T| ~ 1e4: the online log-sum-exp and the saved LSE keep everything finite and equal
    to the reference (float64), and finite in float32."""
    critic, zs = _case(3, 5, hidden=(6,), activation="leaky_relu")
    with torch.no_grad():
        critic.out.weight.mul_(4e3)
        critic.out.bias.fill_(-3e3)
    samples = ref.resolve_samples(kind, zs, "all", None, None)
    scores = ref.marginal_scores(critic, zs, samples)
    assert scores.abs().max() > 1e3  # the case is extreme
    _assert_matches(kind, critic, zs, "all", 50, atol=1e-7)
    critic32, zs32 = critic.float(), [z.detach().float().requires_grad_() for z in zs]
    joint, marginal = chunked.dependency_terms(kind, critic32, zs32, samples, 50)
    grads = torch.autograd.grad(joint - marginal, list(critic32.parameters()) + zs32)
    assert torch.isfinite(joint - marginal)
    assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("kind,negatives,m,hidden", [
    ("dv", "all", 3, (4,)), ("infonce", "distinct", 3, (3, 4)), ("js", "distinct", 2, (5,)),
    ("nwj", "all", 2, (3, 2)), ("wasserstein", "distinct", 3, (3,))])
def test_gradcheck(kind, negatives, m, hidden):
    """torch.autograd.gradcheck of the chunked marginal term (float64, finite differences)
    w.r.t. every z and every critic parameter."""
    critic, zs = _case(m, 4, hidden, "softplus")
    params = list(critic.parameters())
    samples = ref.resolve_samples(kind, zs, negatives, None, None)

    def term(*tensors):
        zs_, ps = tensors[:m], tensors[m:]
        with torch.nn.utils.stateless._reparametrize_module(
                critic, dict(zip([n for n, _ in critic.named_parameters()], ps))):
            return chunked.chunked_marginal_term(kind, critic, zs_, samples, block_elements=9)

    inputs = tuple(z.detach().requires_grad_() for z in zs) + \
        tuple(p.detach().requires_grad_() for p in params)
    assert torch.autograd.gradcheck(term, inputs, eps=1e-6, atol=1e-7)


def test_half_inputs_match_float32_reference():
    """float16 z's with a float32 critic compute in float32, like the reference."""
    critic, zs = _case(3, 6, hidden=(8,), activation="relu", dtype=torch.float32)
    zs16 = [z.detach().half() for z in zs]
    for kind in KINDS:
        got = {"dv": mk.dv_bound, "nwj": mk.nwj_bound, "js": mk.js_bound,
               "infonce": mk.infonce_bound, "wasserstein": mk.wasserstein_dependency}[kind]
        neg = {} if kind == "infonce" else {"negatives": "all"}
        a = got(critic, *zs16, backend="chunked", **neg)
        b = got(critic, *zs16, backend="reference", **neg)
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, atol=2e-6, rtol=1e-5)


def test_public_losses_and_wasserstein_gp():
    """The public API with backend="chunked": losses, MINE's moving average, the Wasserstein
    loss (its GP by the reference) and shuffles (delegated) equal the reference."""
    critic, zs = _case(2, 6, hidden=(5, 4), activation="tanh")
    for neg in ("all", "distinct", 3):
        for fn in (mk.nwj_loss, mk.js_loss, mk.infonce_loss, mk.mine_loss):
            a = fn(critic, *zs, negatives=neg, backend="chunked",
                   generator=torch.Generator().manual_seed(1))
            b = fn(critic, *zs, negatives=neg, backend="reference",
                   generator=torch.Generator().manual_seed(1))
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
        a = mk.wasserstein_loss(critic, *zs, negatives=neg, backend="chunked",
                                generator=torch.Generator().manual_seed(2))
        b = mk.wasserstein_loss(critic, *zs, negatives=neg, backend="reference",
                                generator=torch.Generator().manual_seed(2))
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


from test_backend_integration import _saved_elements  # noqa: E402  (tests/ on sys.path)


def test_memory_is_linear_in_batch():
    """The autograd graph holds O(m·B·H) (the factors, no grid), and the allocator's peak
    during forward + backward stays within a few blocks plus O(B·H), while the reference's
    grows like B^m."""
    from mdm_kernels.bench import torch_cpu_peak_bytes
    block = 1 << 11
    hidden = 16
    saved = {}
    for b in (12, 24):
        critic, zs = _case(3, b, hidden=(hidden,), activation="gelu", dtype=torch.float32)
        for backend in ("chunked", "reference"):
            saved[backend, b] = _saved_elements(
                lambda: mk.dv_bound(critic, *zs, negatives="all", backend=backend))
    assert saved["reference", 24] > 24 ** 3 * hidden
    assert saved["chunked", 24] < 4 * 3 * 24 * (hidden + max(DIMS))
    assert saved["chunked", 24] - saved["chunked", 12] <= saved["chunked", 12]

    samples = ref.resolve_samples("dv", zs, "all", None, None)

    def step():
        j, mg = chunked.dependency_terms("dv", critic, zs, samples, block_elements=block)
        (mg - j).backward()

    peak = torch_cpu_peak_bytes(step)
    if peak is None:
        pytest.skip("torch.profiler reports no CPU allocator events here")
    bound = 4 * (8 * block + 8 * 3 * 24 * (hidden + max(DIMS))) + (64 << 10)
    assert peak < bound, (peak, bound)
    assert peak * 10 < ref.reference_bytes(critic, zs, 24 ** 3, 24 ** 3)


@pytest.mark.parametrize("kind,hidden", [("dv", (6, 4))])
def test_torch_compile_fullgraph(kind, hidden):
    """Under torch.compile the block loop is two custom ops (fake kernels, autograd formula):
    fullgraph=True traces, and the compiled loss equals eager in value and gradients (one
    case: compiling costs ~10 s; the fake kernels of every statistic's shape are checked by
    opcheck below)."""
    critic, zs = _case(3, 5, hidden=hidden, activation="gelu", dtype=torch.float32)
    fn = {"dv": mk.mine_loss, "infonce": mk.infonce_loss, "js": mk.js_loss}[kind]

    def loss(*zs_):
        return fn(critic, *zs_, negatives="all", backend="chunked")

    inputs = list(zs) + list(critic.parameters())
    eager = loss(*zs)
    g_eager = torch.autograd.grad(eager, inputs)
    torch._dynamo.reset()
    try:
        compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
        got = compiled(*zs)
        g_got = torch.autograd.grad(got, inputs)
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(got, eager)
    for a, b in zip(g_got, g_eager):
        torch.testing.assert_close(a, b)


def test_custom_ops_pass_opcheck():
    """torch.library.opcheck on the forward op: schema, fake kernel and autograd formula."""
    critic, zs = _case(2, 4, hidden=(3, 2), activation="tanh")
    for kind in ("dv", "infonce", "wasserstein"):
        samples = ref.resolve_samples(kind, zs, "distinct", None, None)
        spec = chunked.grid_spec(kind, critic, samples, 5)
        factors, head = chunked.grid_factors(kind, critic, zs)
        args = ([f.detach().requires_grad_() for f in factors],
                [h.detach().requires_grad_() for h in head]) + chunked._spec_args(spec)
        torch.library.opcheck(chunked._grid_fwd_op, args)


def test_backend_selection():
    """``"chunked"`` is a backend name; ``"auto"`` runs it off the fused backends for grids of
    at least CHUNKED_AUTO_MIN_GRID cells with an MLPCritic of <= 2 hidden layers, and the
    reference otherwise; explicit requests it cannot serve say why."""
    assert "chunked" in mk.BACKEND_NAMES
    side = math.isqrt(CHUNKED_AUTO_MIN_GRID)
    assert side * side == CHUNKED_AUTO_MIN_GRID
    critic = MLPCritic((3, 2), hidden=(4,))

    def pick(batch, negatives, kind="dv", crit=critic, backend="auto"):
        zs = [torch.randn(batch, 3), torch.randn(batch, 2)]
        samples = ref.resolve_samples(kind, zs, negatives, None, None)
        return resolve_backend(backend, kind, crit, zs, samples).name

    assert pick(side, "all") == "chunked"
    assert pick(side, "distinct", "infonce") == "chunked"
    assert pick(side - 1, "all") == "reference"
    assert pick(side, "shuffle") == "reference"
    assert pick(side, 4, "infonce") == "reference"
    deep = MLPCritic((3, 2), hidden=(4, 4, 4))
    assert pick(side, "all", crit=deep) == "reference"
    assert pick(side, "all", crit=lambda a, b: a.sum(1) * b.sum(1)) == "reference"
    with pytest.raises(BackendUnavailable, match="at most 2 hidden layers"):
        pick(4, "all", crit=deep, backend="chunked")
    with pytest.raises(BackendUnavailable, match="takes an MLPCritic"):
        pick(4, "all", crit=lambda a, b: a.sum(1) * b.sum(1), backend="chunked")
    assert grid_cells("dv", ref.product_of_marginals(5, 3, "distinct")) == 125
    assert grid_cells("infonce", ref.product_of_marginals(5, 3, "all")) == 25


def test_bad_arguments():
    critic, zs = _case(2, 4)
    samples = ref.resolve_samples("dv", zs, "all", None, None)
    with pytest.raises(ValueError, match="block_elements"):
        chunked.chunked_marginal_term("dv", critic, zs, samples, block_elements=0)
    with pytest.raises(ValueError, match="kind"):
        chunked.chunked_marginal_term("mi", critic, zs, samples)
    shuffles = ref.resolve_samples("dv", zs, 2, None, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="perms"):
        chunked.chunked_marginal_term("dv", critic, zs, shuffles)
    with pytest.raises(TypeError, match="MLPCritic"):
        chunked.chunked_marginal_term("dv", lambda a, b: a.sum(1), zs, samples)


# --------------------------------------------------------------------------- memory guard

def test_guard_raises_before_allocating(monkeypatch):
    """Over the limit the reference raises GridTooLarge naming the sample count, the size and
    the alternatives, before scoring anything; the chunked path runs the same call."""
    critic, zs = _case(3, 9, hidden=(8,), dtype=torch.float32)
    monkeypatch.setenv(ref.MAX_BYTES_ENV, "1e5")
    monkeypatch.setattr(ref, "score_rows",
                        lambda *a: pytest.fail("the reference scored before the guard"))
    with pytest.raises(ref.GridTooLarge) as info:
        mk.dv_bound(critic, *zs, negatives="all", backend="reference")
    msg = str(info.value)
    assert "738 samples" in msg and "B=9" in msg and "m=3" in msg  # 9 + 9**3
    assert "backend='chunked'" in msg and ref.MAX_BYTES_ENV in msg
    assert issubclass(ref.GridTooLarge, MemoryError)
    monkeypatch.undo()
    assert torch.isfinite(mk.dv_bound(critic, *zs, negatives="all", backend="chunked"))


def test_guard_uses_available_memory(monkeypatch):
    """Without the environment limit, estimates >= 256 MiB are compared with the device's
    available memory (read once, here replaced); small ones never read it."""
    monkeypatch.delenv(ref.MAX_BYTES_ENV, raising=False)
    reads = []

    def fake_available(device_type, index):
        reads.append(device_type)
        return 200 << 20

    monkeypatch.setattr(ref, "_available_bytes", fake_available)
    critic = MLPCritic((128, 128), hidden=(128,))
    big = [torch.randn(300, 128), torch.randn(300, 128)]   # 270 MiB predicted
    assert ref.reference_bytes(critic, big, 300 + 300 ** 2, 300 ** 2) > 256 << 20
    monkeypatch.setattr(ref, "score_rows",
                        lambda *a: pytest.fail("the reference scored before the guard"))
    with pytest.raises(ref.GridTooLarge, match="memory available on cpu"):
        mk.dv_bound(critic, *big, negatives="all", backend="reference")
    assert reads == ["cpu"]
    reads.clear()
    small = [torch.randn(6, 128), torch.randn(6, 128)]
    samples = ref.resolve_samples("dv", small, "all", None, None)
    ref.check_memory("dv", critic, small, samples)
    assert reads == []


def test_guard_rejects_a_bad_limit(monkeypatch):
    critic, zs = _case(2, 4)
    monkeypatch.setenv(ref.MAX_BYTES_ENV, "lots")
    with pytest.raises(ValueError, match=ref.MAX_BYTES_ENV):
        mk.dv_bound(critic, *zs, negatives="all", backend="reference")


def test_reference_bytes_brackets_the_measured_peak():
    """The guard's estimate is conservative but close: between 1x and 1.6x the allocator's
    measured peak of the reference's forward + backward ("all", m = 2)."""
    from mdm_kernels.bench import torch_cpu_peak_bytes
    critic, zs = _case(2, 96, hidden=(32, 16), activation="relu", dtype=torch.float32)

    def step():
        mk.dv_bound(critic, *zs, negatives="all", backend="reference").backward()

    step()
    peak = torch_cpu_peak_bytes(step)
    if peak is None:
        pytest.skip("torch.profiler reports no CPU allocator events here")
    predicted = ref.reference_bytes(critic, zs, 96 + 96 ** 2, 96 ** 2)
    assert peak <= predicted <= 1.6 * peak, (peak, predicted)

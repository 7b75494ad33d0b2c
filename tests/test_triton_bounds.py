"""Fused Triton estimators (``mdm_kernels.ops.router`` and its kernel families) against the float64 reference.

Every kernel test runs twice, once per execution strategy: ``"single"`` (the whole step in one
program, :mod:`mdm_kernels.ops.single_program`) and ``"grid"`` (the persistent
multi-program kernels).

Without a GPU the kernels run in Triton's CPU interpreter (conftest sets TRITON_INTERPRET=1),
which is slow: shapes stay tiny and every axis (estimator, negatives mode, activation, depth,
shape, dtype, extreme scores) is covered against a small base case rather than as a full
cartesian product.  Values and gradients of every z and every critic parameter are checked.
"""
from __future__ import annotations

import copy
import sys

import pytest
import torch
from torch.testing import assert_close

import mdm_kernels
from mdm_kernels import MLPCritic
from mdm_kernels.ops.triton_helpers import project_modalities
from mdm_kernels.ops.router import fused_dependency_terms
from mdm_kernels.reference.estimators import KINDS, dependency_terms, resolve_samples

# Upstream weights of (joint, marginal) so both gradient paths are exercised.
W_JOINT, W_MARG = 0.7, -1.3

# Compiled kernels on a GPU when there is one, else the CPU interpreter.
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

# Tolerances against the float64 reference per input dtype (docs/triton_backend.md,
# "Numerics on a GPU"): exact float32 arithmetic in the interpreter; compiled, exp is
# ex2.approx and fp32 division div.full (≈ 1e-6 relative per score with tanh and 3×TF32),
# so float32 gets 2.5× more room there.  Half precision is bound by rounding the inputs.
TOL_INTERPRETER = {
    torch.float32: dict(rtol=2e-5, atol=2e-6),
    torch.float16: dict(rtol=2e-3, atol=2e-4),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1e-3),
}
TOL_GPU = {**TOL_INTERPRETER, torch.float32: dict(rtol=5e-5, atol=5e-6)}
TOL = TOL_GPU if DEVICE.type == "cuda" else TOL_INTERPRETER


@pytest.fixture(params=["single", "grid"], autouse=True)
def strategy(request, monkeypatch):
    """The execution strategy of every fused call in the test (``STRATEGY`` below)."""
    monkeypatch.setattr(sys.modules[__name__], "STRATEGY", request.param)
    return request.param


STRATEGY = "auto"


def _terms(kind, critic, zs, samples, **kwargs):
    return fused_dependency_terms(kind, critic, zs, samples, strategy=STRATEGY, **kwargs)


def _explicit_perms(kind, B, m, K, gen):
    if kind == "infonce":
        cand = torch.stack([torch.randperm(B, generator=gen) for _ in range(K)])
        rows = [torch.arange(B).expand(K, B)] + [cand] * (m - 1)
        return torch.stack(rows, dim=1).contiguous().to(DEVICE)
    return torch.stack([torch.stack([torch.randperm(B, generator=gen) for _ in range(m)])
                        for _ in range(K)]).to(DEVICE)


def _make(B, dims, hidden, act, dtype, seed, out_scale=None, z_scale=1.0):
    torch.manual_seed(seed)
    critic = MLPCritic(dims, hidden, act).to(DEVICE)
    if out_scale is not None:
        with torch.no_grad():
            critic.out.weight.mul_(out_scale)
    gen = torch.Generator().manual_seed(seed + 1)
    zs = [(z_scale * torch.randn(B, d, generator=gen)).to(DEVICE, dtype).requires_grad_()
          for d in dims]
    return critic, zs


def _reference(kind, critic, zs, samples):
    critic64 = copy.deepcopy(critic).double()
    zs64 = [z.detach().double().requires_grad_() for z in zs]
    joint, marg = dependency_terms(kind, critic64, zs64, samples)
    (W_JOINT * joint + W_MARG * marg).backward()
    return joint, marg, [z.grad for z in zs64], [p.grad for p in critic64.parameters()]


def check(kind, *, B=5, dims=(3, 4), hidden=(7,), act="tanh", negatives="all", K=3,
          dtype=torch.float32, seed=0, out_scale=None, z_scale=1.0, tol=None, grad_tol=None):
    critic, zs = _make(B, dims, hidden, act, dtype, seed, out_scale, z_scale)
    gen = torch.Generator().manual_seed(seed + 2)
    perms = None
    if negatives == "perms":
        perms, negatives = _explicit_perms(kind, B, len(dims), K, gen), None
    elif negatives == "K":
        negatives = K
    samples = resolve_samples(kind, zs, negatives, perms, gen)

    joint, marg = _terms(kind, critic, zs, samples)
    assert joint.dtype == marg.dtype == torch.float32 and joint.dim() == marg.dim() == 0
    (W_JOINT * joint + W_MARG * marg).backward()

    rj, rm, rz, rp = _reference(kind, critic, zs, samples)
    tol = tol or TOL[dtype]
    grad_tol = grad_tol or tol
    assert torch.isfinite(joint) and torch.isfinite(marg)
    assert_close(joint.double(), rj.detach(), **tol)
    assert_close(marg.double(), rm.detach(), **tol)
    for k, (z, g) in enumerate(zip(zs, rz)):
        assert z.grad is not None and z.grad.dtype == dtype, f"z[{k}]"
        assert_close(z.grad.double(), g, **grad_tol, msg=lambda s: f"grad z[{k}]: {s}")
    for (name, p), g in zip(critic.named_parameters(), rp):
        assert p.grad is not None, name
        assert_close(p.grad.double(), g, **grad_tol, msg=lambda s: f"grad {name}: {s}")
    return joint, marg


# --- every estimator × every negatives mode (base critic: 1 hidden layer of 7, tanh) -------
@pytest.mark.parametrize("negatives", ["shuffle", "K", "perms", "all"])
@pytest.mark.parametrize("kind", KINDS)
def test_estimator_and_negatives(kind, negatives):
    check(kind, negatives=negatives)


# --- every activation, with 1 and 2 hidden layers (H not a power of two) ---------------------
@pytest.mark.parametrize("hidden", [(7,), (6, 5)], ids=["1layer", "2layers"])
@pytest.mark.parametrize("act,kind,negatives", [
    ("relu", "dv", "all"), ("gelu", "infonce", "all"), ("softplus", "js", "perms"),
    ("tanh", "nwj", "K"), ("leaky_relu", "wasserstein", "all")])
def test_activations_and_depth(act, kind, negatives, hidden):
    check(kind, act=act, hidden=hidden, negatives=negatives, seed=1)


@pytest.mark.parametrize("kind", ["dv", "infonce", "js"])
def test_two_layers_wide(kind):
    """H_2 = 37 > the 32-wide chunk of the second layer: exercises the H_2 loop."""
    check(kind, hidden=(11, 37), act="gelu", negatives="all", seed=2)


# --- odd shapes: B ∈ {2, 3, 37}, prime dims, m = 3 --------------------------------------------
@pytest.mark.parametrize("kind,B,dims,negatives", [
    ("dv", 2, (2, 3, 5), "all"),
    ("infonce", 3, (5, 2, 3), "all"),
    ("nwj", 3, (7, 3, 2), "K"),
    ("js", 3, (3, 2, 5), "perms"),
    ("infonce", 3, (2, 3, 7), "perms"),
    ("wasserstein", 2, (3, 2), "all"),
    ("dv", 37, (3, 5), "K"),
    ("infonce", 37, (5, 3), "shuffle"),
    ("js", 11, (2, 3), "all"),
    ("nwj", 11, (3, 2, 5), "all"),  # m = 3 "all": B not a multiple of any tile
    ("dv", 40, (3, 2), "all"),      # m = 2 "all": fused, chunks of 2, 2 and 1 column blocks
])
def test_odd_shapes(kind, B, dims, negatives):
    check(kind, B=B, dims=dims, hidden=(13,), act="softplus", negatives=negatives, seed=3)


def test_three_modalities_two_layers():
    check("dv", B=3, dims=(2, 3, 5), hidden=(5, 3), act="relu", negatives="all", seed=4)


# --- dtypes: half inputs, float32 accumulation -------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("kind,negatives", [("dv", "all"), ("infonce", "perms"), ("js", "K")])
def test_half_dtypes(kind, negatives, dtype):
    check(kind, negatives=negatives, dtype=dtype, hidden=(7, 5), seed=5)


# --- extreme scores: |T| up to ~1e4 ------------------------------------------------------------
@pytest.mark.parametrize("kind,negatives", [
    ("dv", "all"), ("dv", "K"), ("infonce", "all"), ("infonce", "perms"), ("js", "all"),
    ("wasserstein", "K")])
def test_extreme_scores(kind, negatives):
    critic, zs = _make(5, (3, 4), (7,), "relu", torch.float32, 6, out_scale=4e4, z_scale=3.0)
    with torch.no_grad():
        top = critic(*zs).abs().max()
    assert top > 2e3, "the test must actually reach large scores"
    joint, marg = check(kind, negatives=negatives, act="relu", seed=6, out_scale=4e4,
                        z_scale=3.0, tol=dict(rtol=1e-4, atol=1e-2),
                        grad_tol=dict(rtol=1e-3, atol=1e-1))
    assert abs(marg.item()) > 1e2 or kind == "js"


def test_nwj_large_but_finite_scores():
    """NWJ uses exp(lme − 1): finite as long as the value itself is (scores ~ 60-80)."""
    check("nwj", negatives="all", act="relu", seed=7, out_scale=60.0, z_scale=2.0,
          tol=dict(rtol=1e-4, atol=1e-4), grad_tol=dict(rtol=1e-4, atol=1e-3))


# --- API: shared projections, public dispatch, torch.compile, determinism ---------------------
def test_precomputed_projections():
    critic, zs = _make(5, (3, 4), (7,), "gelu", torch.float32, 8)
    samples = resolve_samples("dv", zs, "all", None, None)
    proj = project_modalities(critic, zs)
    j1, m1 = fused_dependency_terms("dv", critic, zs, samples, projections=proj)
    j2, m2 = _terms("dv", critic, zs, None)  # "all" as None
    assert_close(j1, j2)
    assert_close(m1, m2)
    (j1 - m1).backward()
    assert all(z.grad is not None for z in zs)


@pytest.mark.parametrize("kind", ["dv", "infonce"])
def test_public_api_backend_triton(kind):
    critic, zs = _make(6, (3, 4), (7,), "tanh", torch.float32, 9)
    perms = _explicit_perms(kind, 6, 2, 2, torch.Generator().manual_seed(0))
    bound = getattr(mdm_kernels, f"{kind}_bound")
    fused = bound(critic, *zs, perms=perms, backend="triton")
    ref = bound(critic, *zs, perms=perms, backend="reference")
    assert_close(fused, ref, rtol=1e-5, atol=1e-6)


def test_torch_compile_fullgraph():
    """The fused estimator inside torch.compile: one graph (custom ops, no graph break),
    the eager values and gradients."""
    critic, zs = _make(5, (3, 4), (7,), "relu", torch.float32, 10)
    perms = _explicit_perms("dv", 5, 2, 2, torch.Generator().manual_seed(1))

    def fn(a, b):
        return 2.0 * mdm_kernels.dv_bound(critic, a, b, perms=perms, backend="triton") + 1.0

    eager = fn(*zs)
    g_eager = torch.autograd.grad(eager, zs)
    compiled = torch.compile(fn, backend="eager", fullgraph=True)(*zs)
    g_comp = torch.autograd.grad(compiled, zs)
    assert_close(compiled, eager)
    for a, b in zip(g_comp, g_eager):
        assert_close(a, b)


@pytest.mark.parametrize("hidden", [(6, 5), (7,)], ids=["gathered-tiles", "outer-sum"])
def test_all_mode_is_deterministic(hidden):
    """"all" has no atomics (one backward launch per owner factor or side): bitwise
    reproducible."""
    critic, zs = _make(5, (3, 4), hidden, "gelu", torch.float32, 11)
    grads = []
    for _ in range(2):
        for z in zs:
            z.grad = None
        critic.zero_grad()
        j, m = _terms("dv", critic, zs, None)
        (j - m).backward()
        grads.append([z.grad.clone() for z in zs] + [p.grad.clone() for p in critic.parameters()])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_rejects_bad_kind():
    critic, zs = _make(3, (2, 2), (4,), "relu", torch.float32, 12)
    with pytest.raises(ValueError):
        fused_dependency_terms("mine", critic, zs, None)


# --- the one-program step: when it applies, what it refuses, what it launches ----------------
def _count_launches(monkeypatch, module, names):
    """Wrap kernels of ``module`` so that each ``kernel[grid](...)`` launch is counted."""
    counts = dict.fromkeys(names, 0)

    class Counted:
        def __init__(self, name, kernel):
            self.name, self.kernel = name, kernel

        def __getitem__(self, grid):
            counts[self.name] += 1
            return self.kernel[grid]

        def __getattr__(self, attr):  # the autotuner's fields (launch_tuned reads them)
            return getattr(self.kernel, attr)

    for name in names:
        monkeypatch.setattr(module, name, Counted(name, getattr(module, name)))
    return counts


def test_single_program_step_is_two_launches(monkeypatch):
    """A paper-style MINE step on the one-program path: one forward and one backward
    launch, and the multi-program kernels are never used."""
    from mdm_kernels.ops import gathered_tiles, single_program
    single = _count_launches(monkeypatch, single_program,
                             ["_single_program_fwd_kernel", "_single_program_bwd_kernel"])
    grid = _count_launches(monkeypatch, gathered_tiles, ["_bounds_fwd_kernel",
                                                        "_bounds_bwd_kernel"])
    critic, zs = _make(6, (3, 4, 5), (7,), "relu", torch.float32, 13)
    loss = mdm_kernels.mine_loss(critic, *zs, negatives=2, backend="triton",
                                 generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert single == {"_single_program_fwd_kernel": 1, "_single_program_bwd_kernel": 1}
    assert grid == {"_bounds_fwd_kernel": 0, "_bounds_bwd_kernel": 0}
    assert all(z.grad is not None for z in zs)


def test_auto_strategy_switches_on_work(monkeypatch):
    """"auto" runs one program for small steps and the grid kernels above the work limit."""
    from mdm_kernels.ops import gathered_tiles, single_program
    critic, zs = _make(5, (3, 4), (7,), "tanh", torch.float32, 14)
    perms = _explicit_perms("dv", 5, 2, 2, torch.Generator().manual_seed(4))
    for limit, expected in ((10 ** 9, (1, 0)), (0, (0, 2))):
        monkeypatch.setattr(single_program, "SINGLE_PROGRAM_MAX_WORK", limit)
        single = _count_launches(monkeypatch, single_program,
                                 ["_single_program_fwd_kernel"])
        grid = _count_launches(monkeypatch, gathered_tiles, ["_bounds_fwd_kernel"])
        fused_dependency_terms("dv", critic, zs, perms, strategy="auto")
        assert (single["_single_program_fwd_kernel"], grid["_bounds_fwd_kernel"]) == expected
        monkeypatch.undo()


def test_single_program_limits():
    """Five modalities or a half-precision critic: "single" refuses with the reason, "auto"
    takes the grid kernels and still matches the reference."""
    critic, zs = _make(3, (2, 2, 2, 2, 2), (4,), "relu", torch.float32, 15)
    with pytest.raises(ValueError, match="at most 4 modalities"):
        fused_dependency_terms("dv", critic, zs, None, strategy="single")
    joint, marg = fused_dependency_terms("dv", critic, zs, None, strategy="auto")
    rj, rm, _, _ = _reference("dv", critic, zs, resolve_samples("dv", zs, "all", None, None))
    assert_close(marg.double(), rm.detach(), **TOL[torch.float32])
    half = MLPCritic((2, 2), (4,)).to(DEVICE, torch.float16)
    zh = [torch.randn(3, 2, device=DEVICE, dtype=torch.float16) for _ in range(2)]
    with pytest.raises(ValueError, match="float32 critic"):
        fused_dependency_terms("dv", half, zh, None, strategy="single")
    wide = MLPCritic((2, 2), (520,)).to(DEVICE)
    with pytest.raises(ValueError, match="at most 512 units"):
        fused_dependency_terms("dv", wide, zs[:2], None, strategy="single")
    with pytest.raises(ValueError, match="strategy must be one of"):
        fused_dependency_terms("dv", critic, zs, None, strategy="fast")
    with pytest.raises(ValueError, match="projections"):
        fused_dependency_terms("dv", critic, zs, None, strategy="single",
                               projections=project_modalities(critic, zs))


def test_detached_inputs_and_unused_term():
    """The critic step (z's detached) and a loss that uses one term only: the backward
    skips ∂z and treats the missing incoming gradient as zero."""
    critic, zs = _make(5, (3, 4), (7, 5), "gelu", torch.float32, 16)
    zd = [z.detach() for z in zs]
    perms = _explicit_perms("dv", 5, 2, 2, torch.Generator().manual_seed(3))
    joint, marg = _terms("dv", critic, zd, perms)
    marg.backward()  # joint unused: its incoming gradient is None
    got = [p.grad.clone() for p in critic.parameters()]
    critic64 = copy.deepcopy(critic).double()
    samples = resolve_samples("dv", zd, None, perms, None)
    _, rm = dependency_terms("dv", critic64, [z.double() for z in zd], samples)
    rm.backward()
    for (name, _), a, b in zip(critic.named_parameters(), got, critic64.parameters()):
        assert_close(a.double(), b.grad, **TOL[torch.float32], msg=lambda s: f"{name}: {s}")


def test_four_modalities():
    """m = 4 fills every per-modality slot of the one-program kernels."""
    check("dv", B=3, dims=(2, 3, 5, 2), hidden=(6,), act="relu", negatives="K", seed=17)
    check("infonce", B=3, dims=(2, 3, 5, 2), hidden=(6,), act="gelu", negatives="all", seed=17)


# --- "distinct" negatives: coinciding indices masked inside the tiles ------------------------
@pytest.mark.parametrize("kind,B,dims,hidden,grid_path", [
    ("dv", 5, (3, 4), (7,), "outer"),                 # two factors
    ("infonce", 4, (3, 2, 5), (7,), "outer"),         # anchor × grouped candidate, j ≠ i
    ("js", 3, (2, 3, 5), (5,), "outer"),              # three factors, B = m
    ("nwj", 5, (3, 4), (5, 3), "grid"),               # two hidden layers: gathered tiles
    ("infonce", 3, (3, 4), (5, 3), "grid"),
    ("wasserstein", 4, (2, 3, 2, 3), (5,), "grid"),   # four factors
])
def test_distinct_negatives(kind, B, dims, hidden, grid_path):
    """"distinct" (pairwise distinct indices; InfoNCE: the B − 1 candidates j ≠ i) on every
    kernel family against the reference, values and gradients: the one program under
    "single", the outer sums or the gathered tiles under "grid" (asserted)."""
    from mdm_kernels.ops.router import execution_path
    critic, zs = _make(B, dims, hidden, "tanh", torch.float32, 19)
    samples = resolve_samples(kind, zs, "distinct", None, None)
    expected = "single" if STRATEGY == "single" else grid_path
    assert execution_path(kind, critic, zs, samples, strategy=STRATEGY) == expected
    check(kind, B=B, dims=dims, hidden=hidden, negatives="distinct", seed=19)


def test_distinct_public_api_and_wasserstein_loss(strategy):
    """backend="triton" runs "distinct" (no refusal) and matches the reference, the
    Wasserstein loss (estimator + gradient penalty at a fresh shuffle) included."""
    if strategy != "single":
        pytest.skip("the public API picks its own strategy: run once")
    critic, zs = _make(5, (3, 4), (7,), "relu", torch.float32, 20)
    for bound in (mdm_kernels.dv_bound, mdm_kernels.infonce_bound):
        assert_close(bound(critic, *zs, negatives="distinct", backend="triton"),
                     bound(critic, *zs, negatives="distinct", backend="reference"),
                     rtol=1e-5, atol=1e-6)
    losses = [mdm_kernels.wasserstein_loss(critic, *zs, negatives="distinct", backend=b,
                                           generator=torch.Generator().manual_seed(0))
              for b in ("triton", "reference")]
    assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dims,hidden,expected", [
    ((3, 4), (7,), (1, 1, 0, 0)), ((3, 4, 2), (7,), (1, 1, 0, 0)),
    ((3, 4), (7, 5), (0, 0, 0, 3))],
    ids=["m2-1layer", "m3-1layer", "m2-2layers"])
def test_all_grid_takes_outer_sum_kernels(monkeypatch, dims, hidden, expected):
    """"all" over two or three modalities with one hidden layer runs the outer-sum kernels
    (one forward launch, one fused backward launch); two hidden layers stay on the
    gathered-tile kernels (their backward: the joint term, then one launch per factor)."""
    from mdm_kernels.ops import gathered_tiles, outer_sums
    names = ["_outer_fwd_kernel", "_outer_bwd_fused_kernel", "_outer_bwd_kernel"]
    outer = _count_launches(monkeypatch, outer_sums, names)
    grid = _count_launches(monkeypatch, gathered_tiles, ["_bounds_bwd_kernel"])
    critic, zs = _make(5, dims, hidden, "relu", torch.float32, 18)
    joint, marg = fused_dependency_terms("dv", critic, zs, None, strategy="grid")
    (joint - marg).backward()
    got = (*(outer[n] for n in names), grid["_bounds_bwd_kernel"])
    assert got == expected


@pytest.mark.parametrize("kind,B,dims,hidden,negatives,expected", [
    ("dv", 256, (64, 64, 64), (128,), "shuffle", "single"),      # paper scale
    ("dv", 256, (64, 64, 64), (128,), 8, "single"),
    ("infonce", 128, (64, 64, 64), (128,), "all", "single"),
    ("dv", 4096, (128, 128), (128,), "all", "outer"),            # issue 7's "all" sweep
    ("infonce", 4096, (64, 64, 64), (128,), "all", "outer"),
    ("dv", 1000, (64, 64, 64), (128,), "all", "outer"),          # m = 3, 10^9 samples
    ("dv", 4096, (128, 128), (128, 128), "all", "grid"),         # two hidden layers
    ("dv", 64, (8, 8, 8, 8), (16,), "all", "grid"),               # m = 4 "all": gathered
    ("dv", 65536, (64, 64, 64), (128,), "shuffle", "grid"),      # too big for one program
])
def test_execution_path_of_typical_steps(kind, B, dims, hidden, negatives, expected):
    """Which kernel family runs typical steps (shapes only: nothing is launched)."""
    from mdm_kernels.ops.router import execution_path
    critic = MLPCritic(dims, hidden).to("meta")
    zs = [torch.empty(B, d, device="meta") for d in dims]
    perms = None if negatives == "all" else torch.zeros(
        1 if negatives == "shuffle" else negatives, len(dims), B, dtype=torch.int64,
        device="meta")
    assert execution_path(kind, critic, zs, perms) == expected

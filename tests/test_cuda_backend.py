"""CUDA C++ backend (csrc/ via mdm_kernels._cuda) against the pure-PyTorch oracle.

* GPU tests (skipped without a CUDA device and a built extension): values and gradients of
  every estimator, every negatives mode (``"distinct"`` included), each dtype, odd shapes,
  extreme scores, a backward split into chunks, bitwise determinism, the gradient penalty,
  the public API with ``backend="cuda"``, the current stream (CUDA-graph capture, side
  streams) and the caller's current device (tensors on cuda:1, skipped below 2 GPUs).
* CPU tests: the dispatch errors (no extension / CPU tensors / unsupported critics), the input
  checks that run before any launch (errors naming the argument), the backward's CSR owner
  lists, and the Python glue (custom ops, autograd wiring, stats layout, gradient
  coefficients) driven by a float64 stand-in for the extension that mirrors the kernels' math
  on host memory.
"""
from __future__ import annotations

import ctypes

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import mdm_kernels as mk
from mdm_kernels.dispatch import BackendUnavailable, resolve_backend
from mdm_kernels.ops import cuda_backend, cuda_ops
from mdm_kernels.ops.cuda_backend import fused_dependency_terms
from mdm_kernels.reference.estimators import KINDS, dependency_terms, resolve_samples
from mdm_kernels.reference.gradient_penalty import gradient_penalty_terms

HAS_GPU = torch.cuda.is_available()
gpu = pytest.mark.skipif(
    not (HAS_GPU and cuda_backend.is_built()),
    reason="needs a CUDA device and the built extension mdm_kernels._cuda "
           "(no GPU here: CI checks the build in tests/test_cuda_build.py)")
two_gpus = pytest.mark.skipif(
    not (HAS_GPU and cuda_backend.is_built() and torch.cuda.device_count() >= 2),
    reason="needs two CUDA devices and the built extension")

ACTS = ("relu", "leaky_relu", "tanh", "softplus", "gelu")
MODES = ("shuffle", 3, "perms", "all", "distinct")
TOL = {torch.float32: (2e-4, 2e-4), torch.float16: (1e-2, 1e-2), torch.bfloat16: (4e-2, 4e-2)}


def make_case(dims=(5, 3, 9), hidden=37, act="tanh", batch=7, dtype=torch.float32,
              device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    critic = mk.MLPCritic(dims, hidden=(hidden,), activation=act)
    with torch.no_grad():
        for p in critic.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    critic = critic.to(device)
    zs = [torch.randn(batch, d, generator=gen).to(device=device, dtype=dtype) for d in dims]
    return critic, zs


def mode_args(mode, kind, batch, m, device, seed=1):
    """(negatives, perms) for a test mode; "perms" builds explicit (K, m, B) indices."""
    if mode != "perms":
        return mode, None
    gen = torch.Generator().manual_seed(seed)
    k = 2
    if kind == "infonce":
        shared = torch.stack([torch.randperm(batch, generator=gen) for _ in range(k)])
        perms = torch.stack([torch.arange(batch).expand(k, -1)] + [shared] * (m - 1), dim=1)
    else:
        perms = torch.randint(0, batch, (k, m, batch), generator=gen)
    return "shuffle", perms.to(device)


def both(kind, critic, zs, negatives, perms, run_fused, seed=3):
    """Values and grads (critic params, zs) of joint − marginal for the reference and fused."""
    out = []
    for fused in (False, True):
        gen = torch.Generator().manual_seed(seed)
        zz = [z.detach().clone().requires_grad_(True) for z in zs]
        samples = resolve_samples(kind, zz, negatives, perms, gen)
        critic.zero_grad(set_to_none=True)
        joint, marg = (run_fused if fused else dependency_terms)(kind, critic, zz, samples)
        # distinct upstream weights exercise both upstream scalars of the backward
        (0.7 * joint - 1.3 * marg).backward()
        grads = [p.grad.detach().clone() for p in critic.parameters()] + \
            [z.grad.detach().float().clone() for z in zz]
        out.append((joint.detach().float(), marg.detach().float(), grads))
    return out


def check_kind_mode_on_cpu(kind, mode):
    """The fused op (through whatever extension is installed: stand-in or host emulation)
    against the reference for one estimator and negatives mode, softplus critic, B = 5."""
    critic, zs = make_case(act="softplus", batch=5)
    negatives, perms = mode_args(mode, kind, 5, 3, "cpu")
    ref, got = both(kind, critic, zs, negatives, perms, fused_dependency_terms)
    assert_match(ref, got, torch.float32)


def assert_match(ref, got, dtype):
    rtol, atol = TOL[dtype]
    (rj, rm, rg), (gj, gm, gg) = ref, got
    torch.testing.assert_close(gj, rj, rtol=rtol, atol=atol)
    torch.testing.assert_close(gm, rm, rtol=rtol, atol=atol)
    for a, b in zip(gg, rg):
        scale = max(1.0, float(b.abs().max()))
        torch.testing.assert_close(a.float(), b.float(), rtol=rtol, atol=atol * scale)


# ================================================================== GPU: kernels vs oracle
@gpu
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", MODES)
def test_terms_and_grads_float32(kind, mode):
    critic, zs = make_case(device="cuda")
    negatives, perms = mode_args(mode, kind, 7, 3, "cuda")
    ref, got = both(kind, critic, zs, negatives, perms, fused_dependency_terms)
    assert_match(ref, got, torch.float32)


@gpu
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("kind", ("dv", "js", "infonce"))
def test_activations(act, kind):
    critic, zs = make_case(dims=(4, 6), hidden=64, act=act, batch=16, device="cuda", seed=5)
    ref, got = both(kind, critic, zs, 2, None, fused_dependency_terms)
    assert_match(ref, got, torch.float32)


@gpu
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16))
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", ("shuffle", "all", "distinct"))
def test_half_dtypes(dtype, kind, mode):
    critic, zs = make_case(dims=(8, 5), hidden=33, act="gelu", batch=12, dtype=dtype,
                           device="cuda", seed=7)
    with torch.no_grad():  # keep scores O(1) so absolute tolerances are meaningful
        critic.out.weight.mul_(0.2)
    ref, got = both(kind, critic, zs, mode, None, fused_dependency_terms)
    assert_match(ref, got, dtype)


@gpu
@pytest.mark.parametrize("shape", [((1, 1), 1, 2), ((3, 130, 17), 129, 5),
                                   ((2, 2, 2, 2), 31, 4), ((64, 48), 300, 33)])
@pytest.mark.parametrize("kind", KINDS)
def test_odd_shapes(shape, kind):
    dims, hidden, batch = shape
    critic, zs = make_case(dims=dims, hidden=hidden, batch=batch, act="softplus",
                           device="cuda", seed=11)
    for mode in ("shuffle", "all", "distinct"):
        if mode == "distinct" and batch < (2 if kind == "infonce" else len(dims)):
            continue  # distinct needs B >= m
        ref, got = both(kind, critic, zs, mode, None, fused_dependency_terms)
        assert_match(ref, got, torch.float32)


@gpu
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bias", (1e4, -1e4))
def test_extreme_scores(kind, bias):
    critic, zs = make_case(dims=(3, 4), hidden=16, batch=9, device="cuda", seed=13)
    with torch.no_grad():
        critic.out.bias.fill_(bias)
    if kind == "nwj" and bias > 0:
        pytest.skip("exp(1e4 − 1) overflows for NWJ in every backend")
    ref, got = both(kind, critic, zs, "all", None, fused_dependency_terms)
    for t in (got[0], got[1]):
        assert torch.isfinite(t).all()
    for g in got[2]:
        assert torch.isfinite(g).all()
    rj, rm, rg = ref
    gj, gm, gg = got
    torch.testing.assert_close(gj, rj, rtol=1e-5, atol=1e-2)
    torch.testing.assert_close(gm, rm, rtol=1e-5, atol=1e-2)
    for a, b in zip(gg, rg):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)


def compare_gradient_penalty(critic, joint, marginal, eps, one_sided, rtol, atol):
    """The CUDA gradient penalty against the double-backward reference: value (at rtol/10,
    atol/10) and gradients of every critic parameter and every joint/marginal tensor."""
    results = []
    for fn in (gradient_penalty_terms, cuda_backend.fused_gradient_penalty):
        j = [t.clone().requires_grad_(True) for t in joint]
        mg = [t.clone().requires_grad_(True) for t in marginal]
        critic.zero_grad(set_to_none=True)
        gp = fn(critic, j, mg, eps, one_sided)
        gp.backward()
        grads = [p.grad.clone() if p.grad is not None else torch.zeros_like(p)
                 for p in critic.parameters()] + [t.grad.clone() for t in j + mg]
        results.append((gp.detach(), grads))
    (rv, rg), (gv, gg) = results
    torch.testing.assert_close(gv, rv, rtol=rtol / 10, atol=atol / 10)
    for a, b in zip(gg, rg):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


@gpu
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("one_sided", (False, True))
def test_gradient_penalty(act, one_sided):
    critic, joint = make_case(dims=(6, 3, 5), hidden=40, act=act, batch=13, device="cuda")
    _, marginal = make_case(dims=(6, 3, 5), hidden=40, act=act, batch=13, device="cuda", seed=9)
    eps = torch.rand(13, generator=torch.Generator().manual_seed(2)).cuda()
    compare_gradient_penalty(critic, joint, marginal, eps, one_sided, rtol=1e-3, atol=1e-4)


@gpu
def test_public_api_backend_cuda():
    critic, zs = make_case(dims=(4, 5), hidden=32, batch=10, device="cuda")
    for fn in (mk.dv_bound, mk.nwj_bound, mk.js_bound, mk.infonce_bound,
               mk.wasserstein_dependency):
        for negatives in (None, "distinct"):
            extra = {} if negatives is None else {"negatives": negatives}
            gen_a, gen_b = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
            ref = fn(critic, *zs, generator=gen_a, backend="reference", **extra)
            got = fn(critic, *zs, generator=gen_b, backend="cuda", **extra)
            torch.testing.assert_close(got, ref, rtol=2e-4, atol=2e-4)
    ref = mk.wasserstein_loss(critic, *zs, generator=torch.Generator().manual_seed(4),
                              backend="reference")
    got = mk.wasserstein_loss(critic, *zs, generator=torch.Generator().manual_seed(4),
                              backend="cuda")
    torch.testing.assert_close(got, ref, rtol=2e-4, atol=2e-4)


@gpu
def test_torch_compile_sees_ops():
    critic, zs = make_case(dims=(4, 5), hidden=32, batch=10, device="cuda")
    samples = resolve_samples("dv", zs, "all", None, None)

    def f(z1, z2):
        j, m = fused_dependency_terms("dv", critic, [z1, z2], samples)
        return j - m

    compiled = torch.compile(f, fullgraph=True)
    torch.testing.assert_close(compiled(*zs), f(*zs), rtol=1e-5, atol=1e-5)


@gpu
def test_opcheck():
    critic, zs = make_case(dims=(4, 5), hidden=32, batch=10, device="cuda")
    P = [p.detach() for p in cuda_backend.projections(critic, zs)]
    b1, w, bo = (t.detach() for t in cuda_backend.critic_params(critic))
    perms = torch.randint(0, 10, (2, 2, 10), device="cuda")
    for args in ((P, b1, w, bo, None, 0, 2, 1), (P, b1, w, bo, perms, 2, 4, 0),
                 (P, b1, w, bo, None, 3, 0, 2)):
        torch.library.opcheck(torch.ops.mdm_kernels.cuda_bounds_fwd, args,
                              test_utils=("test_schema", "test_faketensor"))


@gpu
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", ("perms", "all", "distinct"))
def test_bitwise_reproducible(kind, mode):
    """No atomics anywhere: two runs of the forward and backward ops give bitwise equal
    terms and gradients (the torch GEMMs around the ops are not part of this claim)."""
    critic, zs = make_case(dims=(5, 3, 9), hidden=70, batch=13, device="cuda", seed=17)
    _, perms = mode_args(mode, kind, 13, 3, "cuda")
    code = cuda_ops.NEGATIVES_CODES[mode]
    P = [p.detach() for p in cuda_backend.projections(critic, zs)]
    b1, w, bo = (t.detach() for t in cuda_backend.critic_params(critic))
    grad = torch.tensor([0.7, -1.3], device="cuda")
    args = (P, b1, w, bo, perms, cuda_ops.KIND_CODES[kind], 2, code)
    runs = []
    for _ in range(2):
        terms, stats = cuda_ops.bounds_fwd(*args)
        runs.append([terms, stats, *cuda_ops.bounds_bwd(*args, grad, terms, stats)])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@gpu
def test_gradient_penalty_bitwise_reproducible():
    """N = 2000 rows: more rows than partial rows (1024), reduced in a fixed order."""
    gen = torch.Generator().manual_seed(4)
    Q, dU = (torch.randn(2000, 300, generator=gen).cuda() for _ in range(2))
    b1, w = (torch.randn(300, generator=gen).cuda() for _ in range(2))
    first, second = (cuda_ops.gp_hidden_bwd(Q, b1, w, 4, dU) for _ in range(2))
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@gpu
@pytest.mark.parametrize("kind", ("dv", "js"))
def test_backward_in_chunks(kind):
    """B^m above the backward's chunk of 2^24 ids (B = 258, m = 3: two chunks) matches the
    reference."""
    ext = cuda_ops.extension()
    assert len(ext._backward_chunks(258, 3, cuda_ops.KIND_CODES[kind], 1, 1)) == 2
    critic, zs = make_case(dims=(2, 2, 2), hidden=8, batch=258, device="cuda", seed=19)
    ref, got = both(kind, critic, zs, "all", None, fused_dependency_terms)
    (rj, rm, rg), (gj, gm, gg) = ref, got
    torch.testing.assert_close(gj, rj, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gm, rm, rtol=1e-4, atol=1e-5)
    for a, b in zip(gg, rg):  # sums of 66,564 terms per row in a different order
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4 * max(1.0, float(b.abs().max())))


@gpu
def test_launches_on_the_current_stream():
    """The ops pass the current stream of the inputs' device: a whole forward + backward of
    every op captures into a CUDA graph (a launch on another stream would break the capture)
    and its replay equals the eager run bitwise; a side stream gives the same results."""
    critic, zs = make_case(dims=(4, 5), hidden=32, batch=10, device="cuda")
    P = [p.detach() for p in cuda_backend.projections(critic, zs)]
    b1, w, bo = (t.detach() for t in cuda_backend.critic_params(critic))
    perms = torch.randint(0, 10, (2, 2, 10), device="cuda")
    grad = torch.tensor([0.7, -1.3], device="cuda")
    Q = torch.randn(7, 32, device="cuda")
    dU = torch.randn(7, 32, device="cuda")

    # (kind, perms, negatives code): dv on the grid and on perms, InfoNCE "all" / "distinct"
    cases = ((0, None, 1), (0, perms, 0), (3, None, 1), (3, None, 2))

    def step():
        outs = []
        for kind, layout, code in cases:
            terms, stats = cuda_ops.bounds_fwd(P, b1, w, bo, layout, kind, 2, code)
            outs += [terms, stats, *cuda_ops.bounds_bwd(P, b1, w, bo, layout, kind, 2, code,
                                                        grad, terms, stats)]
        outs.append(cuda_ops.gp_hidden(Q, b1, w, 2))
        outs += list(cuda_ops.gp_hidden_bwd(Q, b1, w, 2, dU))
        return outs

    eager = step()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        assert cuda_ops._launch_ctx(Q) == (Q.device.index, side.cuda_stream)
        on_side = step()  # also the warm-up torch.cuda.graph asks for
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    graph.replay()
    torch.cuda.synchronize()
    for a, b, c in zip(eager, on_side, captured):
        assert torch.equal(a, b) and torch.equal(a, c)


@two_gpus
def test_inputs_on_another_device_keep_the_current_device():
    """Tensors on cuda:1 while cuda:0 is current: correct results, and cuda:0 is still current
    after the forward, the backward and the gradient penalty (the extension restores it)."""
    torch.cuda.set_device(0)
    critic, zs = make_case(device="cuda:1")
    for kind, mode in (("dv", "shuffle"), ("infonce", "all"), ("js", "distinct")):
        ref, got = both(kind, critic, zs, mode, None, fused_dependency_terms)
        assert_match(ref, got, torch.float32)
        assert torch.cuda.current_device() == 0
    _, marginal = make_case(device="cuda:1", seed=9)
    eps = torch.rand(7, generator=torch.Generator().manual_seed(2)).to("cuda:1")
    compare_gradient_penalty(critic, zs, marginal, eps, False, rtol=1e-3, atol=1e-4)
    assert torch.cuda.current_device() == 0


@two_gpus
def test_extension_restores_the_current_device():
    """The extension's own DeviceGuard (no torch context around the call): a raw launch on
    cuda:1 while cuda:0 is current leaves cuda:0 current, and computes the right U."""
    torch.cuda.set_device(0)
    Q = torch.randn(9, 40, device="cuda:1")
    b1, w = torch.randn(40, device="cuda:1"), torch.randn(40, device="cuda:1")
    U = torch.empty_like(Q)
    stream = torch.cuda.current_stream(Q.device)
    cuda_ops.extension().gp_hidden_forward(Q.data_ptr(), 9, 40, b1.data_ptr(), w.data_ptr(),
                                           2, U.data_ptr(), 1, stream.cuda_stream)
    assert torch.cuda.current_device() == 0
    stream.synchronize()
    torch.testing.assert_close(U, w * (1 - torch.tanh(Q + b1) ** 2), rtol=1e-5, atol=1e-6)


@two_gpus
def test_inputs_on_two_devices_are_refused():
    critic, zs = make_case(device="cuda:0")
    P = [p.detach() for p in cuda_backend.projections(critic, zs)]
    b1, w, bo = (t.detach() for t in cuda_backend.critic_params(critic))
    with pytest.raises(ValueError, match="w is on cuda:1 but the op's inputs are on cuda:0"):
        cuda_ops.bounds_fwd(P, b1, w.to("cuda:1"), bo, None, 0, 2, 1)
    with pytest.raises(ValueError, match=r"P\[1\] is on cuda:1"):
        cuda_ops.bounds_fwd([P[0], P[1].to("cuda:1"), P[2]], b1, w, bo, None, 0, 2, 1)


# ================================================================== CPU: dispatch and errors
def test_cuda_backend_rejects_cpu_tensors():
    critic, zs = make_case()
    if not cuda_backend.is_built():
        pytest.skip("extension not built: covered by test_missing_extension_error")
    with pytest.raises(BackendUnavailable, match="CUDA tensors"):
        mk.dv_bound(critic, *zs, backend="cuda")


def test_missing_extension_error(monkeypatch):
    monkeypatch.setattr(cuda_ops, "_cuda", None)
    monkeypatch.setattr(cuda_ops, "IMPORT_ERROR", ImportError("No module named '_cuda'"))
    critic, zs = make_case()
    with pytest.raises(BackendUnavailable, match="not built.*build_ext --inplace"):
        mk.dv_bound(critic, *zs, backend="cuda")
    reason = cuda_backend.BACKEND.unavailable_reason(torch.device("cuda"))
    assert "not built" in reason
    with pytest.raises(ImportError, match="docs/cuda_backend.md"):
        cuda_ops.extension()


def test_auto_skips_cuda_without_extension(monkeypatch):
    monkeypatch.setattr(cuda_ops, "_cuda", None)
    critic, zs = make_case()
    samples = resolve_samples("dv", zs, "shuffle", None, None)
    assert resolve_backend("auto", "dv", critic, zs, samples).name == "reference"
    # the CUDA backend is never picked by auto when it reports a reason
    assert cuda_backend.BACKEND.unavailable_reason(torch.device("cuda")) is not None


def test_unsupported_reasons():
    b = cuda_backend.BACKEND
    critic, zs = make_case()
    assert b.unsupported_reason("dv", critic, zs) is None
    deep = mk.MLPCritic((5, 3, 9), hidden=(8, 8))
    assert "1 hidden layer" in b.unsupported_reason("dv", deep, zs)
    assert "MLPCritic" in b.unsupported_reason("dv", lambda *z: z[0].sum(1), zs)
    assert "float64" in b.unsupported_reason("dv", critic.double(),
                                             [z.double() for z in zs])
    wide = mk.MLPCritic((5, 3, 9), hidden=(cuda_ops.MAX_HIDDEN + 1,))
    assert "width" in b.unsupported_reason("dv", wide, zs)


def test_batch_limit_reason(monkeypatch):
    critic, zs = make_case(batch=7)
    monkeypatch.setattr(cuda_ops, "MAX_BATCH", 6)
    assert "batches of <= 6 rows, got 7" in cuda_backend.BACKEND.unsupported_reason(
        "dv", critic, zs)


@pytest.mark.parametrize("kind", ("dv", "infonce"))
def test_distinct_negatives_are_supported(kind):
    """The CUDA backend declares 'distinct' (the dispatcher then lets it through), and the
    op gets the distinct layout code (not the 'all' grid)."""
    critic, zs = make_case()
    samples = resolve_samples(kind, zs, "distinct", None, None)
    assert cuda_backend.BACKEND.supports_distinct_negatives
    assert cuda_backend.BACKEND.unsupported_reason(kind, critic, zs, samples) is None
    assert cuda_backend.negatives_code(samples) == cuda_ops.NEGATIVES_CODES["distinct"]
    assert cuda_backend.negatives_code(resolve_samples(kind, zs, "all", None, None)) == \
        cuda_ops.NEGATIVES_CODES["all"]
    assert cuda_backend.negatives_code(resolve_samples(kind, zs, 2, None, None)) == \
        cuda_ops.NEGATIVES_CODES["perms"]


# ================================================================== CPU: input checks
def bounds_inputs(batch=5, hidden=6, m=3, dtype=torch.float32, device="cpu"):
    """Valid (P, b1, w, b_out) for the bounds ops (host tensors: CPU tests of the checks)."""
    gen = torch.Generator().manual_seed(0)
    P = [torch.randn(batch, hidden, generator=gen).to(device=device, dtype=dtype)
         for _ in range(m)]
    f32 = dict(dtype=torch.float32, device=device)
    return P, torch.zeros(hidden, **f32), torch.ones(hidden, **f32), torch.zeros(1, **f32)


def test_checks_require_cuda_tensors():
    """With the real (or no) extension, host and meta tensors are refused by name before any
    launch — the bounds, GP and backward ops all check first."""
    P, b1, w, bo = bounds_inputs()
    with pytest.raises(ValueError, match=r"P\[0\] must be a CUDA tensor.*cpu"):
        cuda_ops.check_bounds_inputs(P, b1, w, bo, None, 0, 2, 1)
    P_meta, b1_m, w_m, bo_m = bounds_inputs(device="meta")
    with pytest.raises(ValueError, match=r"P\[0\] must be a CUDA tensor.*meta"):
        cuda_ops.check_bounds_inputs(P_meta, b1_m, w_m, bo_m, None, 0, 2, 1)
    with pytest.raises(ValueError, match="Q must be a CUDA tensor"):
        cuda_ops.check_gp_inputs(torch.zeros(4, 6), b1, w, 2)
    if cuda_backend.is_built():  # the ops themselves refuse before launching anything
        with pytest.raises(ValueError, match=r"P\[0\] must be a CUDA tensor"):
            cuda_ops.bounds_fwd(P, b1, w, bo, None, 0, 2, 1)
        with pytest.raises(ValueError, match="Q must be a CUDA tensor"):
            cuda_ops.gp_hidden(torch.zeros(4, 6), b1, w, 2)


def _bad_bounds_inputs():
    """(case id, args, exception, message pattern) for the bounds checks on host tensors."""
    P, b1, w, bo = bounds_inputs()
    perms = torch.zeros(2, 3, 5, dtype=torch.int64)
    meta_w = torch.ones(6, device="meta")
    strided = torch.randn(6, 5).t()  # (5, 6), non-contiguous
    return [
        ("one projection", ([P[0]], b1, w, bo, None, 0, 2, 1), ValueError, "P must be a list"),
        ("P dtype", ([p.double() for p in P], b1, w, bo, None, 0, 2, 1), TypeError,
         r"P\[0\] must be float32/float16/bfloat16, got torch.float64"),
        ("P shape", ([P[0], P[1][:4], P[2]], b1, w, bo, None, 0, 2, 1), ValueError,
         r"P\[1\] must have shape \(5, 6\)"),
        ("P mixed dtypes", ([P[0], P[1].half(), P[2]], b1, w, bo, None, 0, 2, 1), TypeError,
         r"P\[1\] must be float32"),
        ("P non-contiguous", ([P[0], strided, P[2]], b1, w, bo, None, 0, 2, 1), ValueError,
         r"P\[1\] must be contiguous"),
        ("b1 dtype", (P, b1.half(), w, bo, None, 0, 2, 1), TypeError, "b1 must be float32"),
        ("w shape", (P, b1, w[:3], bo, None, 0, 2, 1), ValueError, r"w must have shape \(6,\)"),
        ("w device", (P, b1, meta_w, bo, None, 0, 2, 1), ValueError,
         "w is on meta but the op's inputs are on cpu"),
        ("b_out shape", (P, b1, w, torch.zeros(2), None, 0, 2, 1), ValueError, "b_out must"),
        ("kind code", (P, b1, w, bo, None, 7, 2, 1), ValueError, "kind must be one of"),
        ("act code", (P, b1, w, bo, None, 0, 9, 1), ValueError, "act must be one of"),
        ("negatives code", (P, b1, w, bo, None, 0, 2, 5), ValueError,
         "negatives must be one of"),
        ("perms missing", (P, b1, w, bo, None, 0, 2, 0), ValueError, "perms is required"),
        ("perms with a grid", (P, b1, w, bo, perms, 0, 2, 1), ValueError,
         "perms must be None"),
        ("perms dtype", (P, b1, w, bo, perms.int(), 0, 2, 0), TypeError,
         "perms must be int64"),
        ("perms shape", (P, b1, w, bo, perms[:, :2].contiguous(), 0, 2, 0), ValueError,
         r"perms must have shape \(K >= 1, 3, 5\)"),
        ("distinct batch", ([p[:2] for p in P], b1, w, bo, None, 0, 2, 2), ValueError,
         "'distinct' needs a batch of at least 3"),
    ]


@pytest.mark.parametrize("case", _bad_bounds_inputs(), ids=lambda c: c[0])
def test_bounds_checks_name_the_argument(stand_in, case):
    """Each bad input raises naming the argument, from the check and from both ops, and the
    extension is never called (host tensors pass the CUDA check only with the stand-in)."""
    _, args, exc, pattern = case
    with pytest.raises(exc, match=pattern):
        cuda_ops.check_bounds_inputs(*args)
    # (a meta input would route the op to its fake kernel: the check function covers it)
    if not any(isinstance(a, torch.Tensor) and a.is_meta for a in args):
        with pytest.raises(exc, match=pattern):
            cuda_ops.bounds_fwd(*args)
        grads = (torch.ones(2), torch.zeros(2), torch.zeros(6))
        with pytest.raises(exc, match=pattern):
            cuda_ops.bounds_bwd(*args, *grads)
    assert cuda_ops._cuda.calls == []


def test_bounds_bwd_checks_saved_tensors(stand_in):
    P, b1, w, bo = bounds_inputs()
    with pytest.raises(ValueError, match=r"stats must have shape \(6,\)"):
        cuda_ops.bounds_bwd(P, b1, w, bo, None, 0, 2, 1, torch.ones(2), torch.zeros(2),
                            torch.zeros(5))
    with pytest.raises(ValueError, match=r"grad_terms must have shape \(2,\)"):
        cuda_ops.bounds_bwd(P, b1, w, bo, None, 0, 2, 1, torch.ones(3), torch.zeros(2),
                            torch.zeros(6))
    assert cuda_ops._cuda.calls == []


@pytest.mark.parametrize("case", [
    ("Q dtype", (torch.zeros(4, 6, dtype=torch.float64),), TypeError, "Q must be float32"),
    ("Q rank", (torch.zeros(24),), ValueError, "Q must be 2-D"),
    ("Q empty", (torch.zeros(0, 6),), ValueError, "Q must have at least one row"),
    ("Q non-contiguous", (torch.zeros(6, 4).t(),), ValueError, "Q must be contiguous"),
    ("b1 shape", (torch.zeros(4, 6), torch.zeros(5)), ValueError, r"b1 must have shape \(6,\)"),
    ("w device", (torch.zeros(4, 6), torch.zeros(6), torch.zeros(6, device="meta")),
     ValueError, "w is on meta"),
    ("act code", (torch.zeros(4, 6), torch.zeros(6), torch.zeros(6), 5), ValueError,
     "act must be one of"),
], ids=lambda c: c[0])
def test_gp_checks_name_the_argument(stand_in, case):
    _, given, exc, pattern = case
    args = list(given) + [torch.zeros(6), torch.zeros(6), 2][len(given) - 1:]
    with pytest.raises(exc, match=pattern):
        cuda_ops.check_gp_inputs(*args)
    if not any(isinstance(a, torch.Tensor) and a.is_meta for a in args):
        with pytest.raises(exc, match=pattern):
            cuda_ops.gp_hidden(*args)
        with pytest.raises(exc, match=pattern):
            cuda_ops.gp_hidden_bwd(*args, torch.zeros(args[0].shape))
    good = torch.zeros(4, 6), torch.zeros(6), torch.zeros(6), 2
    with pytest.raises(ValueError, match=r"dU must be a \(4, 6\) tensor"):
        cuda_ops.gp_hidden_bwd(*good, torch.zeros(4, 5))


@pytest.mark.parametrize("kind", ("dv", "infonce"))
def test_owner_lists_group_samples_by_row(kind):
    """CSR owner lists: for every slot and row r, the ids listed are exactly the samples whose
    row (of that slot's modality) is r, in ascending order."""
    batch, m, k = 6, 3, 4
    gen = torch.Generator().manual_seed(3)
    if kind == "infonce":
        shared = torch.randint(0, batch, (k, batch), generator=gen)
        perms = torch.stack([torch.arange(batch).expand(k, -1)] + [shared] * (m - 1), dim=1)
        anchors = torch.arange(batch)[:, None]
        rows = [torch.cat([anchors, shared.t()], dim=1).reshape(-1)]  # id i·(K+1) + c
    else:
        perms = torch.randint(0, batch, (k, m, batch), generator=gen)
        rows = [perms[:, j].reshape(-1) for j in range(m)]  # id k·B + i
    order, offsets = cuda_ops.owner_lists(perms, cuda_ops.KIND_CODES[kind], batch)
    assert order.shape == (len(rows), rows[0].numel())
    assert offsets.shape == (len(rows), batch + 1)
    for slot, row_of in enumerate(rows):
        for r in range(batch):
            ids = order[slot, offsets[slot, r]:offsets[slot, r + 1]]
            expected = torch.nonzero(row_of == r).flatten()
            assert torch.equal(ids, expected), (slot, r)


def test_ops_registered_with_torch_library():
    for name in ("cuda_bounds_fwd", "cuda_bounds_bwd", "cuda_gp_hidden", "cuda_gp_hidden_bwd"):
        assert hasattr(torch.ops.mdm_kernels, name)


# ================================================================== CPU: glue via a stand-in
_CTYPES = {np.float32: ctypes.c_float, np.int64: ctypes.c_int64, np.float16: ctypes.c_uint16}


def _view(ptr, n, np_dtype):
    """A float64 torch copy / writable view of n elements at host address ptr."""
    raw = np.ctypeslib.as_array((_CTYPES[np_dtype] * n).from_address(ptr))
    if np_dtype is np.float16:
        raw = raw.view(np.float16)
    return torch.from_numpy(raw)


def _act(x, code):
    return [F.relu, lambda v: F.leaky_relu(v, 0.01), torch.tanh, F.softplus, F.gelu][code](x)


def _act_grad(x, code):
    """σ'(x) in closed form (custom-op bodies run below autograd)."""
    if code == 0:
        return (x > 0).to(x.dtype)
    if code == 1:
        return torch.where(x > 0, 1.0, 0.01).to(x.dtype)
    if code == 2:
        return 1 - torch.tanh(x) ** 2
    if code == 3:
        return torch.sigmoid(x)
    pdf = torch.exp(-0.5 * x * x) / np.sqrt(2 * np.pi)
    return 0.5 * (1 + torch.erf(x / np.sqrt(2))) + x * pdf


def _act_grad2(x, code):
    """σ''(x) in closed form."""
    if code in (0, 1):
        return torch.zeros_like(x)
    if code == 2:
        t = torch.tanh(x)
        return -2 * t * (1 - t * t)
    if code == 3:
        s = torch.sigmoid(x)
        return s * (1 - s)
    return torch.exp(-0.5 * x * x) / np.sqrt(2 * np.pi) * (2 - x * x)


def _distinct_columns(rows):
    """Columns of rows (m, N) whose m indices are pairwise distinct."""
    keep = torch.ones(rows.shape[1], dtype=torch.bool)
    for a in range(rows.shape[0]):
        for b in range(a + 1, rows.shape[0]):
            keep &= rows[a] != rows[b]
    return rows[:, keep]


class StandInExtension:
    """Mirrors csrc/ (sample sets, stats layout, gradient coefficients, the owner-row layout of
    the backward's outputs) in float64 torch on host memory, so the Python side can be tested
    end to end without a GPU.  For perms it sums each row's gradient through the CSR owner
    lists the op passes, as the kernels do."""

    HOST_MEMORY = True  # cuda_ops.check_tensor then accepts host tensors
    MAX_MODALITIES, MAX_HIDDEN, WORKSPACE_FLOATS = 8, 4096, 2 * 1024 * 3
    GP_MAX_PARTIAL_ROWS = 3  # small, so the partial-row reduction is exercised

    def __init__(self):
        self.calls = []

    @staticmethod
    def _rows(m, B, kind, negatives, perms_ptr, K):
        """(joint rows (m, B), marginal rows (m, N), InfoNCE candidates per anchor or None)."""
        joint = torch.arange(B).expand(m, B)
        if kind == 3:  # InfoNCE: anchor × candidate grid
            if negatives == 0:
                C = K + 1
                perms = _view(perms_ptr, K * m * B, np.int64).reshape(K, m, B)
                cand = torch.cat([torch.arange(B)[None], perms[:, 1]]).t().reshape(-1)
                anchors = torch.arange(B).repeat_interleave(C)
            else:
                anchors = torch.arange(B).repeat_interleave(B)
                cand = torch.arange(B).repeat(B)
                C = B
                if negatives == 2:
                    keep = anchors != cand
                    anchors, cand, C = anchors[keep], cand[keep], B - 1
            return joint, torch.stack([anchors] + [cand] * (m - 1)), C
        if negatives == 0:
            perms = _view(perms_ptr, K * m * B, np.int64).reshape(K, m, B)
            return joint, perms.permute(1, 0, 2).reshape(m, -1), None
        flat = torch.arange(B ** m)
        idx = []
        for _ in range(m):
            idx.append(flat % B)
            flat = flat // B
        rows = torch.stack(idx[::-1])
        return joint, (_distinct_columns(rows) if negatives == 2 else rows), None

    @staticmethod
    def _load(P, B, H, dtype, b1, w, b_out):
        np_dtype = {0: np.float32, 1: np.float16}[dtype]
        Ps = [_view(p, B * H, np_dtype).reshape(B, H).double() for p in P]
        return (Ps, _view(b1, H, np.float32).double(), _view(w, H, np.float32).double(),
                _view(b_out, 1, np.float32).double())

    @staticmethod
    def _pre(Ps, b1, rows):
        return b1 + sum(p[r] for p, r in zip(Ps, rows))

    def bounds_forward(self, P, B, H, dtype, b1, w, b_out, act, kind, negatives, perms, K,
                       terms, stats, workspace, device, stream):
        self.calls.append("bounds_forward")
        Ps, b1, w, bo = self._load(P, B, H, dtype, b1, w, b_out)
        joint, marg, C = self._rows(len(P), B, kind, negatives, perms, K)
        tj = _act(self._pre(Ps, b1, joint), act) @ w + bo
        tm = _act(self._pre(Ps, b1, marg), act) @ w + bo
        out_t, out_s = _view(terms, 2, np.float32), _view(stats, B + 1, np.float32)
        n = tm.numel()
        lse = torch.logsumexp(tm, 0)
        out_t[0] = float(-F.softplus(-tj).mean() if kind == 2 else tj.mean())
        if kind == 3:
            per_anchor = torch.logsumexp(tm.reshape(B, C), 1)
            out_s[:B] = per_anchor.float()
            out_t[1] = float(per_anchor.mean() - np.log(C))
        else:
            out_t[1] = float([lse - np.log(n), torch.exp(lse - np.log(n) - 1),
                              F.softplus(tm).mean(), None, tm.mean()][kind])
        out_s[B] = float(lse) if kind in (0, 1) else 0.0  # only dv/nwj reduce an LSE

    def backward_buffer_floats(self, B, m, kind, negatives, K):
        return 1  # the stand-in keeps no per-sample buffer

    def bounds_backward(self, P, B, H, dtype, b1, w, b_out, act, kind, negatives, perms, K,
                        grad_terms, terms, stats, owner_order, owner_offsets, score_grads, dP,
                        dw_rows, db_out_rows, device, stream):
        self.calls.append("bounds_backward")
        Ps, b1v, wv, bo = self._load(P, B, H, dtype, b1, w, b_out)
        g = _view(grad_terms, 2, np.float32).double()
        t = _view(terms, 2, np.float32).double()
        s = _view(stats, B + 1, np.float32).double()
        m = len(P)
        joint, marg, C = self._rows(m, B, kind, negatives, perms, K)
        outs = [_view(p, B * H, np.float32).reshape(B, H) for p in dP]
        o_w = _view(dw_rows, B * H, np.float32).reshape(B, H)
        o_bo = _view(db_out_rows, B, np.float32)
        if negatives == 0:  # the CSR owner lists built by cuda_ops.owner_lists
            slots = 1 if kind == 3 else m
            length = B * (K + 1) if kind == 3 else K * B
            order = _view(owner_order, slots * length, np.int64).reshape(slots, length)
            offsets = _view(owner_offsets, slots * (B + 1), np.int64).reshape(slots, B + 1)
        for role, rows in ((0, joint), (1, marg)):
            pre = self._pre(Ps, b1v, rows)
            score = _act(pre, act) @ wv + bo
            n = score.numel()
            if role == 0:
                coef = g[0] / B * (torch.sigmoid(-score) if kind == 2 else 1.0)
            elif kind == 0:
                coef = g[1] * torch.exp(score - s[B])
            elif kind == 1:
                coef = g[1] * t[1] * torch.exp(score - s[B])
            elif kind == 2:
                coef = g[1] / n * torch.sigmoid(score)
            elif kind == 3:
                coef = g[1] / B * torch.exp(score - s[:B].repeat_interleave(C))
            else:
                coef = g[1] / n * torch.ones_like(score)
            coef = coef * torch.ones_like(score)
            dpre = (coef[:, None] * wv * _act_grad(pre, act)).float()
            for k, out in enumerate(outs):
                if role == 1 and negatives == 0 and not (kind == 3 and k == 0):
                    slot = 0 if kind == 3 else k
                    for r in range(B):  # row r owns order[slot, offsets[r]:offsets[r + 1]]
                        ids = order[slot, offsets[slot, r]:offsets[slot, r + 1]]
                        assert bool((rows[k][ids] == r).all())
                        out[r] += dpre[ids].sum(0)
                else:
                    out.index_add_(0, rows[k], dpre)
            o_w.index_add_(0, rows[0], (coef[:, None] * _act(pre, act)).float())
            o_bo.index_add_(0, rows[0], coef.float())

    def gp_hidden_forward(self, Q, N, H, b1, w, act, U, device, stream):
        q = _view(Q, N * H, np.float32).reshape(N, H).double()
        a = q + _view(b1, H, np.float32).double()
        _view(U, N * H, np.float32).reshape(N, H)[:] = \
            (_view(w, H, np.float32).double() * _act_grad(a, act)).float()

    def gp_hidden_backward(self, Q, N, H, b1, w, act, dU, dQ, partial_rows, dw_part, db1_part,
                           device, stream):
        q = _view(Q, N * H, np.float32).reshape(N, H).double()
        a = q + _view(b1, H, np.float32).double()
        wv = _view(w, H, np.float32).double()
        du = _view(dU, N * H, np.float32).reshape(N, H).double()
        d1, d2 = _act_grad(a, act), _act_grad2(a, act)
        dq = du * wv * d2
        _view(dQ, N * H, np.float32).reshape(N, H)[:] = dq.float()
        owner = torch.arange(N) % partial_rows  # block p owns rows n ≡ p (mod rows)
        pw = _view(dw_part, partial_rows * H, np.float32).reshape(partial_rows, H)
        pb = _view(db1_part, partial_rows * H, np.float32).reshape(partial_rows, H)
        pw[:] = torch.zeros(partial_rows, H, dtype=torch.float64).index_add_(
            0, owner, du * d1).float()
        pb[:] = torch.zeros(partial_rows, H, dtype=torch.float64).index_add_(
            0, owner, dq).float()


@pytest.fixture
def stand_in(monkeypatch):
    ext = StandInExtension()
    monkeypatch.setattr(cuda_ops, "_cuda", ext)
    return ext


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", MODES)
def test_glue_terms_and_grads_cpu(stand_in, kind, mode):
    check_kind_mode_on_cpu(kind, mode)


@pytest.mark.parametrize("act", ACTS)
def test_glue_activations_cpu(stand_in, act):
    critic, zs = make_case(dims=(4, 6), hidden=12, act=act, batch=6, seed=5)
    ref, got = both("dv", critic, zs, 2, None, fused_dependency_terms)
    assert_match(ref, got, torch.float32)


def test_glue_float16_cpu(stand_in):
    critic, zs = make_case(dims=(4, 6), hidden=12, batch=6, dtype=torch.float16, seed=5)
    ref, got = both("infonce", critic, zs, "all", None, fused_dependency_terms)
    assert_match(ref, got, torch.float16)


@pytest.mark.parametrize("act", ("tanh", "gelu", "softplus"))
@pytest.mark.parametrize("one_sided", (False, True))
def test_glue_gradient_penalty_cpu(stand_in, act, one_sided):
    critic, joint = make_case(dims=(6, 3), hidden=10, act=act, batch=8)
    _, marginal = make_case(dims=(6, 3), hidden=10, act=act, batch=8, seed=9)
    with torch.no_grad():
        critic.out.weight.mul_(3.0)  # norms above 1 so the one-sided branch is exercised
    eps = torch.rand(8, generator=torch.Generator().manual_seed(2))
    compare_gradient_penalty(critic, joint, marginal, eps, one_sided, rtol=1e-4, atol=1e-5)

"""CUDA C++ backend (csrc/ via mdm_kernels._cuda) against the pure-PyTorch oracle.

* GPU tests (skipped without a CUDA device and a built extension): values and gradients of
  every estimator, every negatives mode, each dtype, odd shapes, extreme scores, the gradient
  penalty, and the public API with ``backend="cuda"``.
* CPU tests: the dispatch errors (no extension / CPU tensors / unsupported critics), and the
  Python glue (custom ops, autograd wiring, stats layout, gradient coefficients) driven by a
  float64 stand-in for the extension that mirrors the kernels' math on host memory.
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
from mdm_kernels.reference.estimators import KINDS, dependency_terms, resolve_samples
from mdm_kernels.reference.gradient_penalty import gradient_penalty_terms

HAS_GPU = torch.cuda.is_available()
gpu = pytest.mark.skipif(
    not (HAS_GPU and cuda_backend.is_built()),
    reason="needs a CUDA device and the built extension mdm_kernels._cuda "
           "(no GPU here: CI checks the build in tests/test_cuda_build.py)")

ACTS = ("relu", "leaky_relu", "tanh", "softplus", "gelu")
MODES = ("shuffle", 3, "perms", "all")
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
    ref, got = both(kind, critic, zs, negatives, perms, cuda_ops_terms)
    assert_match(ref, got, torch.float32)


def cuda_ops_terms(kind, critic, zs, samples):
    return cuda_ops.fused_dependency_terms(kind, critic, zs, samples)


@gpu
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("kind", ("dv", "js", "infonce"))
def test_activations(act, kind):
    critic, zs = make_case(dims=(4, 6), hidden=64, act=act, batch=16, device="cuda", seed=5)
    ref, got = both(kind, critic, zs, 2, None, cuda_ops_terms)
    assert_match(ref, got, torch.float32)


@gpu
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16))
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", ("shuffle", "all"))
def test_half_dtypes(dtype, kind, mode):
    critic, zs = make_case(dims=(8, 5), hidden=33, act="gelu", batch=12, dtype=dtype,
                           device="cuda", seed=7)
    with torch.no_grad():  # keep scores O(1) so absolute tolerances are meaningful
        critic.out.weight.mul_(0.2)
    ref, got = both(kind, critic, zs, mode, None, cuda_ops_terms)
    assert_match(ref, got, dtype)


@gpu
@pytest.mark.parametrize("shape", [((1, 1), 1, 2), ((3, 130, 17), 129, 5),
                                   ((2, 2, 2, 2), 31, 4), ((64, 48), 300, 33)])
@pytest.mark.parametrize("kind", KINDS)
def test_odd_shapes(shape, kind):
    dims, hidden, batch = shape
    critic, zs = make_case(dims=dims, hidden=hidden, batch=batch, act="softplus",
                           device="cuda", seed=11)
    for mode in ("shuffle", "all"):
        ref, got = both(kind, critic, zs, mode, None, cuda_ops_terms)
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
    ref, got = both(kind, critic, zs, "all", None, cuda_ops_terms)
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
    for fn in (gradient_penalty_terms, cuda_ops.fused_gradient_penalty):
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
        gen_a, gen_b = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
        ref = fn(critic, *zs, generator=gen_a, backend="reference")
        got = fn(critic, *zs, generator=gen_b, backend="cuda")
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
        j, m = cuda_ops.fused_dependency_terms("dv", critic, [z1, z2], samples)
        return j - m

    compiled = torch.compile(f, fullgraph=True)
    torch.testing.assert_close(compiled(*zs), f(*zs), rtol=1e-5, atol=1e-5)


@gpu
def test_opcheck():
    critic, zs = make_case(dims=(4, 5), hidden=32, batch=10, device="cuda")
    P = cuda_ops.projections(critic, zs)
    b1, w, bo = (t.detach() for t in cuda_ops.critic_params(critic))
    torch.library.opcheck(torch.ops.mdm_kernels.cuda_bounds_fwd,
                          ([p.detach() for p in P], b1, w, bo, None, 0, 2),
                          test_utils=("test_schema", "test_faketensor"))


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


class StandInExtension:
    """Mirrors csrc/ (sample sets, stats layout, gradient coefficients) in float64 torch on
    host memory, so the Python side can be tested end to end without a GPU."""

    MAX_MODALITIES, MAX_HIDDEN, WORKSPACE_FLOATS = 8, 4096, 2 * 1024 * 5

    @staticmethod
    def _rows(m, B, kind, all_, perms_ptr, K):
        joint = torch.arange(B).expand(m, B)
        if kind == 3:  # InfoNCE: anchor × candidate grid
            C = B if all_ else K + 1
            anchors = torch.arange(B).repeat_interleave(C)
            if all_:
                cand = torch.arange(C).repeat(B)
            else:
                perms = _view(perms_ptr, K * m * B, np.int64).reshape(K, m, B)
                cand = torch.cat([torch.arange(B)[None], perms[:, 1]]).t().reshape(-1)
            return joint, torch.stack([anchors] + [cand] * (m - 1)), C
        if all_:
            flat = torch.arange(B ** m)
            idx = []
            for _ in range(m):
                idx.append(flat % B)
                flat = flat // B
            return joint, torch.stack(idx[::-1]), None
        perms = _view(perms_ptr, K * m * B, np.int64).reshape(K, m, B)
        return joint, perms.permute(1, 0, 2).reshape(m, -1), None

    @staticmethod
    def _load(P, B, H, dtype, b1, w, b_out):
        np_dtype = {0: np.float32, 1: np.float16}[dtype]
        Ps = [_view(p, B * H, np_dtype).reshape(B, H).double() for p in P]
        return (Ps, _view(b1, H, np.float32).double(), _view(w, H, np.float32).double(),
                _view(b_out, 1, np.float32).double())

    @staticmethod
    def _pre(Ps, b1, rows):
        return b1 + sum(p[r] for p, r in zip(Ps, rows))

    def bounds_forward(self, P, B, H, dtype, b1, w, b_out, act, kind, all, perms, K, terms,
                       stats, workspace, device, stream):
        Ps, b1, w, bo = self._load(P, B, H, dtype, b1, w, b_out)
        joint, marg, C = self._rows(len(P), B, kind, all, perms, K)
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
        out_s[B] = float(lse)

    def bounds_backward(self, P, B, H, dtype, b1, w, b_out, act, kind, all, perms, K,
                        grad_terms, terms, stats, dP, db1, dw, db_out, device, stream):
        Ps, b1v, wv, bo = self._load(P, B, H, dtype, b1, w, b_out)
        g = _view(grad_terms, 2, np.float32).double()
        t = _view(terms, 2, np.float32).double()
        s = _view(stats, B + 1, np.float32).double()
        joint, marg, C = self._rows(len(P), B, kind, all, perms, K)
        outs = [_view(p, B * H, np.float32).reshape(B, H) for p in dP]
        o_b1, o_w, o_bo = (_view(db1, H, np.float32), _view(dw, H, np.float32),
                           _view(db_out, 1, np.float32))
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
            dpre = coef[:, None] * wv * _act_grad(pre, act)
            for k, out in enumerate(outs):
                out.index_add_(0, rows[k], dpre.float())
            o_b1 += dpre.sum(0).float()
            o_w += (coef[:, None] * _act(pre, act)).sum(0).float()
            o_bo += coef.sum().float()

    def gp_hidden_forward(self, Q, N, H, b1, w, act, U, device, stream):
        q = _view(Q, N * H, np.float32).reshape(N, H).double()
        a = q + _view(b1, H, np.float32).double()
        _view(U, N * H, np.float32).reshape(N, H)[:] = \
            (_view(w, H, np.float32).double() * _act_grad(a, act)).float()

    def gp_hidden_backward(self, Q, N, H, b1, w, act, dU, dQ, dw, db1, device, stream):
        q = _view(Q, N * H, np.float32).reshape(N, H).double()
        a = q + _view(b1, H, np.float32).double()
        wv = _view(w, H, np.float32).double()
        du = _view(dU, N * H, np.float32).reshape(N, H).double()
        d1, d2 = _act_grad(a, act), _act_grad2(a, act)
        dq = du * wv * d2
        _view(dQ, N * H, np.float32).reshape(N, H)[:] = dq.float()
        _view(dw, H, np.float32)[:] += (du * d1).sum(0).float()
        _view(db1, H, np.float32)[:] += dq.sum(0).float()


@pytest.fixture
def stand_in(monkeypatch):
    monkeypatch.setattr(cuda_ops, "_cuda", StandInExtension())


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", MODES)
def test_glue_terms_and_grads_cpu(stand_in, kind, mode):
    critic, zs = make_case(act="softplus", batch=5)
    negatives, perms = mode_args(mode, kind, 5, 3, "cpu")
    ref, got = both(kind, critic, zs, negatives, perms, cuda_ops_terms)
    assert_match(ref, got, torch.float32)


@pytest.mark.parametrize("act", ACTS)
def test_glue_activations_cpu(stand_in, act):
    critic, zs = make_case(dims=(4, 6), hidden=12, act=act, batch=6, seed=5)
    ref, got = both("dv", critic, zs, 2, None, cuda_ops_terms)
    assert_match(ref, got, torch.float32)


def test_glue_float16_cpu(stand_in):
    critic, zs = make_case(dims=(4, 6), hidden=12, batch=6, dtype=torch.float16, seed=5)
    ref, got = both("infonce", critic, zs, "all", None, cuda_ops_terms)
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

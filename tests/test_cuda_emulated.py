"""The CUDA kernels of csrc/ run on the CPU: the same sources compiled by g++ under the host
emulation of tests/cuda_emulation/ (blocks in turn, a block's threads as OS threads,
__syncthreads / __shfl_xor_sync as barriers), driven through the real ``torch.library`` ops of
mdm_kernels.ops.cuda_ops and compared with the reference estimators — every estimator ×
negatives mode (``"distinct"`` included), activations, storage dtypes, odd widths (one
hidden unit, several sample groups per block, several units per thread), m = 4, and the
gradient penalty — built with a 16-id backward chunk and 3 GP partial rows so that small
grids take the multi-chunk and multi-row paths.  This checks the kernels' index logic,
reductions, barriers and gradient formulas without a GPU; GPU-only properties (memory model,
fast math, streams) stay with tests/test_cuda_backend.py on a GPU.  The build takes ~12 s of
CPU (g++ -O1).
"""
from __future__ import annotations

import pytest
import torch

from cuda_emulation.build import GP_MAX_PARTIAL_ROWS, SCORE_CHUNK_SAMPLES, build, missing_tools
from mdm_kernels.ops import cuda_ops
from mdm_kernels.ops.cuda_backend import critic_params, fused_dependency_terms, projections
from mdm_kernels.reference.estimators import KINDS, dependency_terms, resolve_samples
from test_cuda_backend import (ACTS, MODES, assert_match, both, check_kind_mode_on_cpu,
                               compare_gradient_penalty,
                               make_case, mode_args)

pytestmark = pytest.mark.skipif(missing_tools() is not None,
                                reason=f"host emulation of the CUDA kernels: {missing_tools()}")


@pytest.fixture(scope="module")
def emulated_module(tmp_path_factory):
    return build(tmp_path_factory.mktemp("cuda_emulation"))


@pytest.fixture
def emulated(emulated_module, monkeypatch):
    monkeypatch.setattr(cuda_ops, "_cuda", emulated_module)
    return emulated_module


def test_small_chunks_are_compiled_in(emulated):
    """The emulated build lowers the backward chunk (16 ids) and the GP partial rows (3), so
    the grids below are differentiated over several chunks: B = 5, m = 3 "all" in 5 chunks of
    one lead row, InfoNCE B = 5 in 2 chunks."""
    assert emulated.SCORE_CHUNK_SAMPLES == SCORE_CHUNK_SAMPLES
    assert emulated.GP_MAX_PARTIAL_ROWS == GP_MAX_PARTIAL_ROWS
    assert len(emulated._backward_chunks(5, 3, 0, 1, 1)) == 5
    assert len(emulated._backward_chunks(5, 3, 3, 2, 1)) == 2


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", MODES)
def test_kernels_match_reference(emulated, kind, mode):
    check_kind_mode_on_cpu(kind, mode)


@pytest.mark.parametrize("act", ACTS)
def test_activations(emulated, act):
    critic, zs = make_case(dims=(4, 6), hidden=12, act=act, batch=6, seed=5)
    for kind, negatives in (("dv", 2), ("infonce", "distinct")):
        ref, got = both(kind, critic, zs, negatives, None, fused_dependency_terms)
        assert_match(ref, got, torch.float32)


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16))
@pytest.mark.parametrize("kind", ("dv", "js", "infonce"))
def test_half_storage(emulated, dtype, kind):
    critic, zs = make_case(dims=(8, 5), hidden=33, act="gelu", batch=6, dtype=dtype, seed=7)
    with torch.no_grad():  # keep scores O(1) so absolute tolerances are meaningful
        critic.out.weight.mul_(0.2)
    ref, got = both(kind, critic, zs, "all", None, fused_dependency_terms)
    assert_match(ref, got, dtype)


@pytest.mark.parametrize("shape", [((1, 1), 1, 2),        # one hidden unit, B = 2
                                   ((3, 7, 2), 129, 4),   # one group, some idle lanes
                                   ((2, 2, 2, 2), 31, 4),  # m = 4, eight sample groups
                                   ((5, 4), 300, 3)],     # two units per thread
                         ids=("H1", "H129", "m4", "H300"))
@pytest.mark.parametrize("kind", ("dv", "js", "infonce"))
def test_odd_shapes(emulated, shape, kind):
    dims, hidden, batch = shape
    critic, zs = make_case(dims=dims, hidden=hidden, batch=batch, act="tanh", seed=11)
    for mode in ("shuffle", "all", "distinct"):
        if mode == "distinct" and batch < (2 if kind == "infonce" else len(dims)):
            continue
        ref, got = both(kind, critic, zs, mode, None, fused_dependency_terms)
        assert_match(ref, got, torch.float32)


def test_zero_upstream_gradient_skips_a_set(emulated):
    """Only the marginal term is differentiated (dL/djoint = 0): the joint set's backward
    kernels exit early and the gradients still match the reference."""
    critic, zs = make_case(batch=5)
    results = []
    for terms in (dependency_terms, fused_dependency_terms):
        zz = [z.detach().clone().requires_grad_(True) for z in zs]
        samples = resolve_samples("dv", zz, "all", None, None)
        critic.zero_grad(set_to_none=True)
        terms("dv", critic, zz, samples)[1].backward()
        results.append([p.grad.clone() for p in critic.parameters()] +
                       [z.grad.clone() for z in zz])
    for got, ref in zip(results[1], results[0]):
        torch.testing.assert_close(got, ref, rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("act", ("tanh", "gelu", "softplus"))
def test_gradient_penalty(emulated, act):
    """N = 8 rows over 3 partial rows of dw, db1."""
    critic, joint = make_case(dims=(6, 3), hidden=10, act=act, batch=8)
    _, marginal = make_case(dims=(6, 3), hidden=10, act=act, batch=8, seed=9)
    with torch.no_grad():
        critic.out.weight.mul_(3.0)
    eps = torch.rand(8, generator=torch.Generator().manual_seed(2))
    compare_gradient_penalty(critic, joint, marginal, eps, False, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind,mode", [("dv", "perms"), ("js", "all"), ("infonce", "distinct")])
def test_ops_bitwise_reproducible(emulated, kind, mode):
    """H = 31 (eight sample groups per backward block), m = 4, several chunks: two runs of the
    forward and backward ops are bitwise equal under OS-thread scheduling (a race on a shared
    accumulator would show here)."""
    critic, zs = make_case(dims=(2, 3, 2, 2), hidden=31, batch=5, act="gelu", seed=23)
    _, perms = mode_args(mode, kind, 5, 4, "cpu")
    P = [p.detach() for p in projections(critic, zs)]
    b1, w, bo = (t.detach() for t in critic_params(critic))
    args = (P, b1, w, bo, perms, cuda_ops.KIND_CODES[kind], 4, cuda_ops.NEGATIVES_CODES[mode])
    runs = []
    for _ in range(2):
        terms, stats = cuda_ops.bounds_fwd(*args)
        runs.append([terms, stats, *cuda_ops.bounds_bwd(*args, torch.tensor([0.7, -1.3]),
                                                        terms, stats)])
    for a, b in zip(*runs):
        assert torch.equal(a, b)

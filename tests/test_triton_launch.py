"""Launch-side pieces of the fused Triton kernels, checked without a GPU: the stable tanh
(against float64), the autotune size buckets, the outer-sum backward's grid, the
one-program/multi-program cost model, device checks and guards.

The kernels themselves are tested against the reference in ``tests/test_triton_bounds.py``.
"""
from __future__ import annotations

import itertools

import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from mdm_kernels.ops import triton_helpers  # noqa: E402
from mdm_kernels.ops.triton_helpers import check_same_device, size_bucket  # noqa: E402


# --- tanh: the stable form ----------------------------------------------------------------
@triton.jit
def _tanh_kernel(x_ptr, y_ptr, d_ptr, d2_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask)
    tl.store(y_ptr + offs, triton_helpers.activation(x, 2), mask=mask)
    tl.store(d_ptr + offs, triton_helpers.activation_grad(x, 2), mask=mask)
    tl.store(d2_ptr + offs, triton_helpers.activation_grad2(x, 2), mask=mask)


def _max_relative_error(got, want):
    return ((got.double() - want).abs() / want.abs()).max().item()


@pytest.mark.skipif(not torch.cuda.is_available() and not triton_helpers.interpreter_enabled(),
                    reason="needs a GPU or TRITON_INTERPRET=1")
def test_tanh_relative_error_over_the_range():
    """tanh, tanh' and tanh'' of the kernels against float64 torch over |x| from 1e-30 to 20
    (both signs; the former 1 − 2/(e^{2x} + 1) was 1.7e-4 off at x = 1e-4 and 100 % off
    below 3e-8).  Bounds: 5e-7 relative in the interpreter's exact float32 (measured
    ≤ 2.7e-7), 2e-6 compiled on a GPU (ex2.approx and div.full; docs/triton_backend.md)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    magnitude = torch.logspace(-30, 1.3, 2001, dtype=torch.float64)
    x = torch.cat([-magnitude.flip(0), magnitude]).float().to(device)
    y, d, d2 = (torch.empty_like(x) for _ in range(3))
    _tanh_kernel[(triton.cdiv(x.numel(), 1024),)](x, y, d, d2, x.numel(), BLOCK=1024)
    x64 = x.double().cpu()
    tanh = torch.tanh(x64)
    sech2 = torch.cosh(x64).pow(-2)
    bound = 2e-6 if device == "cuda" else 5e-7
    assert _max_relative_error(y.cpu(), tanh) <= bound
    assert _max_relative_error(d.cpu(), sech2) <= bound
    assert _max_relative_error(d2.cpu(), -2 * tanh * sech2) <= 2 * bound
    assert torch.equal(y.cpu(), -y.cpu().flip(0))  # odd, exactly


# --- autotune keys -----------------------------------------------------------------------
def test_size_bucket_is_the_next_power_of_two():
    assert [size_bucket(n) for n in (0, 1, 2, 3, 4, 5, 255, 256, 257)] == \
        [1, 1, 2, 4, 4, 8, 256, 256, 512]
    # a short last batch and a gathered DDP batch share the full batch's bucket
    assert size_bucket(200) == size_bucket(256) and size_bucket(129 * 129) == size_bucket(
        16384 + 1)
    with pytest.raises(ValueError, match="n must be >= 0"):
        size_bucket(-1)


def test_gathered_tile_autotuners_key_on_buckets():
    """The gathered-tile kernels' autotune keys are the bucketed sizes: a short last batch
    (200 of 256) or a 4-GPU gathered one (4 × 200 of 1024) finds the full batch's entry."""
    from mdm_kernels.ops import gathered_tiles as gt
    from mdm_kernels.ops.sample_tiles import marginal_plan
    for kernel in (gt._bounds_fwd_kernel, gt._bounds_bwd_kernel):
        # the sizes only as buckets (never the exact N, NCOL, B) ...
        assert kernel.keys[:5] == ["N_KEY", "NCOL_KEY", "H1", "H2", "B_KEY"]
        assert not {"N", "NCOL", "B"} & set(kernel.keys)
        # ... and every constexpr that changes the work per sample (issue 22)
        assert {"M", "IDX", "ACT", "NF", "GROUPED", "DISTINCT", "TWO_LAYERS"} <= set(kernel.keys)
        # never the owner of an "all"-grid backward launch: the owners share one dP buffer
        # that a benchmarking owner launch would zero (reset_to_zero)
        assert "OWNER" not in kernel.keys and "PARAM_GRADS" not in kernel.keys
    assert "RED" in gt._bounds_fwd_kernel.keys and "GMODE" in gt._bounds_bwd_kernel.keys
    for short, full in ((200, 256), (800, 1024)):
        for kind, K in (("dv", 5), ("infonce", 4), ("dv", None), ("infonce", None)):
            keys = {gt._autotune_keys(marginal_plan(
                kind, B, 3, None if K is None else torch.zeros(K, 3, B, dtype=torch.int64)))
                for B in (short, full)}
            assert len(keys) == 1, (kind, K, keys)
    assert gt._autotune_keys(marginal_plan("dv", 300, 3, None))[2] == 512  # the next bucket


# --- devices -------------------------------------------------------------------------------
def test_check_same_device_names_the_argument():
    a = torch.zeros(2)
    assert check_same_device({"zs[0]": a, "perms": None, "zs[1]": a}) == a.device
    with pytest.raises(ValueError, match=r"zs\[1\] is on meta but zs\[0\] is on cpu"):
        check_same_device({"zs[0]": a, "zs[1]": torch.zeros(2, device="meta")})


def test_launch_device_is_a_no_op_on_cpu():
    with triton_helpers.launch_device(torch.zeros(1)):
        pass


# --- outer-sum backward grid (issue 14, item 4) -------------------------------------------
H200_SMS = 132


@pytest.mark.parametrize("B,num_factors", [(256, 2), (300, 2), (1040, 2), (4096, 2),
                                           (16384, 2), (65536, 2)])
def test_outer_backward_grid_fills_the_gpu(B, num_factors):
    """Per-factor launches (two factors): at every B ≥ 256 at least two programs per SM
    (B = 256 has only 16 tiles of 16 × 256, so it takes smaller tiles), every swept block in
    exactly one split, no empty split, and not many more programs than needed (each split
    costs H × S floats)."""
    from mdm_kernels.ops.outer_sums import OUTER_BACKWARD_TILES, outer_backward_grid
    launch = outer_backward_grid(B, num_factors, H200_SMS)
    assert (launch.block_swept, launch.block_owned) in OUTER_BACKWARD_TILES
    assert launch.num_warps == launch.block_owned // 32
    assert launch.programs >= 2 * H200_SMS
    assert launch.programs <= 4 * H200_SMS + launch.owned_programs
    assert launch.grid == (launch.owned_programs, launch.splits)
    swept_blocks = triton.cdiv(B, launch.block_swept)
    assert (launch.splits - 1) * launch.blocks_per_split < swept_blocks
    assert launch.splits * launch.blocks_per_split >= swept_blocks
    assert launch.owned_programs <= triton.cdiv(B, launch.block_owned)


def test_outer_backward_grid_tile_choice():
    """The largest tile with enough tiles: 16 × 256 when there are plenty; smaller ones
    only for small launches; a launch with many owned blocks needs no split; with one
    allowed tile (the interpreter's) every tile is a program when there are few."""
    from mdm_kernels.ops.outer_sums import outer_backward_grid
    big = outer_backward_grid(4096, 2, H200_SMS)
    assert (big.block_swept, big.block_owned, big.num_warps) == (16, 256, 8)
    assert outer_backward_grid(256, 2, H200_SMS).block_owned == 32
    many = outer_backward_grid(256 * 300, 2, H200_SMS)
    assert (many.owned_programs, many.splits) == (2 * H200_SMS, 1)
    fixed = outer_backward_grid(256, 2, H200_SMS, tiles=((16, 256),))
    assert (fixed.owned_programs, fixed.splits, fixed.blocks_per_split) == (1, 16, 1)
    with pytest.raises(ValueError, match="takes num_factors = 2, got 3"):
        outer_backward_grid(256, 3, H200_SMS)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        outer_backward_grid(0, 2, H200_SMS)


# --- the fused backward's plan (issue 24, item 2) ------------------------------------------
def _fused_work(plan, B):
    """(row block, column block, F_0 index or None) → programs that take it, from the plan
    exactly as the kernel walks it (module docstring of ``_outer_bwd_fused_kernel``)."""
    n_ob = triton.cdiv(B, plan.block_cols)
    seen = {}
    for p, j, q in itertools.product(*map(range, plan.grid)):
        for rb in range(p, plan.row_blocks, plan.row_groups):
            if plan.num_factors == 3:
                items = [(ob, k) for ob in range(j, n_ob, plan.col_groups)
                         for k in range(q * plan.span, min(B, (q + 1) * plan.span))]
            else:
                items = [(ob, None)
                         for ob in range(q * plan.span, min(n_ob, (q + 1) * plan.span))]
            for ob, k in items:
                seen.setdefault((rb, ob, k), []).append((p, j, q))
    return seen


@pytest.mark.parametrize("B,num_factors", [(2, 2), (37, 2), (256, 2), (1024, 2), (4096, 2),
                                           (2, 3), (37, 3), (256, 3), (300, 3)])
def test_fused_plan_covers_every_tile_once(B, num_factors):
    """Every (row block, column block[, F_0 index]) in exactly one program, no program
    without work, chunks that divide the span, and the slot counts the kernel indexes."""
    from mdm_kernels.ops.outer_sums import OUTER_FUSED_TILE, outer_fused_plan
    plan = outer_fused_plan(B, num_factors, H200_SMS)
    seen = _fused_work(plan, B)
    n_ob = triton.cdiv(B, plan.block_cols)
    expected = plan.row_blocks * n_ob * (B if num_factors == 3 else 1)
    assert len(seen) == expected and all(len(p) == 1 for p in seen.values())
    assert len({p[0] for p in seen.values()}) == plan.programs
    assert plan.span % plan.chunk == 0 and plan.chunk >= OUTER_FUSED_TILE[2] // 2
    slots = {2: (plan.splits, plan.row_groups, 0),
             3: (plan.col_groups * plan.splits, plan.row_groups * plan.splits,
                 plan.row_groups * plan.col_groups)}[num_factors]
    assert plan.slots == slots
    # the row groups keep the slot count bounded whatever B (each slot is H × S floats)
    assert sum(plan.slots) <= {2: 50, 3: 220}[num_factors]


@pytest.mark.parametrize("B", [256, 1024, 4096])
def test_fused_plan_fills_the_gpu(B):
    """Paper scale (three factors) and two factors from B = 1,024: at least one program per
    SM with whole chunks of the largest size that does; two factors at B = 256 keep the
    per-factor launches (the fused grid would be 16 one-warp programs)."""
    from mdm_kernels.ops.outer_sums import (OUTER_FUSED_TILE, _fused_plan_at, fused_backward_plan,
                                            outer_fused_plan, uses_fused_backward)
    three = outer_fused_plan(B, 3, H200_SMS)
    assert three.programs >= H200_SMS and three.chunk == OUTER_FUSED_TILE[2]
    assert fused_backward_plan(B, 3, H200_SMS) == three  # the plan the launch uses, built once
    assert uses_fused_backward(B, 2, H200_SMS) == (B >= 1024)
    assert (fused_backward_plan(B, 2, H200_SMS) is None) == (B < 1024)
    if B >= 1024:
        two = outer_fused_plan(B, 2, H200_SMS)
        assert two.programs >= H200_SMS
        assert two.chunk == OUTER_FUSED_TILE[2] or _fused_plan_at(
            B, 2, 2 * H200_SMS, *OUTER_FUSED_TILE[:2], 2 * two.chunk).programs < H200_SMS
    with pytest.raises(ValueError, match="num_factors must be 2 or 3"):
        outer_fused_plan(B, 4, H200_SMS)
    with pytest.raises(ValueError, match="num_sms must be >= 1"):
        outer_fused_plan(B, 3, 0)


@pytest.mark.parametrize("kind,B,programs", [("dv", 1024, 256), ("infonce", 1024, 64),
                                             ("dv", 256, 16)])
def test_outer_forward_grid_takes_column_tiles(monkeypatch, kind, B, programs):
    """The forward's persistent programs take (row block, column block) tiles: two factors
    at B = 1,024 are 64 × 4 tiles of 16 × 256, 256 programs on an H200 (was one per row
    block, 64); InfoNCE keeps whole row blocks (its row log-sum-exp), B = 256 has 16 tiles.
    The launch is recorded, not executed."""
    from mdm_kernels.ops import outer_sums
    from mdm_kernels.ops.runtime_flags import emulate_gpu
    grids = []

    class Recorded:
        def __getitem__(self, grid):
            grids.append(grid)
            return lambda *args, **kwargs: None

    monkeypatch.setattr(outer_sums, "_outer_fwd_kernel", Recorded())
    factors = [torch.zeros(B, 3), torch.zeros(B, 3)]
    with emulate_gpu("sm_90"):
        outer_sums.outer_forward(kind, 0, factors, torch.zeros(3), torch.zeros(1))
    assert grids == [(programs,)]


# --- one program or many: the cost model (issue 14, item 5) -------------------------------
def test_single_program_threshold_follows_the_cost_model():
    """W* = (L_multi − L_one)·t_launch·F·f·n/(n − 1): at W* both modelled times are equal."""
    from mdm_kernels.ops import single_program as sp
    w_star = sp.single_program_max_work()
    rate = sp.FMA_PER_CLOCK_PER_SM * sp.SM_CLOCK_HZ
    t_one = sp.SINGLE_PROGRAM_OPS * sp.LAUNCH_OVERHEAD_S + w_star / rate
    t_multi = sp.MULTI_PROGRAM_OPS * sp.LAUNCH_OVERHEAD_S + w_star / (sp.NUM_SMS * rate)
    assert t_one == pytest.approx(t_multi, rel=1e-6)
    # more SMs or dearer launches favour the one-program path longer, a faster SM too
    assert sp.single_program_max_work(launch_overhead_s=1e-5) > w_star
    assert sp.single_program_max_work(clock_hz=1e9) < w_star
    assert sp.single_program_max_work(launch_overhead_s=0) == 0
    with pytest.raises(ValueError, match="num_sms must be >= 2"):
        sp.single_program_max_work(num_sms=1)


@pytest.mark.parametrize("raw,expected", [("2e7", 20_000_000), ("0", 0), (" ", "default")])
def test_single_program_threshold_env_override(monkeypatch, raw, expected):
    from mdm_kernels.ops import single_program as sp
    monkeypatch.setenv("MDM_SINGLE_PROGRAM_MAX_WORK", raw)
    assert sp._max_work_from_env(123) == (123 if expected == "default" else expected)


@pytest.mark.parametrize("raw", ["many", "-1", "inf", "nan"])
def test_single_program_threshold_env_rejects_bad_values(monkeypatch, raw):
    from mdm_kernels.ops import single_program as sp
    monkeypatch.setenv("MDM_SINGLE_PROGRAM_MAX_WORK", raw)
    with pytest.raises(ValueError, match="MDM_SINGLE_PROGRAM_MAX_WORK must be"):
        sp._max_work_from_env(123)


def _path_at(kind, B, dims, hidden, negatives):
    from mdm_kernels import MLPCritic
    from mdm_kernels.ops.router import execution_path
    critic = MLPCritic(dims, hidden).to("meta")
    zs = [torch.empty(B, d, device="meta") for d in dims]
    perms = None if negatives == "all" else torch.zeros(negatives, len(dims), B,
                                                        dtype=torch.int64, device="meta")
    return execution_path(kind, critic, zs, perms)


def test_auto_switch_point_is_the_modelled_one(monkeypatch):
    """The decision at a few sizes around W*: MINE shuffles (K = 1) with three 64-d
    modalities and H = 128, whose work grows linearly in B."""
    from mdm_kernels.ops import single_program as sp
    monkeypatch.setattr(sp, "SINGLE_PROGRAM_MAX_WORK", sp.single_program_max_work())
    dims, hidden = (64, 64, 64), (128,)

    def work(B):
        return sp.single_program_work(B, dims, hidden, B, 1)

    B_star = max(B for B in range(1, 4096) if work(B) <= sp.SINGLE_PROGRAM_MAX_WORK)
    assert 256 < B_star < 1024  # paper scale (B = 256) runs as one program
    for B, expected in ((32, "single"), (256, "single"), (B_star, "single"),
                        (B_star + 1, "grid"), (4 * B_star, "grid")):
        assert _path_at("dv", B, dims, hidden, 1) == expected, B
    # "all" at paper scale with m = 3 (2^24 samples) is far above it: the outer sums
    assert _path_at("dv", 256, dims, hidden, "all") == "outer"


# --- devices and layouts (issue 14, item 3) ------------------------------------------------
def _critic_and_inputs(hidden, B=4, dims=(3, 4), device="cpu", seed=0):
    from mdm_kernels import MLPCritic
    torch.manual_seed(seed)
    critic = MLPCritic(dims, hidden, "tanh").to(device)
    zs = [torch.randn(B, d, device=device, requires_grad=True) for d in dims]
    return critic, zs


def _matches_reference(kind, critic, zs, perms, strategy):
    """Fused value and gradients (of joint − marginal) against the float64 reference;
    ``perms``: a (K, m, B) index tensor, or ``None`` for "all"."""
    import copy

    from torch.testing import assert_close

    from mdm_kernels.ops.router import fused_dependency_terms
    from mdm_kernels.reference.estimators import dependency_terms, resolve_samples
    for t in [*zs, *critic.parameters()]:
        t.grad = None
    joint, marg = fused_dependency_terms(kind, critic, zs, perms, strategy=strategy)
    (joint - marg).backward()
    critic64 = copy.deepcopy(critic).cpu().double()
    zs64 = [z.detach().cpu().double().requires_grad_() for z in zs]
    samples64 = resolve_samples(kind, zs64, "all" if perms is None else None,
                                None if perms is None else perms.cpu(), None)
    rj, rm = dependency_terms(kind, critic64, zs64, samples64)
    (rj - rm).backward()
    tol = dict(rtol=2e-5, atol=2e-6)
    assert_close(marg.detach().cpu().double(), rm.detach(), **tol)
    for z, r in zip(zs, zs64):
        assert_close(z.grad.cpu().double(), r.grad, **tol)
    for (name, p), r in zip(critic.named_parameters(), critic64.parameters()):
        assert_close(p.grad.cpu().double(), r.grad, **tol, msg=lambda s: f"{name}: {s}")


def _explicit_shuffles(K, m, B, device="cpu"):
    gen = torch.Generator().manual_seed(1)
    return torch.stack([torch.stack([torch.randperm(B, generator=gen) for _ in range(m)])
                        for _ in range(K)]).to(device)


def test_inputs_on_different_devices_are_refused_by_name():
    from mdm_kernels.ops.router import fused_dependency_terms
    critic, zs = _critic_and_inputs((6,))
    with pytest.raises(ValueError, match=r"zs\[1\] is on meta but zs\[0\] is on cpu"):
        fused_dependency_terms("dv", critic, [zs[0], zs[1].to("meta")], None)
    critic.out.bias = torch.nn.Parameter(torch.zeros(1, device="meta"))
    with pytest.raises(ValueError, match=r"critic\.out\.bias is on meta"):
        fused_dependency_terms("dv", critic, zs, None)


@pytest.mark.parametrize("strategy", ["single", "grid"])
def test_non_contiguous_critic_parameters(strategy):
    """A transposed W_2, a strided output weight and first bias (as ``load_state_dict`` of
    a transposed checkpoint or weight tying can leave them): read through contiguous
    copies, values and gradients as the reference."""
    critic, zs = _critic_and_inputs((6, 5))
    layer = critic.hidden_layers[0]
    layer.weight = torch.nn.Parameter(layer.weight.detach().t().contiguous().t())
    critic.out.weight = torch.nn.Parameter(
        torch.stack([critic.out.weight.detach()[0]] * 2, 1)[:, :1].t())
    critic.first_bias = torch.nn.Parameter(torch.stack([critic.first_bias.detach()] * 2, 1)[:, 0])
    assert not any(p.is_contiguous() for p in (layer.weight, critic.out.weight,
                                               critic.first_bias))
    _matches_reference("dv", critic, zs, _explicit_shuffles(2, 2, 4), strategy)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("strategy,hidden,negatives", [
    ("single", (16,), "shuffles"), ("grid", (16,), "all"), ("grid", (16, 8), "shuffles")],
    ids=["one-program", "outer-sum", "gathered-tiles"])
def test_inputs_on_the_second_gpu_while_the_first_is_current(strategy, hidden, negatives):
    """Every launch runs under its inputs' device (cuda:1 here while cuda:0 is current)."""
    critic, zs = _critic_and_inputs(hidden, B=37, dims=(5, 7), device="cuda:1")
    perms = None if negatives == "all" else _explicit_shuffles(2, 2, 37, "cuda:1")
    with torch.cuda.device(0):
        _matches_reference("dv", critic, zs, perms, strategy)
        assert torch.cuda.current_device() == 0


# --- buffers (issue 14, item 6) ------------------------------------------------------------
def test_all_grid_backward_zero_fills_only_what_atomics_need(monkeypatch):
    """"all" over 3 modalities, two hidden layers, on the gathered tiles: the backward's ∂P
    is zero-filled once (the joint term's atomic scatter), not once per owner launch, and
    the per-program W_2 slices exist only for the launches that make parameter gradients
    (the joint term and owner 0), not for owners 1 and 2."""
    critic, zs = _critic_and_inputs((6, 5), dims=(3, 4, 2))
    from mdm_kernels.ops.router import fused_dependency_terms
    joint, marg = fused_dependency_terms("dv", critic, zs, None, strategy="grid")
    fills = []
    zeros, zeros_like = torch.zeros, torch.zeros_like

    def spy_zeros(*args, **kwargs):
        out = zeros(*args, **kwargs)
        fills.append(tuple(out.shape))
        return out

    def spy_zeros_like(*args, **kwargs):
        out = zeros_like(*args, **kwargs)
        fills.append(tuple(out.shape))
        return out

    monkeypatch.setattr(torch, "zeros", spy_zeros)
    monkeypatch.setattr(torch, "zeros_like", spy_zeros_like)
    (joint - marg).backward()
    m, B, H1, H2 = 3, 4, 6, 5
    assert fills.count((m, B, H1)) == 1
    assert len([s for s in fills if s[1:] == (H2, H1)]) == 2
    assert all(z.grad is not None and torch.isfinite(z.grad).all() for z in zs)


# --- launch_tuned: emulation, CUDA-graph capture, plain autotuning -------------------------
class _FakeAutotuner:
    """Records how launch_tuned launches: through the autotuner (``kernel[grid]``) or a
    config explicitly (``kernel.fn[grid]``)."""

    def __init__(self, best):
        import types
        self.calls = []
        self.best_config = best
        self.base_fn = types.SimpleNamespace(__name__="fake_kernel")
        outer = self

        class _Fn:
            def __getitem__(self, grid):
                return lambda *a, **kw: outer.calls.append(("explicit", grid, kw))
        self.fn = _Fn()

    def __getitem__(self, grid):
        return lambda *a, **kw: self.calls.append(("tuned", grid, kw))


def test_launch_tuned_never_benchmarks_in_a_graph_capture(monkeypatch):
    import triton
    from mdm_kernels.ops.runtime_flags import emulate_gpu
    a, b = triton.Config({"BLOCK_N": 16}, num_warps=4), triton.Config({"BLOCK_N": 32},
                                                                       num_warps=8)
    grid = lambda meta: (meta["BLOCK_N"],)  # noqa: E731
    monkeypatch.setattr(triton_helpers, "_CHOSEN_CONFIGS", {})
    kernel = _FakeAutotuner(best=b)
    # inside a capture, a key never tuned before: the first candidate, explicitly
    monkeypatch.setattr(triton_helpers, "_capturing", lambda args: True)
    assert triton_helpers.launch_tuned(kernel, grid, (), {"X": 1}, [a, b], "k") is a
    assert kernel.calls[-1][0] == "explicit" and kernel.calls[-1][1] == (16,)
    # outside a capture: the autotuner, whose choice is remembered ...
    monkeypatch.setattr(triton_helpers, "_capturing", lambda args: False)
    assert triton_helpers.launch_tuned(kernel, grid, (), {"X": 1}, [a, b], "k") is b
    assert kernel.calls[-1][0] == "tuned"
    # ... and reused by a later capture of the same key
    monkeypatch.setattr(triton_helpers, "_capturing", lambda args: True)
    assert triton_helpers.launch_tuned(kernel, grid, (), {"X": 1}, [a, b], "k") is b
    assert kernel.calls[-1][:2] == ("explicit", (32,)) and kernel.calls[-1][2]["num_warps"] == 8
    # emulation: candidate `config` (modulo their number), never the autotuner
    for config, want in ((0, a), (1, b), (2, a)):
        with emulate_gpu("sm_90", config=config):
            assert triton_helpers.launch_tuned(kernel, grid, (), {}, [a, b], "k") is want
        assert kernel.calls[-1][0] == "explicit"

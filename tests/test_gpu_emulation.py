"""GPU-launch emulation (issue 22): every kernel family with the launch decisions of a real
GPU — an H100/H200 (``sm_90``, 132 SMs) or an A100 (``sm_80``, 108 SMs) — while its kernels
run in Triton's CPU interpreter, against the float64 reference, values and gradients.

The rest of the suite runs each family with the interpreter's own small tiles (few
programs, one config); the launches a GPU makes — the tile tables, ``GP_CHUNK``, the split
grids of 132 SMs, every autotune candidate — are executed only here.  Under
:func:`~mdm_kernels.ops.runtime_flags.emulate_gpu` each autotuned launch runs the candidate
``config`` explicitly (so each candidate is parametrised), and every buffer the library
allocates uninitialised is NaN (a read of an unwritten element fails the comparison).

The helpers are the interpreter tests' own (``check`` of test_triton_bounds, the gradient
penalty's ``check_against_reference``), so both modes check the same things.  Shapes
straddle the tile-table switch points (computed, and asserted to straddle them) and are
never multiples of a block.  The interpreter runs one program at a time, so the cases with
the real 132-SM grids (hundreds of programs) are the few that need them.
"""
from __future__ import annotations

import pytest
import torch

from mdm_kernels.ops import gathered_tiles, gradient_penalty, outer_sums
from mdm_kernels.ops.router import execution_path
from mdm_kernels.ops.runtime_flags import (GPU_TARGETS, emulate_gpu, emulated_gpu,
                                           fresh_empty, sm_count, uses_gpu_launches)
from mdm_kernels.reference.estimators import resolve_samples

import test_triton_bounds as bounds
import test_triton_gradient_penalty as gp_tests

pytestmark = [
    pytest.mark.skipif(torch.cuda.is_available(),
                       reason="emulation runs GPU launches in the CPU interpreter; on a GPU "
                              "the real launches run (the rest of the suite)"),
    pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning"),
]

CPU = torch.device("cpu")


@pytest.fixture
def strategy(monkeypatch):
    """Set the strategy of test_triton_bounds.check's fused calls."""
    def set_strategy(name):
        monkeypatch.setattr(bounds, "STRATEGY", name)
    return set_strategy


def _route(kind, B, dims, hidden, negatives, strategy):
    """The family ``check`` runs for these arguments (its "K" / "perms" spelled out)."""
    critic, zs = bounds._make(B, dims, hidden, "tanh", torch.float32, 0)
    gen = torch.Generator().manual_seed(0)
    perms = None
    if negatives == "perms":
        perms, negatives = bounds._explicit_perms(kind, B, len(dims), 3, gen), None
    elif negatives == "K":
        negatives = 3
    samples = resolve_samples(kind, zs, negatives, perms, gen)
    return execution_path(kind, critic, zs, samples, strategy=strategy)


# ----------------------------------------------------------------------------- the switch
def test_emulation_switch_takes_gpu_decisions():
    """Off: the interpreter's small tiles; on: the target's SMs, tiles and chunks."""
    assert emulated_gpu() is None and not uses_gpu_launches(CPU)
    assert outer_sums._fwd_tiles(CPU) == (8, 16) and outer_sums._sm_count(CPU) == 2
    for arch, (_, sms, _) in GPU_TARGETS.items():
        with emulate_gpu(arch):
            assert emulated_gpu().sms == sms == sm_count(CPU)
            assert outer_sums._fwd_tiles(CPU) == outer_sums._bwd_tiles(CPU) == (16, 256)
            assert gathered_tiles._max_programs(CPU) == 4 * sms
            assert gradient_penalty._num_programs(10 ** 6, CPU) == 2 * sms
            assert len(gathered_tiles._candidates(
                dict(BLOCK_H1=16, TWO_LAYERS=False), CPU)) == len(gathered_tiles._GPU_CONFIGS)
        with emulate_gpu(arch, sms=7):
            assert outer_sums._sm_count(CPU) == 7
    assert emulated_gpu() is None  # restored on exit
    with pytest.raises(ValueError, match="MDM_EMULATE_GPU"):
        with emulate_gpu("sm_75"):
            pass


def test_poisoned_fresh_buffers():
    """Under the tests' MDM_POISON_EMPTY=1 (conftest) fresh outputs are NaN, ints untouched."""
    assert torch.isnan(fresh_empty(3, 2, device=CPU, dtype=torch.float32)).all()
    assert fresh_empty(4, device=CPU, dtype=torch.int64).shape == (4,)


# ------------------------------------------------ the outer-sum ∂w_out bug (issue 22), 132 SMs
BUG_CASES = [  # (kind, B, dims): BLOCK_O < 256, so columns [⌈B/BLOCK_O⌉·BLOCK_O, S) unwritten
    # (two factors: the per-factor launches; three take the fused backward, tested below)
    pytest.param("dv", 40, (3, 4), id="dv-B40-m2"),
    pytest.param("nwj", 100, (3, 4), id="nwj-B100-m2", marks=pytest.mark.slow),
    pytest.param("infonce", 300, (3, 4), id="infonce-B300-m2", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("kind,B,dims", BUG_CASES)
def test_outer_backward_wout_on_132_sms(kind, B, dims, strategy):
    """The outer-sum backward on an H100/H200's grid, poisoned buffers: ∂w_out was NaN (it
    summed partial columns the kernel never wrote) while ∂z was right."""
    strategy("grid")
    with emulate_gpu("sm_90"):
        assert _route(kind, B, dims, (3,), "all", "grid") == "outer"
        assert not outer_sums.uses_fused_backward(B, len(dims), 132)
        launch = outer_sums.outer_backward_grid(B, len(dims), 132,
                                                outer_sums.OUTER_BACKWARD_TILES)
        written = -(-B // launch.block_owned) * launch.block_owned
        assert written < outer_sums.outer_stride(B, CPU), "the case must expose the bug"
        bounds.check(kind, B=B, dims=dims, hidden=(3,), act="relu", negatives="all")


# ------------------------------------------------------- outer sums across the tile table
def _switch_points(num_factors, sms, limit):
    """Batch sizes B at which outer_backward_grid picks another tile than at B − 1."""
    tile = lambda b: outer_sums.outer_backward_grid(  # noqa: E731
        b, num_factors, sms, outer_sums.OUTER_BACKWARD_TILES)
    pts = []
    for b in range(3, limit):
        a, c = tile(b - 1), tile(b)
        if (a.block_swept, a.block_owned) != (c.block_swept, c.block_owned):
            pts.append(b)
    return pts


# A 4-SM emulated GPU reaches the table's switch points at batch sizes the interpreter can
# afford (the 132-SM ones lie at B = 257, 353, … for two factors); same code, same table.
SMALL_GPU_SMS = 4


@pytest.mark.parametrize("num_factors,which", [(2, 0), (2, 1)])
@pytest.mark.parametrize("side", ["below", "above"])
def test_outer_sums_straddle_tile_switches(num_factors, which, side, strategy):
    strategy("grid")
    points = _switch_points(num_factors, SMALL_GPU_SMS, 200)
    b = points[which] - (1 if side == "below" else 0)
    dims = (3, 4)
    kind = {(2, 0): "dv", (2, 1): "infonce"}[(num_factors, which)]
    assert not outer_sums.uses_fused_backward(b, num_factors, SMALL_GPU_SMS)
    with emulate_gpu("sm_90", sms=SMALL_GPU_SMS):
        assert _route(kind, b, dims, (5,), "all", "grid") == "outer"
        bounds.check(kind, B=b, dims=dims, hidden=(5,), act="gelu", negatives="all", seed=1)


# ------------------------------------------- the fused outer-sum backward (issue 24, item 2)
def _fused_plan(B, num_factors, sms):
    """The fused plan the emulated GPU's launch takes (GPU tile), asserted to be taken."""
    assert outer_sums.uses_fused_backward(B, num_factors, sms)
    return outer_sums.outer_fused_plan(B, num_factors, sms)


@pytest.mark.parametrize("kind,B,dims,act,negatives", [
    # two factors: four row blocks, a partial last row and column block
    ("dv", 100, (3, 4), "relu", "all"),
    ("infonce", 100, (3, 4), "gelu", "all"),
    # three factors: partial row / column blocks, several chunks of F_0 and splits
    ("nwj", 37, (3, 2, 4), "leaky_relu", "all"),
    ("js", 37, (3, 2, 4), "tanh", "all"),
    pytest.param("wasserstein", 37, (2, 3, 4), "relu", "distinct", marks=pytest.mark.slow),
])
def test_fused_outer_backward_gpu_tile(kind, B, dims, act, negatives, strategy):
    """The fused backward with the GPU's 32 × 32 tiles and chunks on a 4-SM emulated GPU
    (the 132-SM grid of these batches would be mostly empty programs), poisoned buffers:
    every slot the sums read was written; the homogeneous (relu, leaky relu) ∂w_out
    identity and the per-sample one both match the float64 reference."""
    strategy("grid")
    with emulate_gpu("sm_90", sms=SMALL_GPU_SMS):
        plan = _fused_plan(B, len(dims), SMALL_GPU_SMS)
        assert (plan.block_rows, plan.block_cols) == outer_sums.OUTER_FUSED_TILE[:2]
        assert plan.row_blocks > 1 and plan.programs >= SMALL_GPU_SMS
        if len(dims) == 3:
            assert plan.splits > 1 and plan.span > plan.chunk or B > plan.span
        assert _route(kind, B, dims, (5,), negatives, "grid") == "outer"
        bounds.check(kind, B=B, dims=dims, hidden=(5,), act=act, negatives=negatives, seed=5)


@pytest.mark.parametrize("kind,dims,act", [("dv", (3, 2, 4), "relu"),
                                            ("infonce", (3, 4), "softplus")])
def test_fused_outer_backward_row_groups(monkeypatch, kind, dims, act, strategy):
    """Programs that loop over several row blocks (one row group: at large B every group
    holds many, :data:`~mdm_kernels.ops.outer_sums.FUSED_MAX_ROW_GROUPS`), GPU tiles: the
    slots they share across their row blocks are zeroed once and summed right."""
    strategy("grid")
    monkeypatch.setitem(outer_sums.FUSED_MAX_ROW_GROUPS, len(dims), 1)
    B, sms = 70, 1
    with emulate_gpu("sm_90", sms=sms):
        plan = outer_sums.outer_fused_plan(B, len(dims), sms)
        assert plan.row_groups == 1 and plan.row_blocks == 3
        assert outer_sums.uses_fused_backward(B, len(dims), sms)
        bounds.check(kind, B=B, dims=dims, hidden=(3,), act=act, negatives="all", seed=6)


def test_fused_outer_backward_is_bitwise_reproducible(strategy):
    """Slots summed in a fixed order, no atomics: the same bits twice, GPU tiles."""
    strategy("grid")
    critic, zs = bounds._make(37, (3, 2, 4), (6,), "relu", torch.float32, 9)
    grads = []
    with emulate_gpu("sm_90", sms=SMALL_GPU_SMS):
        for _ in range(2):
            for z in zs:
                z.grad = None
            critic.zero_grad()
            j, m = bounds._terms("dv", critic, zs, None)
            (j - m).backward()
            grads.append([z.grad.clone() for z in zs]
                         + [p.grad.clone() for p in critic.parameters()])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kind,dims", [("js", (3, 4)), ("wasserstein", (2, 3, 4))])
def test_outer_sums_distinct_on_an_a100(kind, dims, strategy):
    """sm_80, 108 SMs: the "distinct" mask with the A100's grid."""
    strategy("grid")
    with emulate_gpu("sm_80"):
        bounds.check(kind, B=11, dims=dims, hidden=(5,), act="softplus", negatives="distinct",
                     seed=2)


# ------------------------------------------------ gathered tiles: each autotune candidate
GATHERED_CASES = [  # (kind, negatives, B, dims, hidden): B, H straddle BLOCK_N ∈ {16, 32}
    ("dv", "K", 33, (3, 5), (7,)),
    ("js", "perms", 17, (2, 3), (33,)),                  # BLOCK_H1 = 64
    ("infonce", "all", 17, (3, 4), (6, 5)),             # two layers: the gathered grid
    ("nwj", "distinct", 7, (2, 3, 2), (6, 5)),
    ("wasserstein", "all", 5, (2, 3, 2, 2), (7,)),      # m = 4: four factors
]


@pytest.mark.parametrize("config", [0, 1, 2])
@pytest.mark.parametrize("kind,negatives,B,dims,hidden", GATHERED_CASES)
def test_gathered_tiles_each_candidate(kind, negatives, B, dims, hidden, config, strategy):
    strategy("grid")
    n_candidates = len(gathered_tiles.gathered_configs(hidden[0], len(hidden) == 2))
    if config >= n_candidates:
        pytest.skip(f"this launch keeps {n_candidates} candidate(s)")
    with emulate_gpu("sm_90", config=config):
        assert _route(kind, B, dims, hidden, negatives, "grid") == "grid"
        bounds.check(kind, B=B, dims=dims, hidden=hidden, act="tanh", negatives=negatives,
                     seed=3)


# ------------------------------------------------------------------------ one program
@pytest.mark.parametrize("kind,negatives,B,dims,hidden", [
    ("dv", "K", 17, (3, 5), (33,)),
    ("infonce", "all", 17, (3, 4), (6, 5)),             # two layers: BLOCK_K = 32 on a GPU
    ("nwj", "distinct", 7, (2, 3, 2), (7,)),
    ("wasserstein", "shuffle", 33, (3, 2), (9, 17)),
])
def test_one_program_step(kind, negatives, B, dims, hidden, strategy):
    strategy("single")
    with emulate_gpu("sm_90"):
        bounds.check(kind, B=B, dims=dims, hidden=hidden, act="gelu", negatives=negatives,
                     seed=4)


# ---------------------------------------------------- gradient penalty: each candidate
GP_SHAPES = {  # N and H straddle BLOCK_N ∈ {16, 32} and GP_CHUNK = 32
    "gram-1": ((29, 20), (33,), 33),
    "direct-1": ((9, 11), (33,), 31),
    "gram-2": ((30, 17), (33, 21), 17),
    "direct-2": ((3, 2), (13, 35), 33),
}


@pytest.mark.parametrize("config", [0, 1])
@pytest.mark.parametrize("shape", list(GP_SHAPES), ids=list(GP_SHAPES))
def test_gradient_penalty_each_candidate(shape, config):
    dims, hidden, n = GP_SHAPES[shape]
    critic = gp_tests.make_critic(dims, hidden, "gelu")
    joint, marginal, eps = gp_tests.make_pairs(dims, n, CPU)
    with emulate_gpu("sm_90", config=config):
        blocks = gradient_penalty.gp_block_sizes(hidden[0], hidden[1] if len(hidden) == 2
                                                 else None, 1, True)
        assert blocks["BJ"] == min(gradient_penalty.GP_CHUNK, blocks["BH1"])
        gp_tests.check_against_reference(critic, joint, marginal, eps)


# ---------------------------------------------------------------- Wasserstein terms (W + GP)
@pytest.mark.parametrize("path", ["single", "grid"])
def test_wasserstein_terms(path, monkeypatch):
    with emulate_gpu("sm_90"):
        gp_tests.test_wasserstein_terms_all_three(CPU, False, path, monkeypatch)


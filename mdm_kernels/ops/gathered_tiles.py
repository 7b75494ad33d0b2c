"""Gathered-tile kernels: the general multi-program path of the fused estimators.

One op, in the Liger-Kernel layout: Triton kernels (with the math), then the op's forward
and backward bodies :func:`tiles_forward` / :func:`tiles_backward` (registered as
``torch.library`` custom ops by :mod:`~mdm_kernels.ops.triton_ops`).  The scores and their gradients
are those of :mod:`~mdm_kernels.ops.sample_tiles` and :mod:`~mdm_kernels.ops.marginal_terms`;
this module tiles them over many programs.  It runs every estimator, negatives mode, m and
1-2 hidden layers; the router (:mod:`~mdm_kernels.ops.router`) sends small steps to the
one-program kernel and ``"all"`` over two or three factors to the outer sums instead.

Tiling
======
Samples are addressed as (row r, column c).  A *persistent* program p loops over rows
r = p, p + G, ... and, inside a row, over column tiles of ``BLOCK_N`` samples; a tile is the
(BLOCK_N × H_1) first pre-activation, built by gathering P rows by index.
(the index modes are in :mod:`~mdm_kernels.ops.sample_tiles`).

Reductions (constexpr ``RED``) stay in registers: plain sums, or an online log-sum-exp —
per lane a running max m and a rescaled sum s (s ← s·e^{m − m'} + e^{T − m'}, flash-attention
style), folded to one (max, sum) pair per program (``LSE``) or per row (``LSE_ROW``, InfoNCE,
where a row is always owned by a single program).  A tiny torch combine merges the per-program
partials.  Scores are never written to global memory; memory is O(G·H + B·m·H) whatever N.

Backward and determinism
========================
The backward kernel recomputes each tile from the saved P, the parameters and the saved LSE
statistics.  Where rows are shared:

* ``GRID`` (``"all"``): one launch per factor f with f as the owner; a program owns its rows of
  P_f, accumulates their gradient in registers over all columns and stores it once.  No atomics:
  deterministic (m launches, i.e. m× the forward work — the price of not using atomics).
* ``PERMS`` / ``NCE`` candidates / ``JOINT``: δ1 rows are scattered with ``tl.atomic_add``.  The
  joint pass touches each row once (deterministic); with K shuffles a row receives K adds whose
  order varies between runs, so the last bits of ∂z / ∂W_1 may vary on GPU.
* Parameter gradients (b_1, W_2, b_2, w_out, b_out) accumulate into per-program private slices
  (load-add-store, no atomics) that torch sums afterwards: deterministic.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .marginal_terms import (G_ONE, G_SIGMOID_NEG, MARGINAL_RED, NEG_BIG_VALUE,
                             RED_LSE, RED_LSE_ROW, RED_NEG_SOFTPLUS_NEG, RED_SUM,
                             marginal_grad_args, marginal_value)
from .sample_tiles import (IDX_GRID, IDX_JOINT, SamplePlan, marginal_plan,
                           reduce_samples, row_layout, scatter_shared_rows, store_owned_row,
                           tile_backprop, tile_score_grads)
from .runtime_flags import fresh_empty, sm_count, uses_gpu_launches
from .triton_helpers import (block_size, interpreter_enabled, launch_device, launch_tuned,
                             size_bucket, tile_configs)

# ptxas for sm_90 at H_1 = 128 (python/compile_sm90.py's method): one hidden layer spills
# nothing at (16, 4 warps), (16, 8) and (32, 8) but 0.5-3.4 kB per thread at (32, 4) and
# (64, 4/8) — the gathered rows' 64-bit address tiles are what fills the registers; two
# hidden layers spill least at (16, 8): 0 forward, ~0.5 kB backward.
_GPU_CONFIGS = [
    triton.Config({"BLOCK_N": 16}, num_warps=4),
    triton.Config({"BLOCK_N": 16}, num_warps=8),
    triton.Config({"BLOCK_N": 32}, num_warps=8),
]
#: the one config of the interpreter / ``MDM_TRITON_AUTOTUNE=0``
_FIXED_CONFIG = (triton.Config({"BLOCK_N": 16}, num_warps=1) if interpreter_enabled()
                 else triton.Config({"BLOCK_N": 16}, num_warps=8))
_MIN_BLOCK_N = 16  # smallest BLOCK_N of any config: sizes the per-program buffers


#: Widest first hidden layer the gathered tiles take with two hidden layers: the second
#: layer's ``tl.dot`` reads whole (BLOCK_N × H_1) and (BLOCK_H2 × H_1) operands through shared
#: memory, which grows with H_1 (Triton 3.9: 393 KB per block at H_1 = 1,024) — wider
#: critics are refused (router / TritonBackend.unsupported_reason).
GATHERED_MAX_HIDDEN = 256
#: ... and with one hidden layer (no tl.dot; the (BLOCK_N × H_1) tiles live in registers).
GATHERED_MAX_HIDDEN_ONE_LAYER = 1024


def gathered_fit_reason(hidden) -> str | None:
    """Why these hidden widths exceed what the gathered tiles take on a GPU, or ``None``."""
    two = len(hidden) == 2
    cap = GATHERED_MAX_HIDDEN if two else GATHERED_MAX_HIDDEN_ONE_LAYER
    if hidden[0] > cap:
        return (f"the gathered-tile kernels hold the first hidden layer in one tile: at most "
                f"{cap} units with {len(hidden)} hidden layer(s) (shared memory / registers "
                f"of an sm_80 or sm_90 block), the critic has {hidden[0]}")
    return None


def gathered_block_h2(h2: int) -> int:
    """BLOCK_H2: the chunk of second-layer units one ``tl.dot`` computes."""
    return min(32, block_size(h2))


def gathered_configs(h1: int, two_layers: bool) -> list:
    """The autotune configs kept for first-layer width ``h1`` (the fit table,
    verified at the edge widths by tests/test_gpu_resources.py): tiles of BLOCK_N × BLOCK_H1
    ≤ 4096 elements with one hidden layer, ≤ 2048 at 8 warps with two (the ptxas figures
    above); wider layers keep the smallest tile at 8 warps."""
    h1 = block_size(h1)
    if two_layers:
        kept = [c for c in _GPU_CONFIGS if c.kwargs["BLOCK_N"] * h1 <= 2048
                and c.num_warps == 8]
    else:
        kept = [c for c in _GPU_CONFIGS if c.kwargs["BLOCK_N"] * h1 <= 4096]
    return kept or [min(_GPU_CONFIGS, key=lambda c: (c.kwargs["BLOCK_N"], -c.num_warps))]


def _prune_configs(configs, named_args, **kwargs):
    """The autotuner's prune: only the configs :func:`gathered_configs` keeps."""
    h1 = kwargs.get("BLOCK_H1", named_args.get("BLOCK_H1", 128))
    two = kwargs.get("TWO_LAYERS", named_args.get("TWO_LAYERS", False))
    # the last guard before a launch (the router refuses these widths first)
    reason = gathered_fit_reason([named_args["H1"]] + ([named_args["H2"]] if two else []))
    if reason is not None:
        raise ValueError(reason)
    fits = {(c.kwargs["BLOCK_N"], c.num_warps) for c in gathered_configs(h1, two)}
    return [c for c in configs if (c.kwargs["BLOCK_N"], c.num_warps) in fits] or configs[:1]


_PRUNE = {"early_config_prune": _prune_configs}


def _max_programs(device) -> int:
    """Cap on the persistent grid: 4 programs per SM of the GPU (or of the emulated one,
    :func:`~mdm_kernels.ops.runtime_flags.emulate_gpu`); 4 in the plain interpreter."""
    if not uses_gpu_launches(device):
        return 4
    return 4 * sm_count(device)


def _num_programs(plan, device) -> int:
    """Programs of a launch of ``plan``: the persistent cap, or fewer rows."""
    return max(1, min(_max_programs(device), plan.rows(_MIN_BLOCK_N)))


def _launch_grid(plan, device):
    """The launch grid, as a function of the autotuned BLOCK_N."""
    cap = _num_programs(plan, device)
    return lambda meta: (max(1, min(cap, plan.rows(meta["BLOCK_N"]))),)


def _candidates(meta, device) -> list:
    """The configs a launch with these meta-parameters may run (what the autotuner's prune
    keeps): the fit table's (:func:`gathered_configs`) on a GPU or under emulation, else
    the one fixed config of the interpreter."""
    if uses_gpu_launches(device):
        return gathered_configs(meta["BLOCK_H1"], meta["TWO_LAYERS"])
    return [_FIXED_CONFIG]


def _autotune_keys(plan) -> tuple[int, int, int]:
    """(N_KEY, NCOL_KEY, B_KEY), the autotuners' keys in place of the exact N, NCOL and B
    (kernel arguments used only as keys): B and the samples per batch row N/B (K shuffles,
    K + 1 InfoNCE candidates, B^{m−1} grid columns) and NCOL rounded up to powers of two
    (:func:`~mdm_kernels.ops.triton_helpers.size_bucket`), N_KEY = bucket(B)·bucket(⌈N/B⌉).
    So every batch size in a bucket — a short last batch, a DDP-gathered batch — shares the
    tuned config instead of benchmarking again."""
    b = size_bucket(plan.B)
    return (b * size_bucket(triton.cdiv(plan.N, max(plan.B, 1))), size_bucket(plan.NCOL), b)


@triton.jit
def _prologue(b1_ptr, bout_ptr, H1, BLOCK_H1: tl.constexpr, BLOCK_N: tl.constexpr):
    """(program id, number of programs, tile lane offsets, hidden offsets and mask, b_1,
    b_out) — what every persistent program of this module starts from."""
    offs_h = tl.arange(0, BLOCK_H1)
    hmask = offs_h < H1
    return (tl.program_id(0), tl.num_programs(0), tl.arange(0, BLOCK_N), offs_h, hmask,
            tl.load(b1_ptr + offs_h, mask=hmask, other=0.0), tl.load(bout_ptr))


#: Autotune keys: the size buckets (:func:`_autotune_keys`), the widths and every constexpr
#: that changes the work per sample (index mode, reduction or gradient mode, factors,
#: grouping, distinct mask, activation, modalities, depth).  Not keyed: ``OWNER`` and
#: ``PARAM_GRADS`` of the backward — the ``"all"`` grid's owner launches share one ∂P
#: buffer (:func:`_run_bwd`), and a later owner that benchmarked would zero it through
#: ``reset_to_zero``; the owners do the same work per tile, so the first one's choice fits.
_FWD_KEYS = ["N_KEY", "NCOL_KEY", "H1", "H2", "B_KEY", "M", "IDX", "RED", "NF", "GROUPED",
             "DISTINCT", "TWO_LAYERS", "ACT"]
_BWD_KEYS = ["N_KEY", "NCOL_KEY", "H1", "H2", "B_KEY", "M", "IDX", "GMODE", "NF", "GROUPED",
             "DISTINCT", "TWO_LAYERS", "ACT"]


@triton.autotune(configs=tile_configs(_GPU_CONFIGS, _FIXED_CONFIG),
                 key=_FWD_KEYS, prune_configs_by=_PRUNE,
                 restore_value=["stats_ptr"])  # unused program slots must keep their init
@triton.jit
def _bounds_fwd_kernel(
    P_ptr, perm_ptr, b1_ptr, W2_ptr, b2_ptr, wout_ptr, bout_ptr,
    stats_ptr, row_lse_ptr,
    B, N, NCOL, H1, H2, N_KEY, NCOL_KEY, B_KEY,
    M: tl.constexpr, IDX: tl.constexpr, RED: tl.constexpr, NF: tl.constexpr,
    GROUPED: tl.constexpr, DISTINCT: tl.constexpr, TWO_LAYERS: tl.constexpr, ACT: tl.constexpr,
    BLOCK_H1: tl.constexpr, BLOCK_H2: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Forward: per-program partial (sum) or (max, Σ e^{T − max}) in stats[pid, 0:2];
    RED_LSE_ROW writes LSE_r of every row it owns to row_lse[r]."""
    pid, G, offs, offs_h, hmask, b1, bout = _prologue(b1_ptr, bout_ptr, H1, BLOCK_H1, BLOCK_N)
    R, ncol = row_layout(N, NCOL, B, IDX, BLOCK_N)
    acc, run_m, run_s = reduce_samples(P_ptr, b1, perm_ptr, W2_ptr, b2_ptr, wout_ptr, bout,
                                        row_lse_ptr, pid, G, R, N, ncol, offs, offs_h, hmask,
                                        B, H1, H2, M, IDX, RED, NF, GROUPED, TWO_LAYERS,
                                        BLOCK_H2, BLOCK_N, ACT, DISTINCT)
    if RED == 3:
        mx = tl.max(run_m, axis=0)
        tl.store(stats_ptr + pid * 2, mx)
        tl.store(stats_ptr + pid * 2 + 1, tl.sum(run_s * tl.exp(run_m - mx), axis=0))
    elif RED != 4:
        tl.store(stats_ptr + pid * 2, tl.sum(acc, axis=0))


@triton.autotune(configs=tile_configs(_GPU_CONFIGS, _FIXED_CONFIG),
                 key=_BWD_KEYS, prune_configs_by=_PRUNE,
                 reset_to_zero=["dP_ptr", "gb1_ptr", "gW2_ptr", "gb2_ptr", "gwout_ptr",
                                "gbout_ptr"])
@triton.jit
def _bounds_bwd_kernel(
    P_ptr, perm_ptr, b1_ptr, W2_ptr, b2_ptr, wout_ptr, bout_ptr,
    scale_ptr, shift_ptr, row_lse_ptr,
    dP_ptr, gb1_ptr, gW2_ptr, gb2_ptr, gwout_ptr, gbout_ptr,
    B, N, NCOL, H1, H2, N_KEY, NCOL_KEY, B_KEY,
    M: tl.constexpr, IDX: tl.constexpr, GMODE: tl.constexpr, NF: tl.constexpr,
    OWNER: tl.constexpr, GROUPED: tl.constexpr, DISTINCT: tl.constexpr,
    PARAM_GRADS: tl.constexpr, TWO_LAYERS: tl.constexpr, ACT: tl.constexpr,
    BLOCK_H1: tl.constexpr, BLOCK_H2: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Backward: recompute each tile, g = scale·φ(T), backprop through the MLP.
    dP rows: owner rows (GRID: factor OWNER, NCE: the anchor) accumulate in registers and
    are stored once; the others are scattered with atomics.  Parameter gradients go to this
    program's private slice of the g*_ptr buffers (only when PARAM_GRADS)."""
    pid, G, offs, offs_h, hmask, b1, bout = _prologue(b1_ptr, bout_ptr, H1, BLOCK_H1, BLOCK_N)
    scale = tl.load(scale_ptr)
    shift = tl.load(shift_ptr)
    offs_c = tl.arange(0, BLOCK_H2)
    R, ncol = row_layout(N, NCOL, B, IDX, BLOCK_N)
    if IDX == 2:
        owner = OWNER
    else:
        owner = 0  # NCE: the anchor factor; JOINT/PERMS: unused
    gb1 = tl.zeros([BLOCK_H1], tl.float32)
    gwout = tl.zeros([BLOCK_H1], tl.float32)   # 1 hidden layer only
    gbout = tl.zeros([BLOCK_N], tl.float32)
    for r in range(pid, R, G):
        own = tl.zeros([BLOCK_H1], tl.float32)  # gradient of the owner row
        for c0 in range(0, ncol, BLOCK_N):
            cols, valid, z1, a1, g = tile_score_grads(
                P_ptr, b1, r, c0, offs, N, ncol, offs_h, hmask, perm_ptr, W2_ptr, b2_ptr,
                wout_ptr, bout, scale, shift, row_lse_ptr, B, H1, H2, M, IDX, NF, owner,
                GROUPED, TWO_LAYERS, BLOCK_H2, ACT, GMODE, DISTINCT, BLOCK_N)
            if PARAM_GRADS:
                gbout += g
            d1, gw_inc = tile_backprop(g, z1, a1, valid, W2_ptr, b2_ptr, wout_ptr, offs_h,
                                        hmask, offs_c, H1, H2, gW2_ptr + pid * H2 * H1,
                                        gb2_ptr + pid * H2, gwout_ptr + pid * H2,
                                        TWO_LAYERS, PARAM_GRADS, BLOCK_H2, ACT)
            if PARAM_GRADS:
                gwout += gw_inc
                gb1 += tl.sum(d1, axis=0)
            scatter_shared_rows(dP_ptr, d1, r, cols, valid, offs_h, hmask, perm_ptr, B, H1,
                                 M, IDX, NF, owner, GROUPED)
            own += tl.sum(d1, axis=0)
        store_owned_row(dP_ptr, own, r, offs_h, hmask, B, H1, M, IDX, owner, GROUPED)
    if PARAM_GRADS:
        tl.store(gb1_ptr + pid * H1 + offs_h, gb1, mask=hmask)
        tl.store(gbout_ptr + pid, tl.sum(gbout, axis=0))
        if not TWO_LAYERS:
            tl.store(gwout_ptr + pid * H1 + offs_h, gwout, mask=hmask)


# ----------------------------------------------------------------------------- launches
_FWD_ARG_NAMES = tuple(_bounds_fwd_kernel.arg_names)
_BWD_ARG_NAMES = tuple(_bounds_bwd_kernel.arg_names)


def _tuning_key(arg_names, args, meta, keys) -> tuple:
    """The tuning case of a launch: the values of the autotuner's ``keys``, looked up by the
    kernel's ``arg_names`` in the positional ``args`` and in the constexpr ``meta``."""
    named = dict(zip(arg_names, args), **meta)
    return tuple(named[k] for k in keys)


def _common_meta(P, W2, two_layers, act):
    H1 = P.shape[2]
    H2 = W2.shape[0] if two_layers else 1
    return dict(M=P.shape[0], TWO_LAYERS=two_layers, ACT=act, BLOCK_H1=block_size(H1),
                BLOCK_H2=gathered_block_h2(H2) if two_layers else 16), H1, H2


def _launch_fwd(plan, red, P, perms, b1, W2, b2, wout, bout, act):
    device = P.device
    meta, H1, H2 = _common_meta(P, W2, W2 is not None, act)
    G = _num_programs(plan, device)
    stats = torch.zeros(G, 2, device=device, dtype=torch.float32)
    if red == RED_LSE:
        stats[:, 0] = NEG_BIG_VALUE
    row_lse = fresh_empty(plan.B if red == RED_LSE_ROW else 1, device=device,
                          dtype=torch.float32)
    dummy = b1
    args = (P, perms if perms is not None else b1, b1,
            W2 if W2 is not None else dummy, b2 if b2 is not None else dummy, wout, bout,
            stats, row_lse, plan.B, plan.N, plan.NCOL, H1, H2, *_autotune_keys(plan))
    meta.update(IDX=plan.idx, RED=red, NF=plan.NF, GROUPED=plan.grouped,
                DISTINCT=plan.distinct)
    with launch_device(P):
        launch_tuned(_bounds_fwd_kernel, _launch_grid(plan, device), args, meta,
                     _candidates(meta, device), _tuning_key(_FWD_ARG_NAMES, args, meta, _FWD_KEYS))
    return stats, row_lse


def _backward_buffers(plan, P, G, H1, H2, two, param_grads, dP=None):
    """The output buffers of one backward launch, each allocated the way the kernel writes
    it: ∂P zero-filled only for launches that scatter rows with atomics (joint, shuffles,
    InfoNCE candidates); an "all"-grid owner launch stores every row of the factor(s) it
    owns exactly once, so the NF owner launches share one uninitialised buffer (``dP``,
    ``torch.empty``).  The per-program parameter-gradient slices (G·(2H + H₂·H₁ + …) floats:
    553 MB of W_2 slices at G = 528, H = 512) exist only with ``param_grads``; zero-filled,
    since W_2/b_2/w_out are read-modify-written per tile and a launch may run fewer than G
    programs (the autotuned BLOCK_N).  Returns (dP, gb1, gW2, gb2, gwout, gbout)."""
    f32 = dict(device=P.device, dtype=torch.float32)
    if dP is None:
        dP = (fresh_empty(P.shape, device=P.device, dtype=torch.float32)
              if plan.idx == IDX_GRID else torch.zeros_like(P))
    if not param_grads:
        unused = fresh_empty(1, **f32)  # never written with PARAM_GRADS=False
        return dP, unused, unused, unused, unused, unused
    gW2 = torch.zeros(G, H2, H1, **f32) if two else fresh_empty(1, **f32)
    gb2 = torch.zeros(G, H2, **f32) if two else fresh_empty(1, **f32)
    return (dP, torch.zeros(G, H1, **f32), gW2, gb2, torch.zeros(G, H2 if two else H1, **f32),
            torch.zeros(G, **f32))


def _launch_bwd(plan, gmode, scale, shift, row_lse, P, perms, b1, W2, b2, wout, bout, act,
                owner=0, param_grads=True, dP=None):
    """One backward launch; ``dP``: the shared buffer of the "all"-grid owner launches."""
    device = P.device
    two = W2 is not None
    meta, H1, H2 = _common_meta(P, W2, two, act)
    G = _num_programs(plan, device)
    dP, gb1, gW2, gb2, gwout, gbout = _backward_buffers(plan, P, G, H1, H2, two, param_grads,
                                                        dP)
    args = (P, perms if perms is not None else b1, b1,
            W2 if two else b1, b2 if two else b1, wout, bout,
            scale, shift, row_lse,
            dP, gb1, gW2, gb2, gwout, gbout,
            plan.B, plan.N, plan.NCOL, H1, H2, *_autotune_keys(plan))
    meta.update(IDX=plan.idx, GMODE=gmode, NF=plan.NF, OWNER=owner, GROUPED=plan.grouped,
                DISTINCT=plan.distinct, PARAM_GRADS=param_grads)
    with launch_device(P):
        launch_tuned(_bounds_bwd_kernel, _launch_grid(plan, device), args, meta,
                     _candidates(meta, device), _tuning_key(_BWD_ARG_NAMES, args, meta, _BWD_KEYS))
    if not param_grads:
        return dP, None
    grads = [gb1.sum(0), gwout.sum(0), gbout.sum(0).reshape(1)]
    grads += [gW2.sum(0), gb2.sum(0)] if two else [None, None]
    return dP, grads


def _run_bwd(plan, gmode, scale, shift, row_lse, args, act):
    """All launches of one term; GRID runs one deterministic launch per owner factor, each
    storing its factor's rows into one shared ∂P (the owners' autotune key is the same, so
    only the first launch can benchmark — and so zero the buffer through ``reset_to_zero`` —
    before any row is stored)."""
    if plan.idx != IDX_GRID:
        return _launch_bwd(plan, gmode, scale, shift, row_lse, *args, act)
    dP, grads = _launch_bwd(plan, gmode, scale, shift, row_lse, *args, act, owner=0)
    for f in range(1, plan.NF):
        _launch_bwd(plan, gmode, scale, shift, row_lse, *args, act, owner=f,
                    param_grads=False, dP=dP)
    return dP, grads


# ----------------------------------------------------------------------------- op bodies
# The forward and backward of the ``mdm_kernels::triton_tiles_*`` custom ops
# (:mod:`~mdm_kernels.ops.triton_ops` registers them with their autograd formula).
def tiles_forward(kind, act, P, b1, wout, bout, W2, b2, perms, distinct=False):
    """(joint_term, marginal_term, stat) from the stacked projections P (m × B × H_1,
    float32), the first bias and the tail parameters; ``stat`` is what the backward needs of
    the marginal reduction (:func:`~mdm_kernels.ops.marginal_terms.marginal_value`: the LSE,
    0-dim, for DV/NWJ; the B row LSEs for InfoNCE; an empty (0,) tensor otherwise)."""
    B, m = P.shape[1], P.shape[0]
    args = (P, perms, b1, W2, b2, wout, bout)
    # joint term: the B diagonal samples
    jplan = SamplePlan(IDX_JOINT, B, B, 0)
    jstats, _ = _launch_fwd(jplan, RED_NEG_SOFTPLUS_NEG if kind == "js" else RED_SUM,
                            *args, act)
    joint = jstats[:, 0].sum() / B
    plan = marginal_plan(kind, B, m, perms, distinct)
    stats, row_lse = _launch_fwd(plan, MARGINAL_RED[kind], *args, act)
    marginal, stat = marginal_value(kind, stats, row_lse, plan.N, plan.candidates)
    if stat is None:
        stat = P.new_empty(0)
    return joint, marginal, stat


def tiles_backward(kind, act, P, b1, wout, bout, W2, b2, perms, stat, g_joint, g_marg,
                   distinct=False):
    """(∂P, ∂b_1, ∂w_out, ∂b_out, ∂W_2, ∂b_2) of g_joint·joint + g_marg·marginal by
    recomputation (module docstring); ∂W_2, ∂b_2 are ``None`` with one hidden layer."""
    B, m = P.shape[1], P.shape[0]
    args = (P, perms, b1, W2, b2, wout, bout)
    jplan = SamplePlan(IDX_JOINT, B, B, 0)
    plan = marginal_plan(kind, B, m, perms, distinct)
    zero = torch.zeros(1, device=P.device, dtype=torch.float32)
    g_joint = g_joint.float().reshape(1)
    dP, grads = _run_bwd(jplan, G_SIGMOID_NEG if kind == "js" else G_ONE, g_joint / B,
                         zero, zero, args, act)
    gmode, scale, shift, row_lse = marginal_grad_args(kind, g_marg, stat, plan.N, B)
    dPm, gradsm = _run_bwd(plan, gmode, scale, shift, row_lse, args, act)
    dP = dP + dPm
    return (dP, *[a + b if a is not None else None for a, b in zip(grads, gradsm)])

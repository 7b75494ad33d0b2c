"""The fused Triton kernels as ``torch.library`` custom ops, so ``torch.compile`` sees them.

Every kernel family's forward and backward is one custom op (namespace ``mdm_kernels``),
registered with ``torch.library.custom_op`` (the launches run in the op's body: Triton on
CUDA tensors, Triton's interpreter on CPU tensors under ``TRITON_INTERPRET=1``), a fake
kernel (``register_fake``: output shapes from input shapes, for FakeTensor tracing, with
symbolic batch sizes under ``torch.compile(dynamic=True)``) and an autograd formula
(``register_autograd``).  Dynamo keeps each op as one opaque node of the graph — no graph
break, no host synchronisation in the op path — and AOTAutograd places the backward op in
the backward graph.  The static configuration is part of each op's schema (estimator
``kind``, activation code ``act``; layer count and negatives layout follow from which
optional tensors are given: ``W2``/``b2`` for a second hidden layer, ``perms`` (K, m, B) for
shuffles or ``None`` for a grid — ``"all"``, or ``"distinct"`` with the schema's
``distinct=True``), never a Python closure.  Schema arguments have no defaults: the
dispatcher drops an argument equal to its default before autograd sees the call, so a
backward returning one gradient per declared input would no longer match.

No op adds compute: each forward returns, beside the terms, what its backward needs — the
log-sum-exp statistic (the marginal LSE, 0-dim, for DV/NWJ; the B row LSEs for InfoNCE; an
empty (0,) tensor otherwise), the transposed factors of the outer sums, and for the
one-program step and the gradient penalty (which compute their gradients in the forward
pass) those gradient buffers.  These extra outputs are marked non-differentiable.  (One
copy remains: outputs may not alias each other, so the penalty's parameter gradients —
slices of one reduced buffer — are copied out; parameter-sized.)

Eager calls (outside ``torch.compile`` tracing) skip the dispatcher's custom-op layer, whose
Python machinery costs more host time than a paper-scale step's launches (:func:`_call`):
the entries run each op's body, ``setup_context`` and backward formula — the functions
registered with the op — through one ``autograd.Function`` (:class:`_EagerOp`).

==============================  ===============================================  ============
op                              returns                                          backward
==============================  ===============================================  ============
``triton_tiles_fwd``            joint, marginal, stat                            ``triton_tiles_bwd``
``triton_outer_fwd``            marginal, Fᵀ, stat                               ``triton_outer_bwd``
``triton_single_fwd``           joint, marginal, P, ∂P^J, ∂P^M, pg               ``triton_single_bwd``
``triton_gradient_penalty``     gp, [∂sj, ∂sm, ∂b_1, ∂W, ∂W_2, ∂b_2, ∂w_out]     torch (scales the saved gradients)
==============================  ===============================================  ============

The functional entries below (:func:`gathered_tile_terms`, :func:`outer_grid_terms`,
:func:`single_program_dependency_terms`, :func:`fused_gradient_penalty`,
:func:`fused_penalty_from_projections`) build each op's inputs from an ``MLPCritic``; the
router (:mod:`~mdm_kernels.ops.router`) picks which one runs.

Why ``custom_op`` rather than ``triton_op`` + ``wrap_triton``: the kernels' launches carry
host logic that Inductor's user-defined-kernel path does not take (autotuners with
``prune_configs_by``/``restore_value``/``reset_to_zero``, grids computed from the autotuned
``BLOCK_N``), and under Triton's interpreter (how CI runs them, on CPU tensors) a
``triton_op`` does not trace at all: with torch 2.13 / triton 3.9 the wrapped kernel runs on
the fake tensors ("Cannot access data pointer of Tensor") for every backend, aot_eager
included.  An opaque custom op runs the same code eagerly, in compiled graphs and in CUDA
graphs (every buffer is allocated in the op with torch, no host sync inside).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .gathered_tiles import tiles_backward, tiles_forward
from .gradient_penalty import _critic_weights, _first_weight, _launch as gp_launch
from .marginal_terms import MARGINAL_RED, RED_LSE, RED_LSE_ROW
from .outer_sums import outer_backward, outer_forward, outer_stride
from .single_program import param_grad_size, single_backward, single_forward
from .triton_helpers import activation_code, critic_tail


def _stat_like(kind: str, ref: Tensor, batch_size) -> Tensor:
    """Fake of a forward's ``stat`` output: the LSE (0-dim) for DV/NWJ, the row LSEs (B,)
    for InfoNCE, an empty (0,) tensor for JS/Wasserstein (float32, on ``ref``'s device)."""
    red = MARGINAL_RED[kind]
    shape = () if red == RED_LSE else (batch_size,) if red == RED_LSE_ROW else (0,)
    return ref.new_empty(shape, dtype=torch.float32)


def _zero_if_none(grad: Optional[Tensor], ref: Tensor) -> Tensor:
    """An incoming gradient, or a 0-dim float32 zero for an output that was not used."""
    return grad if grad is not None else ref.new_zeros((), dtype=torch.float32)


def _none_if_empty(t: Tensor, present: bool) -> Optional[Tensor]:
    return t if present else None


# ------------------------------------------------------------------ registration, eager calls
#: op → its body (the function ``custom_op`` wraps) and (setup_context, backward) formula.
_BODIES: dict = {}
_FORMULAS: dict = {}


def _op(name: str):
    """``torch.library.custom_op(name)`` that also remembers the body for :func:`_call`."""
    def register(body):
        op = torch.library.custom_op(name, mutates_args=())(body)
        _BODIES[op] = body
        return op
    return register


def _register_autograd(op, backward, setup_context) -> None:
    op.register_autograd(backward, setup_context=setup_context)
    _FORMULAS[op] = (setup_context, backward)


#: :func:`_flatten` layout entry of a single tensor (a tensor list has its length).
_TENSOR = -1


def _flatten(values) -> tuple[list, list]:
    """(tensors, layout) of a call's arguments or outputs: per value, ``_TENSOR`` for a
    tensor, the length of a tensor list, ``None`` for anything else (``None``, str, int,
    bool)."""
    tensors, layout = [], []
    for v in values:
        if isinstance(v, Tensor):
            tensors.append(v)
            layout.append(_TENSOR)
        elif isinstance(v, (list, tuple)):
            tensors.extend(v)
            layout.append(len(v))
        else:
            layout.append(None)
    return tensors, layout


def _unflatten(tensors, layout, template) -> list:
    """Inverse of :func:`_flatten`; ``template`` supplies the values that are no tensors."""
    out, k = [], 0
    for v, n in zip(template, layout):
        if n is None:
            out.append(v)
        elif n == _TENSOR:
            out.append(tensors[k])
            k += 1
        else:
            out.append(list(tensors[k:k + n]))
            k += n
    return out


class _EagerOp(torch.autograd.Function):
    """An eager call of a registered op: its body, ``setup_context`` and backward formula —
    the very functions the op registers — without the dispatcher's custom-op layer, whose
    Python machinery costs about 40 µs a call and 150 µs per forward + backward on CI's CPU
    (twice the cost of the whole autograd.Function).  Tensor lists are flattened."""

    @staticmethod
    def forward(ctx, op, template, layout, box, *tensors):
        args = tuple(_unflatten(tensors, layout, template))
        out = _BODIES[op](*args)
        setup_context, ctx.formula = _FORMULAS[op]
        ctx.eager = True           # the formula then runs the backward op's body directly
        setup_context(ctx, args, out)
        flat_out, ctx.out_layout = _flatten(out)
        box["layout"], ctx.in_layout = ctx.out_layout, layout
        ctx.out_template = [None] * len(ctx.out_layout)
        return tuple(flat_out)

    @staticmethod
    @torch.autograd.function.once_differentiable  # the formulas are first-order only
    def backward(ctx, *flat_grads):
        grads = _unflatten(flat_grads, ctx.out_layout, ctx.out_template)
        result = ctx.formula(ctx, *grads)
        flat = [None, None, None, None]      # op, template, layout, box
        for g, n in zip(result, ctx.in_layout):
            if n == _TENSOR:
                flat.append(g)
            elif n is not None:
                flat.extend([None] * n if g is None else g)
        return tuple(flat)


def _call(op, *args):
    """Call registered op ``op``.  While ``torch.compile`` traces: the op itself, one opaque
    node with its fake kernel and autograd formula.  Eagerly: its body, directly when no
    gradient is needed, else through :class:`_EagerOp` (same body, same formula)."""
    if torch.compiler.is_compiling():
        return op(*args)
    tensors, layout = _flatten(args)
    if op not in _FORMULAS or not (torch.is_grad_enabled()
                                   and any(t.requires_grad for t in tensors)):
        return _BODIES[op](*args)
    box = {}
    flat_out = _EagerOp.apply(op, args, layout, box, *tensors)
    out = _unflatten(flat_out, box["layout"], [None] * len(box["layout"]))
    return tuple(out)


def _backward_call(ctx, op, *args):
    """A backward op from an autograd formula: its body when the forward ran eagerly
    (:class:`_EagerOp`), else the op (compiled graphs, ``opcheck``)."""
    return _BODIES[op](*args) if getattr(ctx, "eager", False) else op(*args)


# ------------------------------------------------------------------ gathered tiles
@_op("mdm_kernels::triton_tiles_fwd")
def tiles_fwd(P: Tensor, b1: Tensor, wout: Tensor, bout: Tensor, W2: Optional[Tensor],
              b2: Optional[Tensor], perms: Optional[Tensor], kind: str, act: int,
              distinct: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(joint_term, marginal_term, stat) on the gathered-tile kernels from the stacked
    projections P (m × B × H_1, float32), b_1 (H_1,), w_out (H_last,), b_out (1,), the second
    hidden layer W_2 (H_2 × H_1) / b_2 (H_2,) or ``None``, and ``perms`` (K, m, B) int64 or
    ``None`` for a grid: ``"all"``, or ``"distinct"`` when ``distinct``
    (:func:`~mdm_kernels.ops.gathered_tiles.tiles_forward`)."""
    return tiles_forward(kind, act, P, b1, wout, bout, W2, b2, perms, distinct)


@tiles_fwd.register_fake
def _tiles_fwd_fake(P, b1, wout, bout, W2, b2, perms, kind, act, distinct):
    f32 = torch.float32
    return (P.new_empty((), dtype=f32), P.new_empty((), dtype=f32),
            _stat_like(kind, P, P.shape[1]))


@_op("mdm_kernels::triton_tiles_bwd")
def tiles_bwd(P: Tensor, b1: Tensor, wout: Tensor, bout: Tensor, W2: Optional[Tensor],
              b2: Optional[Tensor], perms: Optional[Tensor], stat: Tensor, g_joint: Tensor,
              g_marg: Tensor, kind: str, act: int, distinct: bool
              ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(∂P, ∂b_1, ∂w_out, ∂b_out, ∂W_2, ∂b_2) of g_joint·joint + g_marg·marginal by
    recomputation; ∂W_2 and ∂b_2 are empty (0,) tensors with one hidden layer."""
    dP, gb1, gwout, gbout, gW2, gb2 = tiles_backward(kind, act, P, b1, wout, bout, W2, b2,
                                                     perms, stat, g_joint, g_marg, distinct)
    empty = P.new_empty(0)
    return (dP, gb1, gwout, gbout, empty if gW2 is None else gW2,
            empty.clone() if gb2 is None else gb2)


@tiles_bwd.register_fake
def _tiles_bwd_fake(P, b1, wout, bout, W2, b2, perms, stat, g_joint, g_marg, kind, act,
                    distinct):
    f32 = torch.float32
    two = W2 is not None
    return (torch.empty_like(P), b1.new_empty(b1.shape, dtype=f32),
            wout.new_empty(wout.shape, dtype=f32), bout.new_empty(bout.shape, dtype=f32),
            P.new_empty(W2.shape if two else (0,)), P.new_empty(b2.shape if two else (0,)))


def _tiles_setup_context(ctx, inputs, output):
    P, b1, wout, bout, W2, b2, perms, kind, act, distinct = inputs
    ctx.kind, ctx.act, ctx.distinct = kind, act, distinct
    ctx.save_for_backward(P, b1, wout, bout, W2, b2, perms, output[2])
    ctx.mark_non_differentiable(output[2])


def _tiles_backward(ctx, g_joint, g_marg, _g_stat):
    P, b1, wout, bout, W2, b2, perms, stat = ctx.saved_tensors
    dP, gb1, gwout, gbout, gW2, gb2 = _backward_call(
        ctx, tiles_bwd, P, b1, wout, bout, W2, b2, perms, stat, _zero_if_none(g_joint, P),
        _zero_if_none(g_marg, P), ctx.kind, ctx.act, ctx.distinct)
    two = W2 is not None
    return (dP, gb1, gwout, gbout, _none_if_empty(gW2, two), _none_if_empty(gb2, two),
            None, None, None, None)


_register_autograd(tiles_fwd, _tiles_backward, _tiles_setup_context)


def gathered_tile_terms(kind, critic, P, perms, distinct=False):
    """(joint_term, marginal_term) on the gathered tiles from the stacked projections P
    (m × B × H_1, float32) and ``perms`` ((K, m, B) or ``None`` for ``"all"``, or for
    ``"distinct"`` with ``distinct``)."""
    ws, bs, wout, bout = critic_tail(critic)
    b1 = critic.first_bias.float().contiguous()
    joint, marginal, _ = _call(tiles_fwd, P, b1, wout, bout, ws[0] if ws else None,
                               bs[0] if bs else None, perms, kind, activation_code(critic),
                               bool(distinct))
    return joint, marginal


# ------------------------------------------------------------------ outer sums
@_op("mdm_kernels::triton_outer_fwd")
def outer_fwd(factors: list[Tensor], wout: Tensor, bout: Tensor, kind: str, act: int,
              distinct: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(marginal_term, Fᵀ, stat) of the ``"all"`` grid over 2 or 3 factors (B × H, float32)
    of a one-hidden-layer critic (:func:`~mdm_kernels.ops.outer_sums.outer_forward`)."""
    return outer_forward(kind, act, factors, wout, bout, distinct)


@outer_fwd.register_fake
def _outer_fwd_fake(factors, wout, bout, kind, act, distinct):
    B, H = factors[0].shape
    ref = factors[0]
    return (ref.new_empty((), dtype=torch.float32),
            ref.new_empty((len(factors), H, outer_stride(B, ref.device)),
                          dtype=torch.float32),
            _stat_like(kind, ref, B))


@_op("mdm_kernels::triton_outer_bwd")
def outer_bwd(Ft: Tensor, wout: Tensor, bout: Tensor, stat: Tensor, grad: Tensor,
              batch_size: int, kind: str, act: int, distinct: bool
              ) -> tuple[list[Tensor], Tensor, Tensor]:
    """([∂F_0, …], ∂w_out, ∂b_out) of grad·marginal_term: one fused launch (two factors at
    small B: one launch per factor, :func:`~mdm_kernels.ops.outer_sums.uses_fused_backward`)."""
    *dfactors, g_wout, g_bout = outer_backward(kind, act, Ft, wout, bout, stat, grad,
                                               batch_size, distinct)
    return dfactors, g_wout, g_bout


@outer_bwd.register_fake
def _outer_bwd_fake(Ft, wout, bout, stat, grad, batch_size, kind, act, distinct):
    nf, H, _ = Ft.shape
    # each ∂F_f is the transpose of a contiguous (H × B) buffer, as the kernels leave it
    return ([Ft.new_empty((H, batch_size)).t() for _ in range(nf)],
            wout.new_empty(wout.shape, dtype=torch.float32),
            bout.new_empty(bout.shape, dtype=torch.float32))


def _outer_setup_context(ctx, inputs, output):
    factors, wout, bout, kind, act, distinct = inputs
    _, Ft, stat = output
    ctx.kind, ctx.act, ctx.batch_size = kind, act, factors[0].shape[0]
    ctx.distinct = distinct
    ctx.save_for_backward(Ft, wout, bout, stat)
    ctx.mark_non_differentiable(Ft, stat)


def _outer_backward(ctx, grad, _g_ft, _g_stat):
    Ft, wout, bout, stat = ctx.saved_tensors
    dfactors, g_wout, g_bout = _backward_call(
        ctx, outer_bwd, Ft, wout, bout, stat, _zero_if_none(grad, Ft), ctx.batch_size,
        ctx.kind, ctx.act, ctx.distinct)
    return list(dfactors), g_wout, g_bout, None, None, None


_register_autograd(outer_fwd, _outer_backward, _outer_setup_context)


def outer_grid_terms(kind, critic, P, b1, wout, bout, act, num_factors, distinct=False):
    """(joint_term, marginal_term) on a two- or three-factor ``"all"`` grid from the stacked
    projections P (m × B × H, float32): the joint term (B diagonal samples) in torch, the
    marginal term with the outer-sum op.  Factors: F_0 = P_1 + b_1, then P_2, P_3 (m = 3),
    or the candidate sum Σ_{k ≥ 2} P_k (two factors: m = 2, InfoNCE).  ``distinct``: the
    grid without coinciding indices (``"distinct"`` negatives)."""
    first = P[0] + b1
    rest = [P[1:].sum(0)] if num_factors == 2 else list(P[1:])
    factors = [first] + rest
    t_joint = critic.act(sum(factors)) @ wout + bout
    joint = (-torch.nn.functional.softplus(-t_joint) if kind == "js" else t_joint).mean()
    marginal, _, _ = _call(outer_fwd, [f.contiguous() for f in factors], wout, bout, kind,
                           act, bool(distinct))
    return joint, marginal


# ------------------------------------------------------------------ one program
@_op("mdm_kernels::triton_single_fwd")
def single_fwd(zs: list[Tensor], w1s: list[Tensor], b1: Tensor, wout: Tensor, bout: Tensor,
               W2: Optional[Tensor], b2: Optional[Tensor], perms: Optional[Tensor], kind: str,
               act: int, distinct: bool
               ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(joint_term, marginal_term, P, ∂P^J, ∂P^M, pg): the whole step in one launch from the
    raw z's and the critic's parameters (float32), both terms' gradients computed in the
    same pass (:func:`~mdm_kernels.ops.single_program.single_forward`)."""
    return single_forward(kind, act, zs, w1s, b1, wout, bout, W2, b2, perms, distinct)


@single_fwd.register_fake
def _single_fwd_fake(zs, w1s, b1, wout, bout, W2, b2, perms, kind, act, distinct):
    m, (B, H1) = len(zs), (zs[0].shape[0], w1s[0].shape[0])
    two = W2 is not None
    sp = param_grad_size(H1, W2.shape[0] if two else 1, two)
    new = lambda *shape: zs[0].new_empty(shape, dtype=torch.float32)  # noqa: E731
    return new(), new(), new(m, B, H1), new(B, H1), new(m, B, H1), new(2, sp)


@_op("mdm_kernels::triton_single_bwd")
def single_bwd(zs: list[Tensor], w1s: list[Tensor], dPJ: Tensor, dPM: Tensor, pg: Tensor,
               g_joint: Tensor, g_marg: Tensor, g_proj: Optional[Tensor], need_dz: bool
               ) -> tuple[list[Tensor], list[Tensor], Tensor]:
    """([∂z_j] (empty unless ``need_dz``), [∂W_{1,j}], gsmall) in one launch
    (:func:`~mdm_kernels.ops.single_program.single_backward`)."""
    dzs, dws, gsmall = single_backward(zs, w1s, dPJ, dPM, pg, g_joint, g_marg, g_proj,
                                       need_dz)
    return list(dzs), list(dws), gsmall


@single_bwd.register_fake
def _single_bwd_fake(zs, w1s, dPJ, dPM, pg, g_joint, g_marg, g_proj, need_dz):
    return ([z.new_empty(z.shape) for z in zs] if need_dz else [],
            [w.new_empty(w.shape) for w in w1s], pg.new_empty(pg.shape[1]))


def _single_setup_context(ctx, inputs, output):
    zs, w1s, b1, wout, bout, W2, b2, perms, kind, act, distinct = inputs
    _, _, _, dPJ, dPM, pg = output
    ctx.num_modalities = len(zs)
    ctx.need_dz = any(z.requires_grad for z in zs)
    ctx.param_shapes = [(p.shape, p.dtype) for p in (b1, wout, bout, W2, b2) if p is not None]
    ctx.two = W2 is not None
    ctx.save_for_backward(*zs, *w1s, dPJ, dPM, pg)
    ctx.mark_non_differentiable(dPJ, dPM, pg)
    ctx.set_materialize_grads(False)  # an unused P: no zero-filled gradient to add


def _single_backward(ctx, g_joint, g_marg, g_proj, *_unused):
    m = ctx.num_modalities
    saved = ctx.saved_tensors
    zs, w1s = list(saved[:m]), list(saved[m:2 * m])
    dPJ, dPM, pg = saved[2 * m:]
    dzs, dws, gsmall = _backward_call(
        ctx, single_bwd, zs, w1s, dPJ, dPM, pg, _zero_if_none(g_joint, dPJ),
        _zero_if_none(g_marg, dPJ), g_proj, ctx.need_dz)
    # gsmall layout [b_1 | w_out | b_out | W_2 | b_2]; inputs (b1, wout, bout, W2, b2)
    grads, start = [], 0
    for shape, dtype in ctx.param_shapes:
        size = math.prod(shape)
        grads.append(gsmall[start:start + size].view(shape).to(dtype))
        start += size
    if not ctx.two:
        grads += [None, None]
    return (list(dzs) if ctx.need_dz else [None] * m), list(dws), *grads, None, None, None, None


_register_autograd(single_fwd, _single_backward, _single_setup_context)


def single_program_dependency_terms(kind, critic, zs, perms, return_projections=False,
                                    distinct=False):
    """(joint_term, marginal_term) of estimator ``kind`` in one forward launch and one
    backward launch (:mod:`~mdm_kernels.ops.single_program`); ``perms`` is the (K, m, B)
    int64 index tensor or ``None`` for the "all" grid (the "distinct" grid with
    ``distinct``).  ``return_projections=True`` also
    returns the differentiable projections P (m × B × H_1, float32).  Call through
    :func:`~mdm_kernels.ops.router.fused_dependency_terms`, which checks the inputs and
    decides when this path applies."""
    tail_w = [layer.weight for layer in critic.hidden_layers]
    tail_b = [layer.bias for layer in critic.hidden_layers]
    joint, marginal, P, _, _, _ = _call(
        single_fwd,
        [z.contiguous() for z in zs], [w.contiguous() for w in critic.first_weights],
        critic.first_bias, critic.out.weight, critic.out.bias,
        tail_w[0] if tail_w else None, tail_b[0] if tail_b else None, perms, kind,
        activation_code(critic), bool(distinct))
    return (joint, marginal, P) if return_projections else (joint, marginal)


# ------------------------------------------------------------------ gradient penalty
#: The penalty's gradients, in the order of the op's list output and of the inputs they
#: belong to: (sj, sm, b1, wmat, w2, b2, wout).
_GP_GRADS = 7


def _gp_grads_present(act: int, two_layers: bool, compute_grad: bool) -> list[bool]:
    """Which of the penalty's gradients the kernel produces (the rule of
    :func:`~mdm_kernels.ops.gradient_penalty._launch`): none without ``compute_grad``;
    ∂sj, ∂sm, ∂b_1 and ∂b_2 only for curved activations (σ'' ≠ 0: tanh, softplus, gelu —
    identically zero for relu / leaky_relu); ∂W_2 and ∂b_2 only with two hidden layers."""
    if not compute_grad:
        return [False] * _GP_GRADS
    curved = act >= 2
    return [curved, curved, curved, True, two_layers, two_layers and curved, True]


@_op("mdm_kernels::triton_gradient_penalty")
def gradient_penalty_op(sj: Tensor, sm: Tensor, b1: Tensor, wmat: Tensor, w2: Optional[Tensor],
                        b2: Optional[Tensor], wout: Tensor, eps: Tensor, mi: Optional[Tensor],
                        jb: int, gram: bool, one_sided: bool, act: int, atomic: bool,
                        compute_grad: bool) -> tuple[Tensor, list[Tensor]]:
    """(GP, its gradients) in one pass (:mod:`~mdm_kernels.ops.gradient_penalty`): sj (JB ×
    H_1) and sm (R × H_1) joint / marginal first pre-activations, b_1, wmat (the Gram matrix
    W_1W_1ᵀ when ``gram``, else W_1), w2 / b2 (second hidden layer or ``None``), w_out, ε
    (N,), mi (M × N int32 row indices into sm, or ``None``).  The gradients w.r.t. (sj, sm,
    b1, wmat, w2, b2, wout), empty (0,) where :func:`_gp_grads_present` says the kernel
    makes none.  The parameter gradients are slices of one reduction of the programs'
    partials, copied out (a few parameter-sized copies: outputs may not alias)."""
    gp, grads = gp_launch(sj, sm, mi, eps, b1, wmat, w2, b2, wout, jb, gram, one_sided, act,
                          compute_grad, atomic)
    grads = grads if grads is not None else [None] * _GP_GRADS
    out = [sj.new_empty(0) if g is None else (g if k < 2 else g.clone())
           for k, g in enumerate(grads)]
    return gp.clone(), out


@gradient_penalty_op.register_fake
def _gp_fake(sj, sm, b1, wmat, w2, b2, wout, eps, mi, jb, gram, one_sided, act, atomic,
             compute_grad):
    present = _gp_grads_present(act, w2 is not None, compute_grad)
    like = [sj, sm, b1, wmat, w2, b2, wout]
    return (sj.new_empty((), dtype=torch.float32),
            [torch.empty_like(t, dtype=torch.float32) if p else sj.new_empty(0)
             for t, p in zip(like, present)])


def _gp_setup_context(ctx, inputs, output):
    sj, sm, b1, wmat, w2, b2, wout, eps, mi, jb, gram, one_sided, act, atomic, compute = inputs
    ctx.present = _gp_grads_present(act, w2 is not None, compute)
    ctx.compute_grad = compute
    grads = output[1]
    ctx.save_for_backward(*[g for g, p in zip(grads, ctx.present) if p])
    ctx.mark_non_differentiable(*grads)


def _gp_backward(ctx, g_gp, _g_grads):
    if not ctx.compute_grad:
        raise RuntimeError("mdm_kernels::triton_gradient_penalty ran with compute_grad=False: "
                           "no gradient to take (call it with compute_grad=True)")
    # one multi-tensor op scales every saved gradient; identically zero ones stay None
    scaled = iter(torch._foreach_mul(list(ctx.saved_tensors), g_gp.to(torch.float32)))
    grads = [next(scaled) if p else None for p in ctx.present]
    return (*grads, *[None] * 8)


_register_autograd(gradient_penalty_op, _gp_backward, _gp_setup_context)


def _penalty(critic, sj, sm, mi, eps, jb, one_sided, atomic, w1=None):
    """Run the penalty op on first pre-activations ``sj``/``sm``; its gradients are
    computed in the forward pass only when autograd will ask for them."""
    b1, wmat, gram, w2, b2, wout = _critic_weights(critic, w1)
    eps = eps.detach().to(device=sj.device, dtype=torch.float32).contiguous()
    inputs = (sj, sm, b1, wmat, w2, b2, wout)
    compute_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in inputs)
    gp, _ = _call(gradient_penalty_op, sj.contiguous(), sm.contiguous(), b1, wmat, w2, b2,
                  wout, eps, mi, jb, gram, bool(one_sided), activation_code(critic), atomic,
                  compute_grad)
    return gp


def fused_gradient_penalty(critic, joint, marginal, eps, one_sided) -> Tensor:
    """WGAN-GP of an ``MLPCritic`` at x̂ = ε·joint + (1 − ε)·marginal (validated per-modality
    tensors N × d_k, ε of shape (N,)); 0-dim float32, differentiable w.r.t. the critic's
    parameters and every joint/marginal tensor (:mod:`~mdm_kernels.ops.gradient_penalty`)."""
    # Σ_k x_k W_{1,k}ᵀ = [x_1 … x_m] W_1ᵀ: the joint and the marginal rows' first
    # pre-activations (bias excluded) from one GEMM on the concatenated inputs
    n = joint[0].shape[0]
    w1 = _first_weight(critic)
    rows = torch.cat([torch.cat(list(joint), dim=1), torch.cat(list(marginal), dim=1)])
    sj, sm = (rows.float() @ w1.t()).chunk(2)   # split: one concatenation in the backward
    return _penalty(critic, sj, sm, None, eps, n, one_sided, atomic=False, w1=w1)


def fused_penalty_from_projections(critic, stacked, gp_perms, eps, one_sided):
    """The GP of ``wasserstein_loss`` from the estimator's projections ``stacked``
    (m × B × H_1, differentiable): GP row n = k·B + i interpolates joint row i
    (pre-activation Σ_j P_j[i]) with marginal sample (k, i) (Σ_j P_j[gp_perms[k, j, i]]),
    ε = eps[n]; so the penalty needs no projection GEMM of its own."""
    m, b = stacked.shape[0], stacked.shape[1]
    kp = gp_perms.shape[0]
    sj = stacked.sum(0)                                        # joint rows Σ_j P_j[i]
    sm = stacked.reshape(m * b, -1)                            # row j·B + r = P_j[r]
    offsets = torch.arange(m, device=gp_perms.device).unsqueeze(1) * b
    mi = (gp_perms.permute(1, 0, 2).reshape(m, kp * b) + offsets).to(torch.int32).contiguous()
    return _penalty(critic, sj, sm, mi, eps, b, one_sided, atomic=True)


__all__ = ["fused_gradient_penalty", "fused_penalty_from_projections", "gathered_tile_terms",
           "gradient_penalty_op", "outer_bwd", "outer_fwd", "outer_grid_terms", "single_bwd",
           "single_fwd", "single_program_dependency_terms", "tiles_bwd", "tiles_fwd"]

"""The router of the fused Triton estimators: which kernel family runs a call.

Plan once (:func:`_route`), then launch: the one-program step
(:mod:`~mdm_kernels.ops.single_program`) for paper-scale steps, the outer sums
(:mod:`~mdm_kernels.ops.outer_sums`) for ``"all"`` over two or three factors with one
hidden layer, the gathered tiles (:mod:`~mdm_kernels.ops.gathered_tiles`) otherwise; and the
Wasserstein loss's terms, whose gradient penalty (:mod:`~mdm_kernels.ops.gradient_penalty`)
shares the estimator's projections (:func:`fused_gradient_penalty` alone is re-exported
from :mod:`~mdm_kernels.ops.triton_ops`).  Every family runs as ``torch.library`` custom ops
(:mod:`~mdm_kernels.ops.triton_ops`), so ``torch.compile`` traces these entries without a
graph break.  Above this module sits only the backend object
(:mod:`~mdm_kernels.ops.triton_backend`).
"""
from __future__ import annotations

import torch

from ..reference.estimators import KINDS
from .sample_tiles import IDX_GRID, marginal_plan
from . import single_program
from .single_program import MAX_HIDDEN, MAX_MODALITIES, single_program_work
from .triton_helpers import (activation_code, check_same_device, critic_tail,
                             project_modalities)
from .triton_ops import (fused_gradient_penalty, fused_penalty_from_projections,
                         gathered_tile_terms, outer_grid_terms, single_program_dependency_terms)

def resolve_perms(samples, batch_size, device):
    """``samples``: a MarginalSamples, a (K, m, B) index tensor, or None/"all"/"distinct"
    (the grids: no index tensor, see :func:`is_distinct`)."""
    if samples is None or (isinstance(samples, str) and samples in ("all", "distinct")):
        return None
    perms = getattr(samples, "perms", samples) if not isinstance(samples, torch.Tensor) \
        else samples
    if perms is None:
        return None
    if not isinstance(perms, torch.Tensor) or perms.dim() != 3 or perms.shape[2] != batch_size:
        raise ValueError("samples must be MarginalSamples, a (K, m, B) LongTensor or 'all'")
    return perms.to(device=device, dtype=torch.int64).contiguous()


def check_input_devices(critic, zs, projections=None):
    """``ValueError`` naming the first input (``zs[k]``, ``critic.<parameter>``,
    ``projections[k]``) on another device than ``zs[0]``: a kernel launch reads every
    operand on one device (each launch runs under that device,
    :func:`~mdm_kernels.ops.launch_context.launch_device`)."""
    named = {f"zs[{k}]": z for k, z in enumerate(zs)}
    named.update((f"critic.{name}", p) for name, p in critic.named_parameters())
    named.update((f"projections[{k}]", p) for k, p in enumerate(projections or ()))
    check_same_device(named)


def is_distinct(samples) -> bool:
    """Whether ``samples`` is the ``"distinct"`` grid (a ``MarginalSamples`` with
    ``distinct=True``, or the string ``"distinct"``): combinations of pairwise distinct
    indices, the coinciding ones masked inside the tiles."""
    if isinstance(samples, str):
        return samples == "distinct"
    return bool(getattr(samples, "distinct", False))


#: ``strategy`` values of :func:`fused_dependency_terms`.
STRATEGIES = ("auto", "single", "grid")


#: Widest hidden layer the one-program step takes with two hidden layers (fit table, verified
#: by tests/test_gpu_resources.py; Triton 3.9 at H = 512: 160 KB of shared memory and 80 kB
#: of register spills per thread) — wider two-layer critics take the gathered tiles.
SINGLE_PROGRAM_MAX_HIDDEN_TWO_LAYERS = 128


def single_program_reason(critic, zs) -> str | None:
    """Why the one-program step (:mod:`~mdm_kernels.ops.single_program`) cannot run
    these inputs, or ``None``."""
    if len(zs) > MAX_MODALITIES:
        return f"it takes at most {MAX_MODALITIES} modalities, got {len(zs)}"
    if max(critic.hidden) > MAX_HIDDEN:
        return (f"it holds a whole hidden layer per tile: at most {MAX_HIDDEN} units, "
                f"the critic has {max(critic.hidden)}")
    if len(critic.hidden) == 2 and max(critic.hidden) > SINGLE_PROGRAM_MAX_HIDDEN_TWO_LAYERS:
        return (f"with two hidden layers it takes at most "
                f"{SINGLE_PROGRAM_MAX_HIDDEN_TWO_LAYERS} units per layer (GPU resources), "
                f"the critic has {max(critic.hidden)}")
    if any(p.dtype != torch.float32 for p in critic.parameters()):
        return "it takes a float32 critic"
    return None


def _route(kind, critic, zs, perms, strategy, projections, distinct=False):
    """(kernel family, marginal plan) for resolved ``perms``: see :func:`execution_path`."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    B, m = zs[0].shape[0], len(zs)
    plan = marginal_plan(kind, B, m, perms, distinct)
    if strategy == "single" and projections is not None:
        raise ValueError("strategy='single' computes its own projections: "
                         "do not pass projections=")
    if strategy != "grid" and projections is None:
        reason = single_program_reason(critic, zs)
        if strategy == "single":
            if reason is not None:
                raise ValueError(f"strategy='single' cannot run this step: {reason}")
            return "single", plan
        if reason is None:
            work = single_program_work(B, [z.shape[1] for z in zs], critic.hidden, plan.N,
                                       plan.NF if plan.idx == IDX_GRID else 1)
            if work <= single_program.SINGLE_PROGRAM_MAX_WORK:  # read at call time
                return "single", plan
    # the outer-sum kernels: "all" over two or three factors, one hidden layer
    outer = plan.idx == IDX_GRID and plan.NF in (2, 3) and len(critic.hidden) == 1
    return ("outer" if outer else "grid"), plan


def execution_path(kind, critic, zs, samples, strategy="auto", projections=None) -> str:
    """The kernel family :func:`fused_dependency_terms` runs for these inputs: ``"single"``
    (:mod:`~mdm_kernels.ops.single_program`), ``"outer"``
    (:mod:`~mdm_kernels.ops.outer_sums`, ``"all"`` with m ≤ 3) or ``"grid"`` (:mod:`~mdm_kernels.ops.gathered_tiles`).  Raises ``ValueError`` when ``strategy="single"`` cannot run them."""
    perms = resolve_perms(samples, zs[0].shape[0], zs[0].device)
    return _route(kind, critic, zs, perms, strategy, projections, is_distinct(samples))[0]


def fused_dependency_terms(kind, critic, zs, samples, projections=None, strategy="auto"):
    """(joint_term, marginal_term) of estimator ``kind`` with the fused Triton kernels.

    Args:
        kind: ``dv``, ``nwj``, ``js``, ``infonce`` or ``wasserstein``.
        critic: ``MLPCritic`` with 1 or 2 hidden layers.
        zs: z_1, ..., z_m (B × d_k each, float32/float16/bfloat16).
        samples: :class:`~mdm_kernels.negatives.MarginalSamples`, an explicit (K, m, B) index
            tensor, or ``None``/``"all"`` for every combination (never materialised).
        projections: optional precomputed P_k = z_k W_{1,k}^T (from
            :func:`~mdm_kernels.ops.triton_helpers.project_modalities`), to share them with other ops.
        strategy: ``"single"`` — the whole step (projections, both terms and their
            gradients) in one program, backward one launch
            (:mod:`~mdm_kernels.ops.single_program`); ``"grid"`` — the persistent
            multi-program kernels, for large steps: the gathered tiles, or the
            outer-sum tiles of :mod:`~mdm_kernels.ops.outer_sums` for ``"all"`` with
            m ≤ 3 and one hidden layer (:func:`execution_path` says which); ``"auto"``
            (default) —
            ``"single"`` when it applies (no ``projections``, m ≤ 4, float32 critic) and the
            step is small enough for one SM, else ``"grid"``.

    Returns: two 0-dim float32 tensors, differentiable w.r.t. every z and critic parameter.
    Traceable by ``torch.compile`` (``fullgraph=True``): the kernels are ``torch.library``
    custom ops (:mod:`~mdm_kernels.ops.triton_ops`); the routing is shape logic only.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if len(critic.hidden) > 2:
        raise ValueError("fused kernels support 1 or 2 hidden layers")
    check_input_devices(critic, zs, projections)
    perms = resolve_perms(samples, zs[0].shape[0], zs[0].device)
    path, plan = _route(kind, critic, zs, perms, strategy, projections, is_distinct(samples))
    if path == "single":
        return single_program_dependency_terms(kind, critic, zs, perms, distinct=plan.distinct)
    if projections is None:
        projections = project_modalities(critic, zs)
    P = torch.stack([p.float() for p in projections]).contiguous()
    if path == "outer":
        _, _, wout, bout = critic_tail(critic)
        b1 = critic.first_bias.float().contiguous()
        return outer_grid_terms(kind, critic, P, b1, wout, bout, activation_code(critic),
                                plan.NF, distinct=plan.distinct)
    return gathered_tile_terms(kind, critic, P, perms, distinct=plan.distinct)


def fused_wasserstein_terms(critic, zs, samples, gp_perms, eps, one_sided):
    """(joint_term, marginal_term, gp) of ``wasserstein_loss``, one projection per modality
    shared by the dependency estimator and the penalty: torch GEMMs on the multi-program
    path, the in-kernel projections of the one-program path for small steps (see
    :func:`~mdm_kernels.ops.triton_ops.fused_penalty_from_projections`).  Traceable by
    ``torch.compile`` like every fused op (custom ops, no graph break)."""
    check_input_devices(critic, zs)
    perms = resolve_perms(samples, zs[0].shape[0], zs[0].device)
    if execution_path("wasserstein", critic, zs, samples) == "single":
        # small step: the one-program estimator, whose in-kernel projections (returned,
        # differentiable) feed the penalty too — no projection GEMMs at all
        joint, marginal, stacked = single_program_dependency_terms(
            "wasserstein", critic, zs, perms, return_projections=True,
            distinct=is_distinct(samples))
    else:
        projections = project_modalities(critic, zs)
        joint, marginal = fused_dependency_terms("wasserstein", critic, zs, samples,
                                                 projections=projections)
        stacked = torch.stack(projections)                     # (m, B, H1)
    gp = fused_penalty_from_projections(critic, stacked, gp_perms, eps, one_sided)
    return joint, marginal, gp


__all__ = ["STRATEGIES", "check_input_devices", "execution_path", "fused_dependency_terms", "fused_gradient_penalty",
           "fused_wasserstein_terms", "resolve_perms", "single_program_reason"]

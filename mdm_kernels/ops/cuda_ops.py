"""Python side of the CUDA C++ backend: ``torch.library`` custom ops around the raw-pointer
kernels of :mod:`mdm_kernels._cuda` (built from ``csrc/`` by ``setup.py``), their autograd
formulas, and the functional entry points used by :mod:`mdm_kernels.ops.cuda_backend`.

Every buffer is allocated here with torch (so the caching allocator and stream semantics
apply) and handed to the kernels as ``tensor.data_ptr()`` together with the current stream
handle ``torch.cuda.current_stream().cuda_stream``.  The ops are registered with
``torch.library.custom_op`` + ``register_fake`` + ``register_autograd`` so ``torch.compile``
traces through them as opaque nodes with known output shapes.

Ops (namespace ``mdm_kernels``):

* ``cuda_bounds_fwd(P, b1, w, b_out, perms, kind, act) -> (terms (2,), stats (B + 1,))``:
  fused scoring of the joint and marginal samples of a one-hidden-layer ``MLPCritic`` from the
  per-modality projections P_k = z_k W_{1,k}ᵀ and the estimator reductions; ``terms`` =
  (joint_term, marginal_term), ``stats`` = the log-sum-exp statistics the backward reuses.
* ``cuda_bounds_bwd(...) -> (dP (m, B, H), db1, dw, db_out)``: backward by recomputation.
* ``cuda_gp_hidden(Q, b1, w, act) -> U`` and ``cuda_gp_hidden_bwd``: the hidden-unit part
  U = w ⊙ σ'(Q + b1) of the critic's input gradient and its analytic backward (the gradient
  penalty then needs no double backward).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..reference.gradient_penalty import penalty_from_norm, safe_norm

try:
    from .. import _cuda  # built by setup.py from csrc/
    IMPORT_ERROR: Optional[BaseException] = None
except ImportError as exc:  # not built (no nvcc at install time, or MDM_BUILD_CUDA=0)
    _cuda = None
    IMPORT_ERROR = exc

#: Estimator codes of the kernels (order of mdm_kernels.reference.estimators.KINDS).
KIND_CODES = {"dv": 0, "nwj": 1, "js": 2, "infonce": 3, "wasserstein": 4}
#: Activation codes of the kernels (same as mdm_kernels.ops.triton_helpers.ACTIVATION_CODES).
ACTIVATION_CODES = {"relu": 0, "leaky_relu": 1, "tanh": 2, "softplus": 3, "gelu": 4}
#: Storage dtypes of the projections the kernels are instantiated for.
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
#: Limits compiled into the kernels (mirrors csrc/mdm_cuda.h).
MAX_MODALITIES = 8
MAX_HIDDEN = 4096
WORKSPACE_FLOATS = 2 * 1024 * 5


def extension():
    """The compiled module, or raise ImportError saying how to build it."""
    if _cuda is None:
        raise ImportError(
            f"mdm_kernels._cuda is not built ({IMPORT_ERROR}); build it with a CUDA toolkit: "
            "`pip install --no-build-isolation -e .` (nvcc on PATH or CUDA_HOME set) or "
            "`python setup.py build_ext --inplace` — see docs/cuda_backend.md")
    return _cuda


def _launch_ctx(t: torch.Tensor) -> tuple[int, int]:
    """(device index, stream handle) for a kernel launch on t's device."""
    if t.device.type == "cuda":
        index = t.device.index if t.device.index is not None else torch.cuda.current_device()
        return index, torch.cuda.current_stream(t.device).cuda_stream
    return 0, 0  # only reachable with a stand-in extension (CPU tests of the glue)


def _ptrs(tensors: Sequence[torch.Tensor]) -> list[int]:
    return [int(t.data_ptr()) for t in tensors]


def _check_bounds_inputs(P, b1, w, b_out, perms):
    if not 2 <= len(P) <= MAX_MODALITIES:
        raise ValueError(f"need 2..{MAX_MODALITIES} projections, got {len(P)}")
    b, h = P[0].shape
    for k, p in enumerate(P):
        if p.shape != (b, h) or p.dtype != P[0].dtype or p.device != P[0].device \
                or not p.is_contiguous():
            raise ValueError(f"P[{k}] must be a contiguous ({b}, {h}) {P[0].dtype} tensor on "
                             f"{P[0].device}, got {tuple(p.shape)} {p.dtype} {p.device}")
    if P[0].dtype not in DTYPE_CODES:
        raise TypeError(f"projections must be float32/float16/bfloat16, got {P[0].dtype}")
    for name, t, n in (("b1", b1, h), ("w", w, h), ("b_out", b_out, 1)):
        if t.dtype != torch.float32 or t.shape != (n,) or not t.is_contiguous() \
                or t.device != P[0].device:
            raise ValueError(f"{name} must be a contiguous float32 ({n},) tensor on "
                             f"{P[0].device}, got {tuple(t.shape)} {t.dtype} {t.device}")
    if perms is not None and (perms.dtype != torch.int64 or perms.dim() != 3
                              or perms.shape[1] != len(P) or perms.shape[2] != b
                              or not perms.is_contiguous() or perms.device != P[0].device):
        raise ValueError(f"perms must be a contiguous int64 (K, {len(P)}, {b}) tensor")


# ------------------------------------------------------------------ fused critic bounds
@torch.library.custom_op("mdm_kernels::cuda_bounds_fwd", mutates_args=())
def bounds_fwd(P: list[torch.Tensor], b1: torch.Tensor, w: torch.Tensor, b_out: torch.Tensor,
               perms: Optional[torch.Tensor], kind: int, act: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
    ext = extension()
    _check_bounds_inputs(P, b1, w, b_out, perms)
    b, h = P[0].shape
    dev = P[0].device
    terms = torch.empty(2, dtype=torch.float32, device=dev)
    stats = torch.empty(b + 1, dtype=torch.float32, device=dev)
    workspace = torch.empty(WORKSPACE_FLOATS, dtype=torch.float32, device=dev)
    index, stream = _launch_ctx(P[0])
    ext.bounds_forward(_ptrs(P), b, h, DTYPE_CODES[P[0].dtype], b1.data_ptr(), w.data_ptr(),
                       b_out.data_ptr(), act, kind, perms is None,
                       0 if perms is None else perms.data_ptr(),
                       0 if perms is None else perms.shape[0],
                       terms.data_ptr(), stats.data_ptr(), workspace.data_ptr(), index, stream)
    return terms, stats


@bounds_fwd.register_fake
def _bounds_fwd_fake(P, b1, w, b_out, perms, kind, act):
    b = P[0].shape[0]
    return (P[0].new_empty((2,), dtype=torch.float32),
            P[0].new_empty((b + 1,), dtype=torch.float32))


@torch.library.custom_op("mdm_kernels::cuda_bounds_bwd", mutates_args=())
def bounds_bwd(P: list[torch.Tensor], b1: torch.Tensor, w: torch.Tensor, b_out: torch.Tensor,
               perms: Optional[torch.Tensor], kind: int, act: int, grad_terms: torch.Tensor,
               terms: torch.Tensor, stats: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    ext = extension()
    _check_bounds_inputs(P, b1, w, b_out, perms)
    b, h = P[0].shape
    dev = P[0].device
    dP = torch.zeros(len(P), b, h, dtype=torch.float32, device=dev)
    db1 = torch.zeros(h, dtype=torch.float32, device=dev)
    dw = torch.zeros(h, dtype=torch.float32, device=dev)
    db_out = torch.zeros(1, dtype=torch.float32, device=dev)
    grad_terms = grad_terms.to(torch.float32).contiguous()
    index, stream = _launch_ctx(P[0])
    ext.bounds_backward(_ptrs(P), b, h, DTYPE_CODES[P[0].dtype], b1.data_ptr(), w.data_ptr(),
                        b_out.data_ptr(), act, kind, perms is None,
                        0 if perms is None else perms.data_ptr(),
                        0 if perms is None else perms.shape[0],
                        grad_terms.data_ptr(), terms.data_ptr(), stats.data_ptr(),
                        _ptrs(dP.unbind(0)), db1.data_ptr(), dw.data_ptr(), db_out.data_ptr(),
                        index, stream)
    return dP, db1, dw, db_out


@bounds_bwd.register_fake
def _bounds_bwd_fake(P, b1, w, b_out, perms, kind, act, grad_terms, terms, stats):
    b, h = P[0].shape
    f32 = torch.float32
    return (P[0].new_empty((len(P), b, h), dtype=f32), P[0].new_empty((h,), dtype=f32),
            P[0].new_empty((h,), dtype=f32), P[0].new_empty((1,), dtype=f32))


def _bounds_setup_context(ctx, inputs, output):
    P, b1, w, b_out, perms, kind, act = inputs
    terms, stats = output
    ctx.num_modalities = len(P)
    ctx.has_perms = perms is not None
    ctx.kind, ctx.act = kind, act
    saved = list(P) + [b1, w, b_out, terms, stats] + ([perms] if perms is not None else [])
    ctx.save_for_backward(*saved)
    ctx.mark_non_differentiable(stats)


def _bounds_backward(ctx, grad_terms, grad_stats):
    saved = ctx.saved_tensors
    m = ctx.num_modalities
    P = list(saved[:m])
    b1, w, b_out, terms, stats = saved[m:m + 5]
    perms = saved[m + 5] if ctx.has_perms else None
    if grad_terms is None:
        grad_terms = torch.zeros_like(terms)
    dP, db1, dw, db_out = bounds_bwd(P, b1, w, b_out, perms, ctx.kind, ctx.act, grad_terms,
                                     terms, stats)
    return ([dP[k].to(P[k].dtype) for k in range(m)], db1, dw, db_out, None, None, None)


torch.library.register_autograd("mdm_kernels::cuda_bounds_fwd", _bounds_backward,
                                setup_context=_bounds_setup_context)


# ------------------------------------------------------------------ gradient penalty part
@torch.library.custom_op("mdm_kernels::cuda_gp_hidden", mutates_args=())
def gp_hidden(Q: torch.Tensor, b1: torch.Tensor, w: torch.Tensor, act: int) -> torch.Tensor:
    ext = extension()
    n, h = Q.shape
    U = torch.empty_like(Q)
    index, stream = _launch_ctx(Q)
    ext.gp_hidden_forward(Q.data_ptr(), n, h, b1.data_ptr(), w.data_ptr(), act, U.data_ptr(),
                          index, stream)
    return U


@gp_hidden.register_fake
def _gp_hidden_fake(Q, b1, w, act):
    return torch.empty_like(Q)


@torch.library.custom_op("mdm_kernels::cuda_gp_hidden_bwd", mutates_args=())
def gp_hidden_bwd(Q: torch.Tensor, b1: torch.Tensor, w: torch.Tensor, act: int,
                  dU: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ext = extension()
    n, h = Q.shape
    dU = dU.to(torch.float32).contiguous()
    dQ = torch.empty_like(Q)
    dw = torch.zeros(h, dtype=torch.float32, device=Q.device)
    db1 = torch.zeros(h, dtype=torch.float32, device=Q.device)
    index, stream = _launch_ctx(Q)
    ext.gp_hidden_backward(Q.data_ptr(), n, h, b1.data_ptr(), w.data_ptr(), act, dU.data_ptr(),
                           dQ.data_ptr(), dw.data_ptr(), db1.data_ptr(), index, stream)
    return dQ, dw, db1


@gp_hidden_bwd.register_fake
def _gp_hidden_bwd_fake(Q, b1, w, act, dU):
    h = Q.shape[1]
    return (torch.empty_like(Q), Q.new_empty((h,)), Q.new_empty((h,)))


def _gp_setup_context(ctx, inputs, output):
    Q, b1, w, act = inputs
    ctx.act = act
    ctx.save_for_backward(Q, b1, w)


def _gp_backward(ctx, dU):
    Q, b1, w = ctx.saved_tensors
    dQ, dw, db1 = gp_hidden_bwd(Q, b1, w, ctx.act, dU)
    return dQ, db1, dw, None


torch.library.register_autograd("mdm_kernels::cuda_gp_hidden", _gp_backward,
                                setup_context=_gp_setup_context)


# ------------------------------------------------------------------ functional entry points
def critic_params(critic):
    """(b1, w_out, b_out) as contiguous float32 (differentiable views of the parameters)."""
    return (critic.first_bias.float().contiguous(),
            critic.out.weight.float().reshape(-1).contiguous(),
            critic.out.bias.float().reshape(1).contiguous())


def projections(critic, zs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """P_k = z_k W_{1,k}ᵀ, a float32-accumulated GEMM per modality, stored in the z dtype for
    float16/bfloat16 inputs (the kernels' storage type) and float32 otherwise."""
    storage = zs[0].dtype if zs[0].dtype in (torch.float16, torch.bfloat16) else torch.float32
    return [(z.float() @ w.float().t()).to(storage).contiguous()
            for z, w in zip(zs, critic.first_weights)]


def fused_dependency_terms(kind: str, critic, zs: Sequence[torch.Tensor], samples):
    """(joint_term, marginal_term) of estimator ``kind`` on the CUDA kernels (0-dim float32,
    differentiable w.r.t. the critic's parameters and every z)."""
    P = projections(critic, zs)
    b1, w, b_out = critic_params(critic)
    perms = None if samples.is_all else samples.perms.to(torch.int64).contiguous()
    terms, _ = bounds_fwd(P, b1, w, b_out, perms, KIND_CODES[kind],
                          ACTIVATION_CODES[critic.activation])
    return terms[0], terms[1]


def fused_gradient_penalty(critic, joint, marginal, eps: torch.Tensor, one_sided: bool):
    """WGAN-GP of a one-hidden-layer MLPCritic: x̂ = ε·joint + (1 − ε)·marginal, first layer
    by GEMM, U = w ⊙ σ'(x̂ W1ᵀ + b1) by the CUDA op, input gradient g = U W1 by GEMM, then
    mean (‖g‖ − 1)²; first-order autograd only (the op's backward is analytic)."""
    e = eps.to(torch.float32).unsqueeze(1)
    ws = [w.float() for w in critic.first_weights]
    xs = [e * a.float() + (1.0 - e) * b.float() for a, b in zip(joint, marginal)]
    Q = sum(x @ w.t() for x, w in zip(xs, ws)).contiguous()
    b1, w_out, _ = critic_params(critic)
    U = gp_hidden(Q, b1, w_out, ACTIVATION_CODES[critic.activation])
    sq = sum(((U @ w) ** 2).sum(dim=1) for w in ws)
    return penalty_from_norm(safe_norm(sq), one_sided)

"""The Triton backend object behind ``backend="triton"``.

Top of the ``ops`` layering (nothing in ``ops`` imports it)::

    runtime_flags               environment switches (no Triton import)
    triton_helpers              activations, projections, tile/autotune helpers
    marginal_terms              estimator terms as score reductions, their gradients
    sample_tiles                sample rows, tile scores and backprop (jit building blocks)
    gathered_tiles | outer_sums | single_program | gradient_penalty   kernel families
    router                      picks a family per call (plan once, then launch)
    triton_backend              this object: says when the fused ops apply

Each kernel family is one op in the Liger-Kernel layout (kernels with their math, then the
``autograd.Function``, then the functional entry).  This module only says when they apply
and imports the router lazily (importing :mod:`mdm_kernels` never imports Triton).  On CPU tensors the kernels run under Triton's interpreter
(``TRITON_INTERPRET=1``, set before ``mdm_kernels`` is imported) — that is how CI tests them.
"""
from __future__ import annotations

import torch

from ..dispatch import Backend
from .runtime_flags import interpreter_enabled

try:  # triton is a Linux-only dependency
    import triton  # noqa: F401
    _IMPORT_ERROR = None
except ImportError as exc:  # pragma: no cover - depends on the platform
    _IMPORT_ERROR = exc

#: Hidden-layer counts the fused kernels implement.
MAX_HIDDEN_LAYERS = 2


class TritonBackend(Backend):
    name = "triton"
    supports_distinct_negatives = True  # masked inside the tiles of every kernel family

    def unavailable_reason(self, device: torch.device) -> str | None:
        if _IMPORT_ERROR is not None:
            return (f"triton is not installed ({_IMPORT_ERROR}); install it with "
                    f"`pip install 'mdm-kernels[triton]'` (CUDA builds of torch bring it)")
        if device.type == "cuda":
            return None
        if device.type == "cpu" and interpreter_enabled():
            return None
        return (f"Triton kernels need CUDA tensors (got {device}); set TRITON_INTERPRET=1 "
                f"before importing mdm_kernels to run them in the CPU interpreter")

    def unsupported_reason(self, op, critic, zs, samples=None) -> str | None:
        reason = self.fused_critic_reason(critic, zs, MAX_HIDDEN_LAYERS)
        if reason is None and _IMPORT_ERROR is None:
            reason = resource_fit_reason(op, critic, samples)
        return reason

    def dependency_terms(self, kind, critic, zs, samples):
        from .router import fused_dependency_terms
        return fused_dependency_terms(kind, critic, zs, samples)

    def gradient_penalty(self, critic, joint, marginal, eps, one_sided):
        from .router import fused_gradient_penalty
        return fused_gradient_penalty(critic, joint, marginal, eps, one_sided)

    def wasserstein_terms(self, critic, zs, samples, gp_perms, eps, one_sided):
        from .router import fused_wasserstein_terms
        return fused_wasserstein_terms(critic, zs, samples, gp_perms, eps, one_sided)


def _is_outer_grid(op, critic, samples) -> bool:
    """Whether the router sends this estimator call to the outer sums (one hidden layer,
    the "all" grid of two or three factors; InfoNCE's grid has two), whose tiles do not
    depend on the hidden width."""
    if len(critic.hidden) != 1 or getattr(samples, "perms", None) is not None \
            or isinstance(samples, torch.Tensor):
        return False
    return op == "infonce" or len(critic.dims) in (2, 3)


def resource_fit_reason(op, critic, samples=None) -> str | None:
    """Why no fused kernel family can run ``op`` for this critic within a GPU's per-block
    resources, or ``None`` — the fit table (docs/triton_backend.md, "GPU resources"),
    verified for sm_80 and sm_90 by ``tests/test_gpu_resources.py``:

    * gradient penalty (``gradient_penalty``; ``wasserstein``, whose loss adds it): every
      hidden layer ≤ ``GP_MAX_HIDDEN``;
    * estimators: the gathered tiles take H_1 ≤ ``GATHERED_MAX_HIDDEN_ONE_LAYER`` (one
      hidden layer) / ``GATHERED_MAX_HIDDEN`` (two), the outer sums any width ("all" with
      one hidden layer), and the one-program step (≤ ``MAX_HIDDEN``, two layers ≤
      ``SINGLE_PROGRAM_MAX_HIDDEN_TWO_LAYERS``) only what the gathered tiles take too —
      so whichever family the router picks for the step's size, it fits.
    """
    from .gathered_tiles import gathered_fit_reason
    from .gradient_penalty import gp_fit_reason
    if op in ("gradient_penalty", "wasserstein"):
        reason = gp_fit_reason(critic.hidden)
        if reason is not None:
            return reason
    if op == "gradient_penalty" or _is_outer_grid(op, critic, samples):
        return None
    return gathered_fit_reason(critic.hidden)


BACKEND = TritonBackend()

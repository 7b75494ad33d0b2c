"""The Triton backend object behind ``backend="triton"``.

Fused ops live one per module (kernels, then ``autograd.Function``, then functional API):
:mod:`mdm_kernels.ops.critic_bounds` (critic scoring + estimator reductions) and
:mod:`mdm_kernels.ops.gradient_penalty` (closed-form gradient penalty).  This module only
says when they apply.  On CPU tensors the kernels run under Triton's interpreter
(``TRITON_INTERPRET=1``, set before ``mdm_kernels`` is imported) — that is how CI tests them.
"""
from __future__ import annotations

import os

import torch

from ..dispatch import Backend

try:  # triton is a Linux-only dependency
    import triton  # noqa: F401
    _IMPORT_ERROR = None
except ImportError as exc:  # pragma: no cover - depends on the platform
    _IMPORT_ERROR = exc

#: Hidden-layer counts the fused kernels implement.
MAX_HIDDEN_LAYERS = 2


def interpreter_enabled() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


class TritonBackend(Backend):
    name = "triton"

    def unavailable_reason(self, device: torch.device) -> str | None:
        if _IMPORT_ERROR is not None:
            return f"triton is not installed ({_IMPORT_ERROR})"
        if device.type == "cuda":
            return None
        if device.type == "cpu" and interpreter_enabled():
            return None
        return (f"Triton kernels need CUDA tensors (got {device}); set TRITON_INTERPRET=1 "
                f"before importing mdm_kernels to run them in the CPU interpreter")

    def unsupported_reason(self, op, critic, zs, samples=None) -> str | None:
        return self.fused_critic_reason(critic, zs, MAX_HIDDEN_LAYERS)

    def dependency_terms(self, kind, critic, zs, samples):
        from .critic_bounds import fused_dependency_terms
        return fused_dependency_terms(kind, critic, zs, samples)

    def gradient_penalty(self, critic, joint, marginal, eps, one_sided):
        from .gradient_penalty import fused_gradient_penalty
        return fused_gradient_penalty(critic, joint, marginal, eps, one_sided)

    def wasserstein_terms(self, critic, zs, samples, gp_perms, eps, one_sided):
        from .gradient_penalty import fused_wasserstein_terms
        return fused_wasserstein_terms(critic, zs, samples, gp_perms, eps, one_sided)


BACKEND = TritonBackend()

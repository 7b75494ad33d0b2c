"""The CUDA C++ backend object behind ``backend="cuda"``.

Kernels live in ``csrc/`` (built into :mod:`mdm_kernels._cuda` by ``setup.py`` when a CUDA
toolkit is present); :mod:`mdm_kernels.ops.cuda_ops` wraps them as ``torch.library`` ops.
This module only says when they apply: the extension must be built, the tensors on a CUDA
device, the critic an :class:`~mdm_kernels.critic.MLPCritic` with one hidden layer of width
≤ 4096 and at most 8 modalities, and the inputs float32/float16/bfloat16.  Without the
extension ``backend="cuda"`` raises a clear error and ``"auto"`` skips it.
"""
from __future__ import annotations

import torch

from ..dispatch import Backend
from . import cuda_ops

#: Hidden layers the CUDA kernels implement (one).
MAX_HIDDEN_LAYERS = 1


def is_built() -> bool:
    """True when the compiled extension mdm_kernels._cuda imports."""
    return cuda_ops._cuda is not None


class CudaBackend(Backend):
    name = "cuda"

    def unavailable_reason(self, device: torch.device) -> str | None:
        if not is_built():
            return (f"the CUDA extension mdm_kernels._cuda is not built "
                    f"({cuda_ops.IMPORT_ERROR}); install with a CUDA toolkit (nvcc on PATH or "
                    f"CUDA_HOME set): `pip install --no-build-isolation -e .` or "
                    f"`python setup.py build_ext --inplace` (docs/cuda_backend.md)")
        device = torch.device(device)
        if device.type != "cuda":
            return f"CUDA kernels need CUDA tensors (got {device})"
        return None

    def unsupported_reason(self, op, critic, zs, samples=None) -> str | None:
        reason = self.fused_critic_reason(critic, zs, MAX_HIDDEN_LAYERS)
        if reason is not None:
            return reason
        if critic.hidden[0] > cuda_ops.MAX_HIDDEN:
            return (f"CUDA kernels support hidden width <= {cuda_ops.MAX_HIDDEN}, got "
                    f"{critic.hidden[0]}")
        if critic.num_modalities > cuda_ops.MAX_MODALITIES:
            return (f"CUDA kernels support <= {cuda_ops.MAX_MODALITIES} modalities, got "
                    f"{critic.num_modalities}")
        return None

    def dependency_terms(self, kind, critic, zs, samples):
        return cuda_ops.fused_dependency_terms(kind, critic, zs, samples)

    def gradient_penalty(self, critic, joint, marginal, eps, one_sided):
        return cuda_ops.fused_gradient_penalty(critic, joint, marginal, eps, one_sided)


BACKEND = CudaBackend()

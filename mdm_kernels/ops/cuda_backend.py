"""The CUDA C++ backend object behind ``backend="cuda"`` (reading order: last — after
``csrc/`` (kernels, then ``bindings.cpp``) and :mod:`mdm_kernels.ops.cuda_ops`, which
registers the kernels as ``torch.library`` ops).

This module says when the kernels apply and feeds them: the extension must be built, the
tensors on a CUDA device, the critic an :class:`~mdm_kernels.critic.MLPCritic` with one hidden
layer of width ≤ 4096 and at most 8 modalities, the inputs float32/float16/bfloat16.  The
critic's first layer is split per modality — P_k = z_k W_{1,k}ᵀ by one torch GEMM each — and
the ops score samples from gathered rows of the P_k.  Without the extension
``backend="cuda"`` raises a clear error and ``"auto"`` skips it.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..dispatch import Backend
from ..reference.gradient_penalty import penalty_from_norm, safe_norm
from . import cuda_ops

#: Hidden layers the CUDA kernels implement (one).
MAX_HIDDEN_LAYERS = 1


def is_built() -> bool:
    """True when the compiled extension mdm_kernels._cuda imports."""
    return cuda_ops._cuda is not None


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


def negatives_code(samples) -> int:
    """The kernels' code for ``samples``' layout: explicit perms, the "all" grid, or its
    pairwise-distinct part (``MarginalSamples.distinct``)."""
    if samples.perms is not None:
        return cuda_ops.NEGATIVES_CODES["perms"]
    if getattr(samples, "distinct", False):
        return cuda_ops.NEGATIVES_CODES["distinct"]
    return cuda_ops.NEGATIVES_CODES["all"]


def fused_dependency_terms(kind: str, critic, zs: Sequence[torch.Tensor], samples):
    """(joint_term, marginal_term) of estimator ``kind`` on the CUDA kernels (0-dim float32,
    differentiable w.r.t. the critic's parameters and every z)."""
    P = projections(critic, zs)
    b1, w, b_out = critic_params(critic)
    perms = None if samples.perms is None else samples.perms.to(torch.int64).contiguous()
    act = cuda_ops.ACTIVATION_CODES[critic.activation]
    terms, _ = cuda_ops.bounds_fwd(P, b1, w, b_out, perms, cuda_ops.KIND_CODES[kind], act,
                                   negatives_code(samples))
    return terms[0], terms[1]


def fused_gradient_penalty(critic, joint, marginal, eps: torch.Tensor, one_sided: bool):
    """WGAN-GP of a one-hidden-layer MLPCritic (Gulrajani et al., NeurIPS 2017):
    x̂ = ε·joint + (1 − ε)·marginal, first layer by GEMM, U = w ⊙ σ'(x̂ W1ᵀ + b1) by the CUDA
    op, input gradient g = U W1 by GEMM, then mean (‖g‖ − 1)²; first-order autograd only (the
    op's backward is analytic)."""
    e = eps.to(torch.float32).unsqueeze(1)
    ws = [w.float() for w in critic.first_weights]
    xs = [e * a.float() + (1.0 - e) * b.float() for a, b in zip(joint, marginal)]
    Q = sum(x @ w.t() for x, w in zip(xs, ws)).contiguous()
    b1, w_out, _ = critic_params(critic)
    U = cuda_ops.gp_hidden(Q, b1, w_out, cuda_ops.ACTIVATION_CODES[critic.activation])
    sq = sum(((U @ w) ** 2).sum(dim=1) for w in ws)
    return penalty_from_norm(safe_norm(sq), one_sided)


class CudaBackend(Backend):
    name = "cuda"
    supports_distinct_negatives = True

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
        if zs[0].shape[0] > cuda_ops.MAX_BATCH:
            return (f"CUDA kernels support batches of <= {cuda_ops.MAX_BATCH} rows, got "
                    f"{zs[0].shape[0]}")
        return None

    def dependency_terms(self, kind, critic, zs, samples):
        return fused_dependency_terms(kind, critic, zs, samples)

    def gradient_penalty(self, critic, joint, marginal, eps, one_sided):
        return fused_gradient_penalty(critic, joint, marginal, eps, one_sided)


BACKEND = CudaBackend()

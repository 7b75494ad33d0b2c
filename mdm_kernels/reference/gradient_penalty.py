"""Reference WGAN-GP gradient penalty, by double backward (``autograd.grad(create_graph=True)``).

Gulrajani et al., "Improved Training of Wasserstein GANs", NeurIPS 2017; used for the
Wasserstein dependency measure (Ozair et al., NeurIPS 2019; Colombo et al., EMNLP 2021):

    x̂_k = ε·joint_k + (1 − ε)·marginal_k,   ε ~ U[0, 1] per row, shared by all modalities
    GP  = mean_rows (‖∇_x T(x̂)‖₂ − 1)²            (one-sided: max(0, ‖∇_x T(x̂)‖₂ − 1)²)

where the norm is over the concatenated input [x̂_1; ...; x̂_m].  A row whose input gradient
is exactly zero (e.g. a dead ReLU critic) has norm 0 and penalty 1; its norm's derivative is
taken as 0 there (not NaN from d√s/ds at s = 0).
"""
from __future__ import annotations

from typing import Sequence

import torch

from .._validation import check_zs, compute_dtype, require_values


def interpolation_weights(epsilon, num_rows: int, generator, device, dtype) -> torch.Tensor:
    """Validate a user ``epsilon`` of shape (N,) in [0, 1], or draw ε ~ U[0, 1] from
    ``generator``; returns it as ``dtype`` on ``device``."""
    if epsilon is None:
        gen_device = generator.device if generator is not None else torch.device("cpu")
        # no generator= argument without a generator: that overload of rand takes symbolic
        # sizes (torch.compile(dynamic=True)), the generator one does not
        gen = {} if generator is None else {"generator": generator}
        eps = torch.rand(num_rows, device=gen_device, dtype=torch.float64, **gen)
        return eps.to(device=device, dtype=dtype)
    if not isinstance(epsilon, torch.Tensor) or not epsilon.is_floating_point():
        raise TypeError("epsilon must be a floating tensor of shape (N,)")
    if epsilon.shape != (num_rows,):
        raise ValueError(f"epsilon must have shape ({num_rows},), got {tuple(epsilon.shape)}")
    if epsilon.device != torch.device(device):
        raise ValueError(f"epsilon is on {epsilon.device} but the samples are on {device}")
    if num_rows:
        require_values(((epsilon >= 0.0) & (epsilon <= 1.0)).all(), "epsilon must lie in [0, 1]")
    return epsilon.to(dtype)


def check_pairs(critic, joint: Sequence[torch.Tensor], marginal: Sequence[torch.Tensor]):
    """Validate ``joint`` and ``marginal`` (sequences of per-modality tensors, equal shapes)."""
    if isinstance(joint, torch.Tensor) or isinstance(marginal, torch.Tensor):
        raise TypeError("joint and marginal must be sequences of per-modality tensors "
                        "(z_1, ..., z_m), not single tensors")
    joint = check_zs(critic, joint, name="joint")
    marginal = check_zs(critic, marginal, name="marginal")
    if len(joint) != len(marginal):
        raise ValueError(f"joint has {len(joint)} modalities but marginal has {len(marginal)}")
    for k, (a, b) in enumerate(zip(joint, marginal)):
        if a.shape != b.shape or a.dtype != b.dtype or a.device != b.device:
            raise ValueError(f"joint[{k}] {tuple(a.shape)} {a.dtype} {a.device} and marginal[{k}] "
                             f"{tuple(b.shape)} {b.dtype} {b.device} must match")
    return joint, marginal


def safe_norm(sq_sum: torch.Tensor) -> torch.Tensor:
    """√s with derivative 0 (instead of ∞/NaN) where s = 0."""
    positive = sq_sum > 0
    return torch.where(positive, torch.sqrt(torch.where(positive, sq_sum, torch.ones_like(sq_sum))),
                       torch.zeros_like(sq_sum))


def penalty_from_norm(norm: torch.Tensor, one_sided: bool) -> torch.Tensor:
    """mean (‖g‖ − 1)², or mean max(0, ‖g‖ − 1)² when ``one_sided``."""
    gap = norm - 1.0
    if one_sided:
        gap = torch.clamp(gap, min=0.0)
    return (gap * gap).mean()


def gradient_penalty_terms(critic, joint, marginal, eps: torch.Tensor,
                           one_sided: bool) -> torch.Tensor:
    """GP for validated inputs and an explicit ε (the oracle the fused kernels match)."""
    dtype = compute_dtype(critic, joint)
    w = eps.to(dtype).unsqueeze(1)
    with torch.enable_grad():
        xhat = []
        for a, b in zip(joint, marginal):
            x = w * a.to(dtype) + (1.0 - w) * b.to(dtype)
            if not x.requires_grad:
                x = x.detach().requires_grad_(True)
            xhat.append(x)
        scores = critic(*xhat)
        grads = torch.autograd.grad(scores.sum(), xhat, create_graph=True)
        sq_sum = sum((g * g).sum(dim=1) for g in grads)
        return penalty_from_norm(safe_norm(sq_sum), one_sided)


def gradient_penalty(critic, joint: Sequence[torch.Tensor], marginal: Sequence[torch.Tensor],
                     epsilon: torch.Tensor | None = None, generator=None,
                     one_sided: bool = False) -> torch.Tensor:
    """Reference WGAN-GP penalty (module docstring), differentiable w.r.t. the critic's
    parameters and every joint/marginal tensor.

    Args:
        critic: any callable critic T(x_1, ..., x_m) -> (N,).
        joint, marginal: sequences of m tensors, each N × d_k, of equal shapes.
        epsilon: optional (N,) interpolation weights in [0, 1]; drawn from ``generator``
            when ``None``.
        one_sided: penalise only norms above 1.

    Returns: a 0-dim tensor (float32, or float64 for float64 inputs).
    """
    joint, marginal = check_pairs(critic, joint, marginal)
    eps = interpolation_weights(epsilon, joint[0].shape[0], generator, joint[0].device,
                                compute_dtype(critic, joint))
    return gradient_penalty_terms(critic, joint, marginal, eps, one_sided)

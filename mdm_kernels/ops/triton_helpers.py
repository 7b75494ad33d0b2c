"""Pieces shared by the fused Triton ops (the shared layer: imports no kernel family):
activation codes, σ and its derivatives as ``@triton.jit`` helpers, the per-modality
projection that feeds every kernel, tile-size and autotune-config helpers.

Activation derivatives (used by the backward passes and the closed-form gradient penalty):

==============  ==========================  ====================  ==========================
activation      σ(x)                        σ'(x)                 σ''(x)
==============  ==========================  ====================  ==========================
relu            max(x, 0)                   [x > 0]               0
leaky_relu      x if x > 0 else 0.01·x      1 or 0.01             0
tanh            1 − 2 / (e^{2x} + 1)        1 − σ²                −2·σ·σ'
softplus        max(x, 0) + log(1 + e^−|x|) sigmoid(x) = s        s·(1 − s)
gelu (exact)    x·Φ(x)                      Φ(x) + x·φ(x)         φ(x)·(2 − x²)
==============  ==========================  ====================  ==========================

Φ/φ are the standard normal CDF/density.  tanh is written through exp so it needs no
libdevice call (the CPU interpreter has none); every form above is overflow-safe in float32.
"""
from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

from ..critic import LEAKY_RELU_SLOPE
from .runtime_flags import autotune_enabled, interpreter_enabled

#: fp32 ``tl.dot`` precision on GPU: 3×TF32 keeps about fp32 accuracy (error ~1e-6 relative)
#: on tensor cores.  Plain ``"ieee"`` would run the dots on FMA units with whole K-slices of
#: both operands in every thread's registers: ptxas showed 255 registers and kilobytes of
#: spills per thread for the fused kernels' 128-wide layers.
DOT_PRECISION = "tf32x3"
DOT_PREC = tl.constexpr(DOT_PRECISION)

#: constexpr codes of the activations inside kernels.
ACTIVATION_CODES = {"relu": 0, "leaky_relu": 1, "tanh": 2, "softplus": 3, "gelu": 4}

_INV_SQRT2 = 0.7071067811865476
_INV_SQRT_2PI = 0.3989422804014327


@triton.jit
def activation(x, ACT: tl.constexpr):
    """σ(x) for the activation code ``ACT`` (float32 in, float32 out)."""
    if ACT == 0:
        y = tl.maximum(x, 0.0)
    elif ACT == 1:
        y = tl.where(x > 0, x, x * 0.01)
    elif ACT == 2:
        y = 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)
    elif ACT == 3:
        y = tl.maximum(x, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(x)))
    else:
        y = 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
    return y


@triton.jit
def activation_grad(x, ACT: tl.constexpr):
    """σ'(x)."""
    if ACT == 0:
        d = tl.where(x > 0, 1.0, 0.0)
    elif ACT == 1:
        d = tl.where(x > 0, 1.0, 0.01)
    elif ACT == 2:
        t = 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)
        d = 1.0 - t * t
    elif ACT == 3:
        d = 1.0 / (1.0 + tl.exp(-x))
    else:
        cdf = 0.5 * (1.0 + tl.math.erf(x * 0.7071067811865476))
        pdf = 0.3989422804014327 * tl.exp(-0.5 * x * x)
        d = cdf + x * pdf
    return d


@triton.jit
def activation_grad2(x, ACT: tl.constexpr):
    """σ''(x) (zero almost everywhere for relu and leaky_relu)."""
    if ACT == 0:
        d2 = x * 0.0
    elif ACT == 1:
        d2 = x * 0.0
    elif ACT == 2:
        t = 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)
        d2 = -2.0 * t * (1.0 - t * t)
    elif ACT == 3:
        s = 1.0 / (1.0 + tl.exp(-x))
        d2 = s * (1.0 - s)
    else:
        pdf = 0.3989422804014327 * tl.exp(-0.5 * x * x)
        d2 = pdf * (2.0 - x * x)
    return d2


def activation_code(critic) -> int:
    """The kernel constexpr for ``critic.activation``."""
    assert LEAKY_RELU_SLOPE == 0.01, "kernels hard-code the leaky_relu slope 0.01"
    return ACTIVATION_CODES[critic.activation]


def project_modalities(critic, zs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """P_k = z_k W_{1,k}^T in float32 (B × H_1 each): one GEMM per modality, differentiable
    by autograd (so z_k and W_{1,k} get their gradients from dL/dP_k through the GEMM).

    Half-precision z's are up-cast first: accumulation and every kernel run in float32.
    """
    return [z.float() @ w.float().t() for z, w in zip(zs, critic.first_weights)]


def critic_tail(critic) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Float32, contiguous parameters after the first layer: (weights of hidden layers 2..L,
    their biases, output weight vector (H_last,), output bias (1,))."""
    ws = [layer.weight.float().contiguous() for layer in critic.hidden_layers]
    bs = [layer.bias.float().contiguous() for layer in critic.hidden_layers]
    return ws, bs, critic.out.weight.float().reshape(-1).contiguous(), \
        critic.out.bias.float().reshape(1).contiguous()


def block_size(n: int, lo: int = 16) -> int:
    """Smallest power of two ≥ max(n, lo) (tile width covering a whole dimension)."""
    return max(lo, triton.next_power_of_2(int(n)))


def tile_configs(gpu_configs: list, fixed_config):
    """The autotuner's candidate configs: all of ``gpu_configs`` normally; just
    ``fixed_config`` in the CPU interpreter (benchmarking there is slow and meaningless) or
    with autotuning switched off (:func:`autotune_enabled`)."""
    if interpreter_enabled() or not autotune_enabled():
        return [fixed_config]
    return list(gpu_configs)


__all__ = ["ACTIVATION_CODES", "DOT_PREC", "DOT_PRECISION", "activation", "activation_code",
           "activation_grad", "activation_grad2", "autotune_enabled", "block_size",
           "critic_tail", "interpreter_enabled", "project_modalities", "tile_configs"]

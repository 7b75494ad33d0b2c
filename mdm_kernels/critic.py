"""The statistical network ("critic") T(z_1, ..., z_m) that scores multimodal samples.

``MLPCritic`` is an MLP on the concatenated modalities,

    T(z_1, ..., z_m) = w_L^T σ(... σ(W_1 [z_1; ...; z_m] + b_1) ...) + b_L,

whose first layer is stored *split per modality*: W_1 [z_1; ...; z_m] = Σ_k W_{1,k} z_k.
The fused kernels rely on the split: they project every modality once (P_k = z_k W_{1,k}^T,
shape B × H) and then form the first pre-activation of any (joint or shuffled) sample as a sum
of gathered rows, P_1[i_1] + ... + P_m[i_m] + b_1, without materialising the concatenation.

Colombo et al., EMNLP 2021 ("Improving Multimodal fusion via Mutual Dependency
Maximisation"), Sec. 3: the statistical network T_θ.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn
import torch.nn.functional as F

#: Activations the critic (and every fused backend) supports, with their torch functions.
ACTIVATIONS = {
    "relu": F.relu,
    "gelu": F.gelu,  # exact (erf) GELU
    "softplus": F.softplus,
    "tanh": torch.tanh,
    "leaky_relu": lambda x: F.leaky_relu(x, negative_slope=0.01),
}

#: Negative slope used by ``activation="leaky_relu"``.
LEAKY_RELU_SLOPE = 0.01


def _check_dims(dims) -> tuple[int, ...]:
    if isinstance(dims, (int, bool)) or not isinstance(dims, Sequence):
        raise TypeError(f"dims must be a sequence of per-modality feature sizes, got {dims!r}")
    dims = tuple(dims)
    if len(dims) < 2:
        raise ValueError(f"dims must name at least 2 modalities, got {len(dims)}")
    for k, d in enumerate(dims):
        if isinstance(d, bool) or not isinstance(d, int) or d < 1:
            raise ValueError(f"dims[{k}] must be a positive int, got {d!r}")
    return dims


def _check_hidden(hidden) -> tuple[int, ...]:
    if isinstance(hidden, int) and not isinstance(hidden, bool):
        hidden = (hidden,)
    if not isinstance(hidden, Sequence) or len(hidden) == 0:
        raise ValueError(f"hidden must be a non-empty sequence of layer widths, got {hidden!r}")
    for k, h in enumerate(hidden):
        if isinstance(h, bool) or not isinstance(h, int) or h < 1:
            raise ValueError(f"hidden[{k}] must be a positive int, got {h!r}")
    return tuple(hidden)


class MLPCritic(nn.Module):
    """MLP critic T(z_1, ..., z_m) -> scores of shape (N,) with a per-modality first layer.

    Args:
        dims: feature size d_k of each modality (m ≥ 2 entries).
        hidden: widths of the hidden layers, e.g. ``(128,)`` or ``(256, 128)``.
        activation: one of ``relu``, ``gelu`` (exact erf form), ``softplus``, ``tanh``,
            ``leaky_relu`` (negative slope 0.01).

    Parameters:
        ``first_weights[k]`` (H_1 × d_k) and ``first_bias`` (H_1): the split first layer.
        ``hidden_layers``: ``nn.Linear`` layers H_1 → H_2 → ... (empty for one hidden layer).
        ``out``: ``nn.Linear(H_last, 1)``.

    Initialisation equals ``nn.Linear``'s on the concatenated input (fan-in Σ d_k), so the
    split does not change the function class or its initial scale.
    """

    def __init__(self, dims: Sequence[int], hidden: Sequence[int] | int = (128,),
                 activation: str = "relu"):
        super().__init__()
        self.dims = _check_dims(dims)
        self.hidden = _check_hidden(hidden)
        if activation not in ACTIVATIONS:
            raise ValueError(
                f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        self.activation = activation
        h1 = self.hidden[0]
        fan_in = sum(self.dims)
        bound = 1.0 / math.sqrt(fan_in)
        self.first_weights = nn.ParameterList(
            [nn.Parameter(torch.empty(h1, d).uniform_(-bound, bound)) for d in self.dims])
        self.first_bias = nn.Parameter(torch.empty(h1).uniform_(-bound, bound))
        self.hidden_layers = nn.ModuleList(
            nn.Linear(a, b) for a, b in zip(self.hidden[:-1], self.hidden[1:]))
        self.out = nn.Linear(self.hidden[-1], 1)

    @property
    def num_modalities(self) -> int:
        return len(self.dims)

    def act(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the hidden activation σ."""
        return ACTIVATIONS[self.activation](x)

    def first_weight(self) -> torch.Tensor:
        """The unsplit first-layer weight W_1 = [W_{1,1}, ..., W_{1,m}] of shape H_1 × Σ d_k."""
        return torch.cat(list(self.first_weights), dim=1)

    def project(self, zs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Per-modality projections P_k = z_k W_{1,k}^T (each B × H_1, no bias)."""
        return [z @ w.t() for z, w in zip(zs, self.first_weights)]

    def head(self, pre: torch.Tensor) -> torch.Tensor:
        """Scores from first-layer pre-activations ``pre`` (N × H_1, bias included) -> (N,)."""
        h = self.act(pre)
        for layer in self.hidden_layers:
            h = self.act(layer(h))
        return self.out(h).squeeze(-1)

    def forward(self, *zs: torch.Tensor) -> torch.Tensor:
        if len(zs) != self.num_modalities:
            raise ValueError(
                f"critic expects {self.num_modalities} modalities, got {len(zs)} tensors")
        dtype = self.first_bias.dtype
        pre = self.first_bias
        for z, w in zip(zs, self.first_weights):
            pre = pre + z.to(dtype) @ w.t()
        return self.head(pre)

    def extra_repr(self) -> str:
        return f"dims={self.dims}, hidden={self.hidden}, activation={self.activation!r}"

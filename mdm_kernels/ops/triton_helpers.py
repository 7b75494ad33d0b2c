"""Pieces shared by the fused Triton ops (the shared layer: imports no kernel family):
activation codes, σ and its derivatives as ``@triton.jit`` helpers, the per-modality
projection that feeds every kernel, tile-size and autotune-config helpers.

Activation derivatives (used by the backward passes and the closed-form gradient penalty):

==============  ==========================  ====================  ==========================
activation      σ(x)                        σ'(x)                 σ''(x)
==============  ==========================  ====================  ==========================
relu            max(x, 0)                   [x > 0]               0
leaky_relu      x if x > 0 else 0.01·x      1 or 0.01             0
tanh            odd form / series (below)   4t / (1 + t)²         −2·σ·σ'
softplus        max(x, 0) + log(1 + e^−|x|) sigmoid(x) = s        s·(1 − s)
gelu (exact)    x·Φ(x)                      Φ(x) + x·φ(x)         φ(x)·(2 − x²)
==============  ==========================  ====================  ==========================

Φ/φ are the standard normal CDF/density.  tanh is written through exp so it needs no
libdevice call (the CPU interpreter has none); every form above is overflow-safe in float32.

tanh, stably (:func:`tanh_stable`): with t = e^{−2|x|} ∈ (0, 1],
tanh x = sign(x)·(1 − t)/(1 + t) for |x| ≥ 0.3 (1 − t loses at most a factor
t/(1 − t) ≤ 1.2 of relative accuracy there) and the odd Taylor series
x − x³/3 + 2x⁵/15 − 17x⁷/315 + 62x⁹/2835 below (truncation ≤ 0.0089·x¹⁰ ≤ 5e-8 relative).
σ' = 1 − tanh² = 4t/(1 + t)² has no cancellation for large |x| either.  Relative error
against float64 ``torch.tanh``: ≤ 2.3e-7 in exact float32 arithmetic (the CPU interpreter,
``tests/test_triton_launch.py``); on a GPU ``tl.exp`` is ``ex2.approx`` (≈ 2⁻²² relative, plus
|2x·log₂e|·2⁻²⁴ from rounding its argument) and the division ``div.full`` (2 ulp), which
bounds the compiled tanh by about 1.5e-6 relative.  The former 1 − 2/(e^{2x} + 1) had
1.7e-4 relative error at x = 1e-4 (and 100 % below 3e-8) even in exact float32.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
import triton
import triton.language as tl

from ..critic import LEAKY_RELU_SLOPE
from .launch_context import launch_device  # noqa: F401  (re-exported for the kernel families)
from .runtime_flags import (autotune_enabled, emulated_config_index, emulated_gpu,
                            interpreter_enabled)

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


#: below this |x| tanh uses its odd Taylor series (module docstring).
_TANH_SERIES_MAX = tl.constexpr(0.3)


@triton.jit
def _tanh_exp_neg2abs(x):
    """t = e^{−2|x|} ∈ (0, 1]: never overflows."""
    return tl.exp(-2.0 * tl.abs(x))


@triton.jit
def tanh_stable(x):
    """tanh(x) in float32 without cancellation near 0 or overflow: the odd Taylor series
    through x⁹ for |x| < 0.3, else sign(x)·(1 − t)/(1 + t) with t = e^{−2|x|}."""
    x2 = x * x
    series = x + x * (x2 * (-0.3333333333333333 + x2 * (0.13333333333333333 + x2 * (
        -0.05396825396825397 + x2 * 0.021869488536155203))))
    t = _tanh_exp_neg2abs(x)
    odd = (1.0 - t) / (1.0 + t)
    odd = tl.where(x < 0, -odd, odd)
    return tl.where(tl.abs(x) < _TANH_SERIES_MAX, series, odd)


@triton.jit
def tanh_grad_stable(x):
    """tanh'(x) = 1 − tanh² = 4t/(1 + t)² with t = e^{−2|x|}: no cancellation at any x."""
    t = _tanh_exp_neg2abs(x)
    u = 1.0 + t
    return 4.0 * t / (u * u)


@triton.jit
def activation(x, ACT: tl.constexpr):
    """σ(x) for the activation code ``ACT`` (float32 in, float32 out)."""
    if ACT == 0:
        y = tl.maximum(x, 0.0)
    elif ACT == 1:
        y = tl.where(x > 0, x, x * 0.01)
    elif ACT == 2:
        y = tanh_stable(x)
    elif ACT == 3:
        y = tl.maximum(x, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(x)))
    else:
        y = 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
    return y


@triton.jit
def times_activation_grad(g, x, ACT: tl.constexpr):
    """g·σ'(x) without the multiply where σ' is piecewise constant: relu selects g or 0
    (FSETP + FSEL), leaky relu g or 0.01·g; the others multiply by :func:`activation_grad`."""
    if ACT == 0:
        out = tl.where(x > 0, g, 0.0)
    elif ACT == 1:
        out = tl.where(x > 0, g, g * 0.01)
    else:
        out = g * activation_grad(x, ACT)
    return out


#: Activations with σ(x) = x·σ'(x) (positively homogeneous: relu, leaky relu): there
#: Σ g·σ(z) = Σ (g·σ'(z))·z, so a backward that already has the sums of g·σ'(z) gets the
#: output-weight gradient from them without evaluating σ per sample.
HOMOGENEOUS_ACTIVATIONS = (0, 1)


@triton.jit
def activation_grad(x, ACT: tl.constexpr):
    """σ'(x)."""
    if ACT == 0:
        d = tl.where(x > 0, 1.0, 0.0)
    elif ACT == 1:
        d = tl.where(x > 0, 1.0, 0.01)
    elif ACT == 2:
        d = tanh_grad_stable(x)
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
        d2 = -2.0 * tanh_stable(x) * tanh_grad_stable(x)
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


def size_bucket(n: int) -> int:
    """The autotune key of a size n ≥ 0: the smallest power of two ≥ n (1 for n ≤ 1).  Keying
    on buckets instead of exact sizes makes a new batch size in the same bucket (a short
    last batch, a DDP-gathered batch) reuse the tuned config instead of benchmarking again;
    tile choice within a bucket hardly changes (the configs differ by 2× in BLOCK_N)."""
    n = int(n)
    if n < 0:
        raise ValueError(f"size_bucket: n must be >= 0, got {n}")
    return block_size(n, lo=1)


def check_same_device(named: Mapping[str, torch.Tensor | None]) -> torch.device:
    """The common device of the named tensors (``None`` entries skipped); ``ValueError``
    naming the first tensor on another device than the first one."""
    first_name, device = None, None
    for name, t in named.items():
        if t is None:
            continue
        if device is None:
            first_name, device = name, t.device
        elif t.device != device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {device}: "
                             f"the fused kernels need every input on one device")
    return device


def tile_configs(gpu_configs: list, fixed_config):
    """The autotuner's candidate configs: all of ``gpu_configs`` normally; just
    ``fixed_config`` in the CPU interpreter (benchmarking there is slow and meaningless) or
    with autotuning switched off (:func:`autotune_enabled`)."""
    if interpreter_enabled() or not autotune_enabled():
        return [fixed_config]
    return list(gpu_configs)


#: Configs the autotuner chose outside any CUDA-graph capture, per (kernel name, tuning key)
#: — the module's only state, a cache (:func:`launch_tuned`).
_CHOSEN_CONFIGS: dict = {}


def _capturing(args) -> bool:
    """Whether a CUDA graph is being captured on the current stream (the launch's device is
    current already: every family launches under :func:`launch_device`)."""
    dev = next((a.device for a in args if isinstance(a, torch.Tensor)), None)
    if dev is None or dev.type != "cuda":
        return False
    return torch.cuda.is_current_stream_capturing()


def launch_tuned(kernel, grid, args, meta, candidates, key):
    """Launch the autotuned ``kernel`` (a ``triton.autotune`` object) on ``grid`` (a callable
    of the launch's meta-parameters → grid tuple) and return the config it ran.

    ``candidates``: the configs that fit this launch (the family's fit table, what the
    autotuner's prune keeps); ``key``: a hashable naming the tuning case (the autotuner's
    key).  Three cases besides the plain ``kernel[grid](...)``:

    * GPU-launch emulation (:func:`~mdm_kernels.ops.runtime_flags.emulated_gpu`): no
      benchmarking — candidate ``MDM_EMULATE_CONFIG`` (modulo their number) is launched
      explicitly, in the interpreter, so a test can execute each candidate in turn;
    * inside a CUDA-graph capture, for a key never tuned outside one: benchmarking there
      would launch (and time) kernels into the graph, so the first candidate runs instead;
      a key tuned before the capture reuses its config;
    * in the interpreter / with ``MDM_TRITON_AUTOTUNE=0``, the autotuner holds one fixed
      config and runs it.
    """
    if emulated_gpu() is not None:
        config = candidates[emulated_config_index() % len(candidates)]
        kw = config.all_kwargs()
        kernel.fn[grid({**meta, **kw})](*args, **meta, **kw)
        return config
    cache_key = (kernel.base_fn.__name__, key)
    if _capturing(args):
        config = _CHOSEN_CONFIGS.get(cache_key, candidates[0])
        kw = config.all_kwargs()
        kernel.fn[grid({**meta, **kw})](*args, **meta, **kw)
        return config
    kernel[grid](*args, **meta)
    _CHOSEN_CONFIGS[cache_key] = kernel.best_config
    return kernel.best_config


__all__ = ["ACTIVATION_CODES", "DOT_PREC", "DOT_PRECISION", "activation", "activation_code",
           "activation_grad", "activation_grad2", "autotune_enabled", "block_size",
           "check_same_device", "critic_tail", "interpreter_enabled", "launch_device", "launch_tuned",
           "project_modalities", "size_bucket", "tanh_grad_stable", "tanh_stable",
           "tile_configs"]

"""Input checks shared by every estimator: clear errors that name the offending argument."""
from __future__ import annotations

from typing import Sequence

import torch

#: dtypes the estimators accept for the z's (half types accumulate in float32).
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def critic_dtype(critic) -> torch.dtype | None:
    """dtype of the critic's first floating parameter (None for parameter-free callables)."""
    params = getattr(critic, "parameters", None)
    if params is None:
        return None
    for p in params():
        if p.is_floating_point():
            return p.dtype
    return None


def critic_device(critic) -> torch.device | None:
    params = getattr(critic, "parameters", None)
    if params is None:
        return None
    for p in params():
        return p.device
    return None


def check_zs(critic, zs: Sequence, name: str = "zs") -> tuple[torch.Tensor, ...]:
    """Validate the per-modality tensors z_1, ..., z_m against each other and the critic.

    Rules: at least two 2-D floating tensors (B × d_k) with the same batch size, dtype and
    device; feature sizes must match an ``MLPCritic``'s ``dims``; the critic's parameters must
    be on the same device, and float64 z's need a float64 critic (no silent down-cast).
    Raises ``TypeError``/``ValueError`` naming the argument.
    """
    if not callable(critic):
        raise TypeError(f"critic must be callable (e.g. MLPCritic), got {type(critic).__name__}")
    zs = tuple(zs)
    if len(zs) < 2:
        raise ValueError(f"need at least 2 modalities ({name}), got {len(zs)}")
    for k, z in enumerate(zs):
        if not isinstance(z, torch.Tensor):
            raise TypeError(f"{name}[{k}] must be a torch.Tensor, got {type(z).__name__}")
        if z.dtype not in FLOAT_DTYPES:
            raise TypeError(
                f"{name}[{k}] must be float16, bfloat16, float32 or float64, got {z.dtype}")
        if z.dim() != 2:
            raise ValueError(f"{name}[{k}] must be 2-D (batch, features), got shape "
                             f"{tuple(z.shape)}")
    first = zs[0]
    for k, z in enumerate(zs[1:], start=1):
        if z.device != first.device:
            raise ValueError(f"{name}[{k}] is on {z.device} but {name}[0] is on {first.device}")
        if z.dtype != first.dtype:
            raise TypeError(f"{name}[{k}] has dtype {z.dtype} but {name}[0] has {first.dtype}; "
                            f"cast them to one dtype")
        if z.shape[0] != first.shape[0]:
            raise ValueError(f"batch sizes differ: {name}[0] has {first.shape[0]} rows, "
                             f"{name}[{k}] has {z.shape[0]}")
    if first.shape[0] < 1:
        raise ValueError(f"{name} have an empty batch")
    dims = getattr(critic, "dims", None)
    if dims is not None:
        if len(zs) != len(dims):
            raise ValueError(f"critic has {len(dims)} modalities (dims={tuple(dims)}) but "
                             f"{len(zs)} tensors were given")
        for k, (z, d) in enumerate(zip(zs, dims)):
            if z.shape[1] != d:
                raise ValueError(f"{name}[{k}] has {z.shape[1]} features but the critic "
                                 f"expects dims[{k}]={d}")
    pdev = critic_device(critic)
    if pdev is not None and pdev != first.device:
        raise ValueError(f"critic parameters are on {pdev} but {name} are on {first.device}")
    pdtype = critic_dtype(critic)
    if pdtype is not None and first.dtype == torch.float64 and pdtype != torch.float64:
        raise TypeError(f"{name} are float64 but the critic is {pdtype}: call critic.double() "
                        f"for a float64 computation (no silent down-cast)")
    return zs


def compute_dtype(critic, zs: Sequence[torch.Tensor]) -> torch.dtype:
    """dtype in which scores are computed and returned: float64 when the critic or the z's
    are float64, float32 otherwise (half inputs accumulate in float32)."""
    if torch.float64 in (critic_dtype(critic), zs[0].dtype):
        return torch.float64
    return torch.float32


def require_values(condition: torch.Tensor, message: str, details=None) -> None:
    """Check a condition on tensor *values* (``condition``: a 0-dim bool tensor, e.g. index
    bounds) without blocking ``torch.compile``.  Eagerly: one host read, and
    ``ValueError(message)`` — followed by ``": " + details()`` when ``details`` (a callable,
    e.g. quoting the offending values) is given.  While Dynamo traces
    (``torch.compiler.is_compiling()``) or a CUDA graph is being captured: no host
    synchronisation (it would break the graph, or the capture), a device-side assertion
    (``torch._assert_async``) instead, which fails the step with ``message`` (on a GPU: a
    device-side assert) when it runs."""
    if torch.compiler.is_compiling() or (condition.is_cuda
                                         and torch.cuda.is_current_stream_capturing()):
        torch._assert_async(condition, message)
        return
    if not bool(condition):
        raise ValueError(message if details is None else f"{message}: {details()}")

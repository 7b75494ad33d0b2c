"""Where a fused launch runs, readable without importing Triton (shared by the Triton kernel
families and the CUDA backend, whose build needs no Triton)."""
from __future__ import annotations

import contextlib

import torch


def launch_device(tensor: torch.Tensor):
    """Context manager that makes ``tensor``'s CUDA device current, the caller's restored on
    exit, so a launch (which runs on the current device and stream) runs where its operands
    live — e.g. tensors on cuda:1 while cuda:0 is current.  A no-op for CPU tensors (Triton's
    interpreter, the CUDA backend's host-memory test stand-in)."""
    if tensor.device.type == "cuda":
        return torch.cuda.device(tensor.device)
    return contextlib.nullcontext()

"""Environment switches of the Triton kernels, readable without importing Triton.

* ``TRITON_INTERPRET=1`` — the kernels run in Triton's CPU interpreter on CPU tensors (how CI
  tests them); it must be set before :mod:`mdm_kernels` (and so Triton) is imported.
* ``MDM_TRITON_AUTOTUNE=0`` — every fused op compiles one fixed tile configuration instead
  of benchmarking all of them.
* ``MDM_EMULATE_GPU=sm_90[:SMs]`` / ``sm_80`` (with the interpreter) — GPU-launch emulation:
  every family makes the launch decisions of that GPU while the kernels run in the
  interpreter; ``MDM_EMULATE_CONFIG=i`` picks the autotune candidate launched explicitly;
  ``MDM_POISON_EMPTY=1`` fills uninitialised output buffers with NaN.  See
  :func:`emulate_gpu`.

Bottom of the ``ops`` layering (this module imports nothing of the package)::

    runtime_flags → triton_helpers → marginal_terms → sample_tiles
        → kernel families (gathered_tiles, outer_sums, single_program, gradient_penalty)
        → router → triton_backend (the object ``dispatch`` sees)
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass


def interpreter_enabled() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def autotune_enabled() -> bool:
    """False when ``MDM_TRITON_AUTOTUNE=0``: every fused op then compiles one fixed tile
    configuration instead of benchmarking all of them (the GPU test suite sets it, since
    compiling every config of every kernel variant would dominate its run time)."""
    return os.environ.get("MDM_TRITON_AUTOTUNE", "1") != "0"


# ----------------------------------------------------------------------------- GPU emulation
#: GPU targets the launch emulation knows: arch → (compute capability, streaming
#: multiprocessors, shared memory per block in bytes).  H100/H200 SXM: 132 SMs; A100: 108.
GPU_TARGETS = {"sm_90": (90, 132, 232_448), "sm_80": (80, 108, 166_912)}

_EMULATE_ENV = "MDM_EMULATE_GPU"
_CONFIG_ENV = "MDM_EMULATE_CONFIG"
_POISON_ENV = "MDM_POISON_EMPTY"


@dataclass(frozen=True)
class EmulatedGpu:
    """The GPU whose launch decisions the interpreter run makes (:func:`emulated_gpu`)."""
    arch: str
    capability: int
    sms: int
    shared_memory: int


def _parse_target(spec: str) -> EmulatedGpu:
    arch, _, sms = spec.strip().partition(":")
    if arch not in GPU_TARGETS:
        raise ValueError(f"{_EMULATE_ENV}={spec!r}: the target must be one of "
                         f"{sorted(GPU_TARGETS)} optionally followed by ':<SM count>'")
    cap, default_sms, smem = GPU_TARGETS[arch]
    if sms:
        if not sms.isdigit() or int(sms) < 1:
            raise ValueError(f"{_EMULATE_ENV}={spec!r}: the SM count after ':' must be a "
                             f"positive integer")
        return EmulatedGpu(arch, cap, int(sms), smem)
    return EmulatedGpu(arch, cap, default_sms, smem)


def emulated_gpu() -> EmulatedGpu | None:
    """The emulated GPU target (``MDM_EMULATE_GPU=sm_90``, ``sm_80`` or ``sm_90:<SMs>``), or
    ``None``.  Only meaningful with the interpreter on (``TRITON_INTERPRET=1``): every kernel
    family then makes exactly the launch decisions it makes on that GPU — tile tables,
    chunk sizes, grids, split factors, persistent-program counts, routing thresholds —
    while the kernels run in the CPU interpreter (tests, ``python/gpu_check.sh --dry-run``)."""
    spec = os.environ.get(_EMULATE_ENV, "")
    if not spec or not interpreter_enabled():
        return None
    return _parse_target(spec)


def emulated_config_index() -> int:
    """Which autotune candidate an emulated launch runs (``MDM_EMULATE_CONFIG``, default 0,
    taken modulo the number of candidates a launch keeps after pruning): under emulation the
    autotuner is bypassed and the chosen config launched explicitly, so a test can run each
    candidate in turn (:func:`emulate_gpu` ``config=``)."""
    return int(os.environ.get(_CONFIG_ENV, "0") or 0)


def poison_empty_enabled() -> bool:
    """``MDM_POISON_EMPTY=1``: every buffer the library allocates uninitialised
    (:func:`fresh_empty`) is filled with NaN, as a GPU's fresh memory may hold anything — a
    read of an unwritten element then shows up as NaN in a test."""
    return os.environ.get(_POISON_ENV, "0") not in ("", "0")


def uses_gpu_launches(device) -> bool:
    """Whether launches on ``device`` take the GPU's decisions: a CUDA device with compiled
    kernels, or the interpreter under :func:`emulated_gpu`."""
    if emulated_gpu() is not None:
        return True
    return device.type == "cuda" and not interpreter_enabled()


def sm_count(device) -> int | None:
    """Streaming multiprocessors of the GPU a launch targets: the emulated target's, the
    CUDA device's, or ``None`` (interpreter without emulation)."""
    target = emulated_gpu()
    if target is not None:
        return target.sms
    if device.type == "cuda" and not interpreter_enabled():
        import torch
        return torch.cuda.get_device_properties(device).multi_processor_count
    return None


def _set_env(values: dict) -> None:
    """Set the environment variables in ``values`` (``None``: unset)."""
    for k, v in values.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@contextlib.contextmanager
def _env(**values):
    """The variables in ``values`` set inside the block, the previous values restored."""
    old = {k: os.environ.get(k) for k in values}
    try:
        _set_env(values)
        yield
    finally:
        _set_env(old)


@contextlib.contextmanager
def emulate_gpu(arch: str = "sm_90", sms: int | None = None, config: int = 0,
                poison: bool = True):
    """Run the enclosed launches as on GPU ``arch`` (with ``sms`` SMs, default the target's)
    in the interpreter, with autotune candidate ``config`` and NaN-poisoned fresh buffers
    (``poison``).  ``arch=None`` switches emulation off inside the block."""
    spec = None if arch is None else (arch if sms is None else f"{arch}:{int(sms)}")
    if spec is not None:
        _parse_target(spec)  # validate before touching the environment
    with _env(**{_EMULATE_ENV: spec, _CONFIG_ENV: str(int(config)),
                 _POISON_ENV: "1" if poison else None}):
        yield


def fresh_empty(*shape, device, dtype):
    """``torch.empty`` for kernel outputs; NaN-filled under :func:`poison_empty_enabled`
    (floating dtypes) so that unwritten elements are caught by the tests."""
    import torch
    out = torch.empty(*shape, device=device, dtype=dtype)
    if poison_empty_enabled() and out.is_floating_point():
        out.fill_(float("nan"))
    return out

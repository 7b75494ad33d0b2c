"""Environment switches of the Triton kernels, readable without importing Triton.

* ``TRITON_INTERPRET=1`` — the kernels run in Triton's CPU interpreter on CPU tensors (how CI
  tests them); it must be set before :mod:`mdm_kernels` (and so Triton) is imported.
* ``MDM_TRITON_AUTOTUNE=0`` — every fused op compiles one fixed tile configuration instead
  of benchmarking all of them.

Bottom of the ``ops`` layering (this module imports nothing of the package)::

    runtime_flags → triton_helpers → marginal_terms → sample_tiles
        → kernel families (gathered_tiles, outer_sums, single_program, gradient_penalty)
        → router → triton_backend (the object ``dispatch`` sees)
"""
from __future__ import annotations

import os


def interpreter_enabled() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def autotune_enabled() -> bool:
    """False when ``MDM_TRITON_AUTOTUNE=0``: every fused op then compiles one fixed tile
    configuration instead of benchmarking all of them (the GPU test suite sets it, since
    compiling every config of every kernel variant would dominate its run time)."""
    return os.environ.get("MDM_TRITON_AUTOTUNE", "1") != "0"

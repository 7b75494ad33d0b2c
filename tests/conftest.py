"""Test configuration: without a GPU, Triton kernels run in the CPU interpreter.

TRITON_INTERPRET must be set before triton/mdm_kernels.ops are imported, hence here.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
else:
    # one tile config per kernel variant: compiling every autotune config of every variant
    # would dominate the GPU test run (benchmarks keep autotuning on)
    os.environ.setdefault("MDM_TRITON_AUTOTUNE", "0")

# every buffer the library allocates uninitialised is NaN-filled (runtime_flags.fresh_empty),
# as a GPU's fresh memory may hold anything: a read of an unwritten element fails a test
os.environ.setdefault("MDM_POISON_EMPTY", "1")

import pytest  # noqa: E402

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    import interpreter_speedup  # noqa: E402  (tests/ is on sys.path under pytest)
    interpreter_speedup.install()
    if os.environ.get("MDM_RECORD_LAUNCHES"):   # python/emulation_coverage.py
        import launch_recorder  # noqa: E402
        launch_recorder.install(os.environ["MDM_RECORD_LAUNCHES"])


@pytest.fixture
def device():
    """CUDA when present (compiled kernels), else CPU (interpreter)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")

"""Bit-reproducible CPU numerics for the fusion models (issue 25).

Two CPU libraries inside torch pick their kernels from the processor they run on, so the same
seed and configuration used to give different floating-point sums on machines with different
instruction sets or cache sizes, and a training run amplifies a last-bit difference into a
different model (LMF is the most sensitive: a rerun of ``lmf`` seed 0 gave Acc-7 35.6 instead
of 36.2 on another machine):

- **oneDNN (MKL-DNN) runs ``nn.LSTM`` on the CPU** (its ``rnn`` primitive: every model with a
  ``SeqEncoder`` -- ef_lstm, lf_lstm, tfn, lmf -- and MulT's ``Conv1d``); its JIT kernels follow
  the CPU's ISA (``ONEDNN_MAX_CPU_ISA=AVX2`` alone changed LMF's 12-epoch result here).
  :func:`no_onednn` runs those modules on ATen's own kernels instead (no slower at these sizes).
- **MKL's GEMM** (every ``nn.Linear``) dispatches on the CPU too.  :func:`pin_mkl` fixes its
  code path with MKL's Conditional Numerical Reproducibility mode (``MKL_CBWR=AVX2,STRICT``:
  the AVX2 branch, which every x86-64 CPU of the last decade runs, so an AVX-512 machine
  computes what an AVX2 one does; STRICT makes the GEMM results independent of the number of
  threads too -- without it a 2-thread LMF run differed from a 1-thread one in the last bits).
  On an AMD processor MKL takes no named branch but COMPATIBLE: asked for AVX2 it reports
  ``AUTO,STRICT`` (seen on an AMD EPYC, 2026-12-02), and STRICT still makes a run independent
  of the thread count and of ISA caps on that machine (``tests/test_determinism.py``); an
  Intel and an AMD machine are not promised the same last bits.  MKL reads the mode once,
  at its first call: this module sets it when it is imported, before the training layer
  runs any matrix product; a process that already used MKL keeps its mode (then
  :func:`numerics_info` says so, and every run records it).

MFN (``LSTMCell``: ATen kernels) was already machine-independent except for MKL.
"""
from __future__ import annotations

import contextlib
import ctypes
import os

import torch

#: the MKL CNR branch the training layer asks for (respecting a user's own ``MKL_CBWR``)
MKL_BRANCH = "AVX2,STRICT"
_MKL_CODES = {0: "OFF", 1: "BRANCH_OFF", 2: "AUTO", 3: "COMPATIBLE", 4: "SSE2", 6: "SSSE3",
              7: "SSE4_1", 8: "SSE4_2", 9: "AVX", 10: "AVX2", 11: "AVX512_MIC", 12: "AVX512",
              13: "AVX512_MIC_E1", 14: "AVX512_E1"}


def _mkl_lib():
    path = os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so")
    try:
        lib = ctypes.CDLL(path)
        get = lib.mkl_serv_cbwr_get
    except (OSError, AttributeError):  # no MKL in this torch build (ARM, macOS, ...)
        return None
    get.argtypes, get.restype = [ctypes.c_int], ctypes.c_int
    return get


def pin_mkl() -> None:
    """Ask MKL for the :data:`MKL_BRANCH` code path (``MKL_CBWR``), unless the user set one."""
    os.environ.setdefault("MKL_CBWR", MKL_BRANCH)


def mkl_mode() -> str | None:
    """MKL's CNR branch in force (``"AVX2"``, ``"BRANCH_OFF"`` = unpinned...), None without MKL."""
    get = _mkl_lib()
    if get is None or not torch.backends.mkl.is_available():
        return None
    code = get(-1)  # MKL_CBWR_ALL: the branch and the STRICT bit
    return _MKL_CODES.get(code & 0xFFFF, str(code)) + (",STRICT" if code & 0x10000 else "")


def numerics_info() -> dict:
    """What a run's numbers depend on besides its configuration (recorded in metrics.json)."""
    return {"mkl_cbwr": mkl_mode(), "onednn_in_models": False,
            "aten_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads()}


@contextlib.contextmanager
def no_onednn():
    """Run the enclosed modules on ATen's kernels, not oneDNN's (CPU-ISA-dependent) ones."""
    was = torch._C._get_mkldnn_enabled()
    torch._C._set_mkldnn_enabled(False)
    try:
        yield
    finally:
        torch._C._set_mkldnn_enabled(was)


pin_mkl()

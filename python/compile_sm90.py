"""Compile the fused kernels (one-program, outer-sum, gathered-tile estimators; gradient
penalty) for sm_90 with the real Triton compiler and report ptxas' register and spill
counts — a GPU-free check that the kernels build for an H100/H200 and fit in registers.  No GPU needed; use Triton 3.6 (what the GPU machine has:
Triton 3.9 emits PTX 9.4, which the CUDA 13.0 ptxas here rejects — the report then says so)
with numpy < 2.3, e.g. a venv with ``triton==3.6.0 "numpy<2.3"`` and the CPU torch:

    PYTHONPATH=. python python/compile_sm90.py [--quick]

The variants: every estimator × negatives layout (joint+shuffles, "all" grid, InfoNCE) ×
1/2 hidden layers × relu/gelu at H_1 = 128, with the tiles and warps the kernels launch with
on a GPU (chosen with this script: no spills with one hidden layer).
"""
from __future__ import annotations

import argparse
import itertools
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from mdm_kernels.ops import gathered_tiles as gt  # noqa: E402
from mdm_kernels.ops import marginal_terms as mt  # noqa: E402
from mdm_kernels.ops import single_program as spb  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)


def signature(fn, consts, ints=(), floats=(), int_ptrs=(), i32_ptrs=()):
    """Triton signature of ``fn``: every constexpr must be given in ``consts`` (a missing one
    would otherwise be typed as a pointer and compile a different kernel)."""
    missing = [fn.arg_names[i] for i in fn.constexprs if fn.arg_names[i] not in consts]
    if missing:
        raise ValueError(f"{fn.__name__}: constexpr arguments without a value: {missing}")
    sig = {}
    for name in fn.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name in ints or re.fullmatch(r"dim\d", name):
            sig[name] = "i32"
        elif name in floats:
            sig[name] = "fp32"
        elif name in int_ptrs:
            sig[name] = "*i64"
        elif name in i32_ptrs:
            sig[name] = "*i32"
        else:
            sig[name] = "*fp32"
    return sig


def _ptxas_candidates() -> list[str]:
    """Triton's bundled ptxas, then the CUDA toolkit's (PTX versions differ between them)."""
    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                           "ptxas")
    found = [bundled] if os.path.exists(bundled) else []
    return found + [shutil.which("ptxas") or "/usr/local/cuda/bin/ptxas"]


def ptxas_report(kernel) -> str:
    """ptxas' register / spill-store counts for sm_90a, from the first ptxas that accepts
    the PTX version."""
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(kernel.asm["ptx"])
    try:
        for ptxas in _ptxas_candidates():
            out = subprocess.run([ptxas, "-arch=sm_90a", "-v", f.name, "-o", os.devnull],
                                 capture_output=True, text=True)
            text = out.stdout + out.stderr
            if out.returncode == 0:
                regs = re.search(r"Used (\d+) registers", text)
                spill = re.search(r"(\d+) bytes spill stores", text)
                return (f"regs {regs.group(1) if regs else '?'} "
                        f"spill-stores {spill.group(1) if spill else '?'}")
        return f"ptxas failed: {text.strip().splitlines()[0] if text.strip() else out.returncode}"
    finally:
        os.unlink(f.name)


def compile_one(fn, consts, num_warps, **sig):
    t0 = time.time()
    src = ASTSource(fn, signature(fn, consts, **sig), constexprs=consts)
    kernel = triton.compile(src, target=TARGET, options=dict(num_warps=num_warps))
    return kernel, time.time() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="dv + infonce, relu only")
    args = ap.parse_args()
    kinds = ["dv", "infonce"] if args.quick else list(spb.KIND_CODES)
    acts = [0] if args.quick else [0, 4]
    fwd = spb._single_program_fwd_kernel
    bwd = spb._single_program_bwd_kernel
    n = 0
    for kind, two, act in itertools.product(kinds, [False, True], acts):
        layouts = [(2, 2, True, 3), (3, 1, False, 3)] if kind == "infonce" else \
            [(1, 1, False, 3), (2, 2, False, 2), (2, 3, False, 3)]
        for idx, nf, grouped, m in layouts:
            consts = dict(M=m, KIND=spb.KIND_CODES[kind], RED_M=mt.MARGINAL_RED[kind],
                          GMODE_J=mt.G_SIGMOID_NEG if kind == "js" else mt.G_ONE,
                          GMODE_M=mt.MARGINAL_GMODE[kind], IDX=idx, NF=nf, GROUPED=grouped,
                          TWO_LAYERS=two, ACT=act, BLOCK_H1=128, BLOCK_H2=16,
                          BLOCK_N=16, BLOCK_K=32 if two else 16)
            kernel, secs = compile_one(fwd, consts, 8, ints=("B", "N", "NCOL", "H1", "H2", "SP"),
                                       floats=("log_n", "log_ncol"), int_ptrs=("perm_ptr",))
            print(f"fwd {kind:11s} idx={idx} nf={nf} m={m} layers={1 + two} act={act}: "
                  f"{ptxas_report(kernel)}  ({secs:.1f}s)", flush=True)
            n += 1
    for m, has_gp in ((2, False), (3, False), (3, True)):
        consts = dict(M=m, HAS_GP=has_gp, NRB=8, NHB=4, NEED_DZ=True, BLOCK_R=32, BLOCK_K=16,
                      BLOCK_D=64, BLOCK_S=256)
        kernel, secs = compile_one(bwd, consts, 8, ints=("B", "H1", "SP"))
        print(f"bwd m={m} projections-grad={has_gp}: {ptxas_report(kernel)}  ({secs:.1f}s)",
              flush=True)
        n += 1
    from mdm_kernels.ops import outer_sums as ogb
    for kind, act in itertools.product(kinds, acts):
        gmode = mt.MARGINAL_GMODE[kind]
        for nf in ((2,) if kind == "infonce" else (2, 3)):
            consts = dict(NF=nf, RED=mt.MARGINAL_RED[kind], ACT=act, BLOCK_R=16, BLOCK_C=256)
            kernel, secs = compile_one(ogb._outer_fwd_kernel, consts, 8, ints=("B", "S", "H"))
            print(f"outer fwd {kind:11s} nf={nf} act={act}: {ptxas_report(kernel)}  "
                  f"({secs:.1f}s)", flush=True)
            n += 1
            for owned in range(nf):
                consts = dict(NF=nf, OWNED=owned, GMODE=gmode, PARAM_GRADS=owned == 0,
                              ACT=act, BLOCK_S=16, BLOCK_O=256)  # _bwd_tiles()
                kernel, secs = compile_one(ogb._outer_bwd_kernel, consts, 8,
                                           ints=("B", "S", "H", "SPLIT_BLOCKS"))
                print(f"outer bwd {kind:11s} nf={nf} owned={owned} act={act}: "
                      f"{ptxas_report(kernel)}  ({secs:.1f}s)", flush=True)
                n += 1
    for (idx, nf, grouped, m), two, act in itertools.product(
            [(0, 1, False, 3), (1, 1, False, 3), (2, 3, False, 3), (2, 2, True, 3),
             (3, 1, False, 3)], (False, True), acts):
        red = {0: 0, 1: 3, 2: 4 if grouped else 3, 3: 4}[idx]
        consts = dict(M=m, IDX=idx, RED=red, NF=nf, GROUPED=grouped, TWO_LAYERS=two, ACT=act,
                      BLOCK_H1=128, BLOCK_H2=32, BLOCK_N=16)  # the MDM_TRITON_AUTOTUNE=0 tile
        kernel, secs = compile_one(gt._bounds_fwd_kernel.fn, consts, 8,
                                   ints=("B", "N", "NCOL", "H1", "H2", "N_KEY", "NCOL_KEY", "B_KEY"),
                                   int_ptrs=("perm_ptr",))
        report = ptxas_report(kernel)
        gmode = {0: 0, 1: 1, 2: 2 if grouped else 1, 3: 2}[idx]
        consts = dict(M=m, IDX=idx, GMODE=gmode, NF=nf, OWNER=0, GROUPED=grouped,
                      PARAM_GRADS=True, TWO_LAYERS=two, ACT=act, BLOCK_H1=128, BLOCK_H2=32,
                      BLOCK_N=16)
        kernel, secs = compile_one(gt._bounds_bwd_kernel.fn, consts, 8,
                                   ints=("B", "N", "NCOL", "H1", "H2", "N_KEY", "NCOL_KEY", "B_KEY"),
                                   int_ptrs=("perm_ptr",))
        print(f"gathered idx={idx} nf={nf} layers={1 + two} act={act}: fwd {report} | bwd "
              f"{ptxas_report(kernel)}", flush=True)
        n += 2
    from mdm_kernels.ops import gradient_penalty as gpk
    for gather, gram, two, act in itertools.product((False, True), (False, True),
                                                    (False, True), acts):
        consts = dict(M_TERMS=3 if gather else 1, GATHER=gather, ATOMIC=gather,
                      TWO_LAYERS=two, GRAM=gram, ONE_SIDED=False, ACT=act, COMPUTE_GRAD=True,
                      DOT_PREC=gpk.DOT_PRECISION, BLOCK_N=16, BH1=128, BH2=128,
                      BK=128 if gram else 64, BHO=128)
        kernel, secs = compile_one(gpk._gp_kernel, consts, 8,
                                   ints=("N", "JB", "H1", "H2", "K", "N_BUCKET", "PSTRIDE"),
                                   floats=("inv_n",), i32_ptrs=("mi_ptr",))
        print(f"gp gather={gather} gram={gram} layers={1 + two} act={act}: "
              f"{ptxas_report(kernel)}  ({secs:.1f}s)", flush=True)
        n += 1
    print(f"compiled {n} variants for sm_90 with triton {triton.__version__}")


if __name__ == "__main__":
    sys.exit(main())

"""Small driver for compute-sanitizer (memcheck, racecheck) over every CUDA kernel of
mdm_kernels._cuda: each estimator × negatives mode ("distinct" included) × dtype, forward +
backward (tanh, H = 37; relu, H = 300 in float32), and the gradient-penalty ops, on small odd
shapes (80 bound runs, 4 GP runs).  Run by python/check_cuda.sh; exits non-zero on a
Python-level failure (the sanitizer reports memory errors and races itself), 2 without a
GPU or the extension.

``--quick`` (the GPU lease, ``python/gpu_lease.py``: compute-sanitizer slows every launch
down by orders of magnitude): float32 and bfloat16 only with tanh, negatives "shuffle",
"all" and "distinct"; relu at H = 300 on "all" only — every kernel still launches (34 bound
runs, 4 GP runs).
"""
from __future__ import annotations

import sys

import torch

import mdm_kernels as mk
from mdm_kernels.ops import cuda_backend, cuda_ops
from mdm_kernels.reference.estimators import KINDS, resolve_samples


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    unknown = [a for a in argv if a != "--quick"]
    if unknown:
        print(f"check_cuda_driver.py: error: unknown argument {unknown[0]!r} (only --quick)",
              file=sys.stderr)
        return 2
    quick = "--quick" in argv
    if not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2
    if not cuda_backend.is_built():
        print(f"extension not built: {cuda_ops.IMPORT_ERROR}", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    dims, batch = (5, 3, 6), 7
    runs = 0
    # hidden 37: four sample groups per backward block; 300: one group, two units per thread
    all_dtypes = ((torch.float32, torch.bfloat16) if quick
                  else (torch.float32, torch.float16, torch.bfloat16))
    modes = ("shuffle", "all", "distinct") if quick else ("shuffle", 2, "all", "distinct")
    for act, hidden, dtypes in (("tanh", 37, all_dtypes), ("relu", 300, (torch.float32,))):
        critic = mk.MLPCritic(dims, hidden=(hidden,), activation=act).cuda()
        for dtype in dtypes:
            zs = [torch.randn(batch, d, device="cuda", dtype=dtype, requires_grad=True)
                  for d in dims]
            for kind in KINDS:
                for negatives in (modes if act == "tanh" or not quick else ("all",)):
                    samples = resolve_samples(kind, zs, negatives, None, None)
                    joint, marg = cuda_backend.fused_dependency_terms(kind, critic, zs, samples)
                    (0.5 * joint - 1.5 * marg).backward()
                    runs += 1
        joint = [torch.randn(11, d, device="cuda", requires_grad=True) for d in dims]
        marginal = [torch.randn(11, d, device="cuda", requires_grad=True) for d in dims]
        eps = torch.rand(11, device="cuda")
        for one_sided in (False, True):
            cuda_backend.fused_gradient_penalty(critic, joint, marginal, eps, one_sided).backward()
            runs += 1
    torch.cuda.synchronize()
    print(f"driver: {runs} forward+backward runs completed")
    return 0


if __name__ == "__main__":
    sys.exit(main())

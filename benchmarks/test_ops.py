"""Paper scale: every estimator's loss and the gradient penalty alone, fwd + bwd,
MLPCritic with 1 and 2 hidden layers, m = 3 (and m = 2 next to the peer library),
B = 32-256, "shuffle" and K = 8 — eager reference, torch.compile, Triton, CUDA, torch-mist."""
from _ops_common import run_op_row

SECTION = "paper"


def test_op(benchmark, op_row, sizes, bench_disabled):
    run_op_row(benchmark, op_row, sizes, bench_disabled)

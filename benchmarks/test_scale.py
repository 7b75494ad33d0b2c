"""Scale sweeps: "all" negatives (m = 2 up to B = 65,536; m = 3 up to B^3 = 10^9 samples on a
GPU), "distinct" negatives (pairwise distinct indices, same sizes, one hidden layer) and the
gradient penalty at B = 256 / 4,096 — eager, torch.compile, Triton, CUDA, torch-mist.  Eager rows whose predicted memory exceeds the card are skipped with the estimate;
real out-of-memory errors are skipped with the message."""
from _ops_common import run_op_row

SECTION = "sweep"


def test_scale(benchmark, op_row, sizes, bench_disabled):
    run_op_row(benchmark, op_row, sizes, bench_disabled)

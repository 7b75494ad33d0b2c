"""Benchmark suite configuration: device, sizes by device, parametrisation, options.

    pytest benchmarks/ --benchmark-only          # measure (GPU: full grid; CPU: small sizes)
    pytest benchmarks/ --benchmark-disable       # smoke test: each body once, tiny sizes
    pytest benchmarks/ --benchmark-only --bench-sizes quick

Sizes: ``--bench-sizes full|quick|smoke``; default ``full`` (which is already small on a CPU),
``smoke`` under ``--benchmark-disable``.  Rows that cannot run here (no GPU, backend not
built, peer library absent, out of memory) are *skipped with the reason*.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

import mdm_bench as mb  # noqa: E402

if not mb.ON_GPU:
    # CPU rows use MDM_BENCH_CPU_THREADS intra-op threads (default 1): on a small shared
    # machine OpenMP threads that get descheduled make a 10 ms step take 1 s.
    torch.set_num_threads(int(os.environ.get("MDM_BENCH_CPU_THREADS", "1")))


def pytest_addoption(parser):
    group = parser.getgroup("mdm_kernels benchmarks")
    group.addoption("--bench-sizes", choices=("full", "quick", "smoke"), default=None,
                    help="size grid (default: full; smoke under --benchmark-disable)")


def bench_sizes(config) -> str:
    sizes = config.getoption("--bench-sizes")
    if sizes:
        return sizes
    return "smoke" if _disabled(config) else "full"


def _disabled(config) -> bool:
    try:
        return bool(config.getoption("benchmark_disable"))
    except ValueError:
        return True


def pytest_report_header(config):
    return (f"mdm_kernels benchmarks: device {mb.device_name()} ({mb.DEVICE.type}), "
            f"sizes {bench_sizes(config)}, torch {torch.__version__}, "
            f"{torch.get_num_threads()} CPU threads")


def pytest_generate_tests(metafunc):
    sizes = bench_sizes(metafunc.config)
    if "op_row" in metafunc.fixturenames:
        section = getattr(metafunc.module, "SECTION", "paper")
        cases = mb.paper_cases(sizes) if section == "paper" else mb.sweep_cases(sizes)
        rows = [(c, b) for c in cases for b in mb.OP_BACKENDS]
        metafunc.parametrize("op_row", rows, ids=[f"{c.id()}-{b}" for c, b in rows])


@pytest.fixture
def sizes(request):
    return bench_sizes(request.config)


@pytest.fixture
def bench_disabled(request):
    return _disabled(request.config)


@pytest.fixture(autouse=True)
def _seed_and_clean():
    torch.manual_seed(0)
    yield
    if mb.ON_GPU:  # return cached blocks between rows (gc.collect is slow: GPU only)
        mb._free()

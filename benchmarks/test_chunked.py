"""Issue 27's table: ``"all"`` negatives in bounded memory off the fused kernels — the chunked
plain-torch path (``backend="chunked"``) beside the eager reference and ``torch.compile`` of
it, MINE/DV loss forward + backward, time and peak memory from the same run.

Cases (the issue's): m = 2, d = H = 128, B = 1,024 / 2,048 / 4,096; m = 3, d = 64, H = 128,
B = 64 / 128 / 256 (the paper's scale).  Targets on a 2-core CPU (measured here, never
asserted): m = 3, B = 256 and m = 2, B = 4,096 under 1 GB peak; m = 3, B = 128 at least 3x
faster than the reference with at least 10x less peak memory.

Reference rows run only where the reference's memory guard lets them
(:func:`mdm_kernels.reference.estimators.check_memory`: its stated estimate against the
available memory or ``MDM_REFERENCE_MAX_BYTES``); on a CPU this benchmark plans for at most
8 GiB (``MDM_REFERENCE_MAX_BYTES=8e9`` unless set: the machine is shared), so the larger
rows are skipped with the guard's message — the size needed and the alternatives.
``torch.compile`` rows are skipped with the same reason (they trace the same reference).
"""
from __future__ import annotations

import os

import pytest
import torch

import mdm_bench as mb

SECTION = "chunked"

#: (m, d, H, B) of the issue's table.
ISSUE_CASES = ((2, 128, 128, 1024), (2, 128, 128, 2048), (2, 128, 128, 4096),
               (3, 64, 128, 64), (3, 64, 128, 128), (3, 64, 128, 256))

#: On a CPU the eager/compile rows plan for at most this (bytes), unless
#: MDM_REFERENCE_MAX_BYTES is set.
CPU_REFERENCE_LIMIT = "8e9"

BACKENDS = ("eager", "compile", "chunked")


def chunked_cases(sizes: str) -> list[mb.OpCase]:
    if sizes == "smoke":
        picked = ((2, 128, 128, 64), (3, 64, 128, 16))
    elif sizes == "quick":
        picked = ((2, 128, 128, 1024), (3, 64, 128, 64), (3, 64, 128, 128))
    else:
        picked = ISSUE_CASES
    return [mb.OpCase("mine", b, (d,) * m, (h,), "all", SECTION) for m, d, h, b in picked]


def _sizes(config) -> str:
    """``--bench-sizes``, else smoke under ``--benchmark-disable`` and full otherwise (the
    rule of benchmarks/conftest.py)."""
    sizes = config.getoption("--bench-sizes")
    if sizes:
        return sizes
    try:
        disabled = bool(config.getoption("benchmark_disable"))
    except ValueError:
        disabled = True
    return "smoke" if disabled else "full"


def pytest_generate_tests(metafunc):
    if "chunked_row" in metafunc.fixturenames:
        rows = [(c, b) for c in chunked_cases(_sizes(metafunc.config)) for b in BACKENDS]
        metafunc.parametrize("chunked_row", rows, ids=[f"{c.id()}-{b}" for c, b in rows])


def _reference_skip_reason(case: mb.OpCase, critic, zs) -> str | None:
    """The reference's own guard for this row, or None when it may run."""
    from mdm_kernels.reference import estimators as ref
    samples = ref.resolve_samples("dv", zs, case.negatives, None, None)
    try:
        ref.check_memory("dv", critic, zs, samples)
    except ref.GridTooLarge as exc:
        return f"reference memory guard: {exc}"
    return None


def test_chunked(benchmark, chunked_row, sizes, bench_disabled, monkeypatch):
    case, backend = chunked_row
    if not mb.ON_GPU and not os.environ.get("MDM_REFERENCE_MAX_BYTES"):
        monkeypatch.setenv("MDM_REFERENCE_MAX_BYTES", CPU_REFERENCE_LIMIT)
    if backend == "compile" and sizes == "smoke":
        pytest.skip("smoke run: torch.compile rows need 15-40 s of compilation each on a "
                    "CPU; they run with --benchmark-only")
    critic, zs = mb.make_inputs(case)
    if backend in ("eager", "compile"):
        reason = _reference_skip_reason(case, critic, zs)
        if reason:
            pytest.skip(reason)
    step = mb.make_op_step(case, backend, critic, zs)
    from mdm_kernels.dispatch import CHUNKED_AUTO_MIN_GRID
    info = {"section": case.section, "op": case.op, "m": case.m, "dims": list(case.dims),
            "hidden": list(case.hidden), "hidden_layers": len(case.hidden),
            "batch": case.batch, "negatives": case.negatives, "family": case.family(),
            "num_marginal_samples": case.num_marginal(), "gp_rows": 0, "sizes": sizes,
            "torch_version": torch.__version__,
            "auto_picks_chunked": case.num_marginal() >= CHUNKED_AUTO_MIN_GRID}
    try:
        mb.run_row(benchmark, step, key=case.key(), backend=backend,
                   flops=mb.nominal_flops(case), disabled=bench_disabled, info=info,
                   pair_hidden=case.num_marginal() * case.hidden[0])
    except mb.OOM as exc:
        pytest.skip(str(exc))
    except Exception as exc:
        if backend == "compile":
            first = str(exc).strip().splitlines()[0][:240] if str(exc).strip() else ""
            pytest.skip(f"torch.compile cannot run this step ({type(exc).__name__}: {first})")
        raise

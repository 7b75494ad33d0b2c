"""Benchmark suite configuration: device, sizes by device, parametrisation, options.

    pytest benchmarks/ --benchmark-only          # measure (GPU: full grid; CPU: small sizes)
    pytest benchmarks/ --benchmark-disable       # smoke test: each body once, tiny sizes
    pytest benchmarks/ --benchmark-only --bench-sizes quick

Sizes: ``--bench-sizes full|quick|smoke``; default ``full`` (which is already small on a CPU),
``smoke`` under ``--benchmark-disable``.  Rows that cannot run here (no GPU, backend not
built, peer library absent, out of memory) are *skipped with the reason*.

Unless benchmarking is disabled, the run ends with a compact summary
(:func:`mdm_kernels.bench.summary_lines`): each workload's backends side by side with their
ratios against eager and ``torch.compile`` and their peak memory, and the skipped rows grouped
by reason, under a plain-words legend.  The summary is also written to
``.benchmarks/mdm_summary.txt`` (``--bench-summary FILE`` elsewhere), and the run's very last
line says where, so it is found without scrolling through the per-row table.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

import mdm_bench as mb  # noqa: E402

from mdm_kernels.bench import summary_lines  # noqa: E402

#: ``extra_info`` of every measured row of this session, for the end-of-run summary.
_MEASURED: list[dict] = []

if not mb.ON_GPU:
    # CPU rows use MDM_BENCH_CPU_THREADS intra-op threads (default 1): on a small shared
    # machine OpenMP threads that get descheduled make a 10 ms step take 1 s.
    torch.set_num_threads(int(os.environ.get("MDM_BENCH_CPU_THREADS", "1")))


def pytest_addoption(parser):
    group = parser.getgroup("mdm_kernels benchmarks")
    group.addoption("--bench-sizes", choices=("full", "quick", "smoke"), default=None,
                    help="size grid (default: full; smoke under --benchmark-disable)")
    group.addoption("--bench-summary", default=None, metavar="FILE",
                    help="also write the end-of-run summary to FILE (default: "
                         ".benchmarks/mdm_summary.txt under the rootdir)")


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


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.when == "call" and report.passed:
        info = getattr(getattr(item, "funcargs", {}).get("benchmark"), "extra_info", None)
        if info and info.get("median_s") is not None:
            _MEASURED.append(dict(info))


def _skip_reason(report) -> str:
    longrepr = report.longrepr
    text = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
    return text[len("Skipped: "):] if text.startswith("Skipped: ") else text


#: How to read the summary's lines, in plain words (replaces summary_lines' one-line legend).
LEGEND = [
    "How to read it: one line per workload and batch size B, one cell per backend:",
    "  'compile 1.61 ms, 182 kB (2.92× eager, mem ÷1.27 eager)' = median time of one forward +",
    "  backward step, peak memory of that step, then ratios against another backend of the same",
    "  line: '2.92× eager' = 2.92 times as fast as eager (below 1: slower); 'mem ÷1.27 eager' =",
    "  eager's peak memory divided by this cell's, i.e. 1.27 times less memory than eager",
    "  (below 1: more memory than eager).",
]


def _summary_path(config) -> Path:
    given = config.getoption("--bench-summary")
    return Path(given) if given else Path(config.rootpath) / ".benchmarks" / "mdm_summary.txt"


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if _disabled(config):
        return
    skipped = [{"test": r.nodeid, "reason": _skip_reason(r)} for r in terminalreporter.stats.get("skipped", [])]
    if not _MEASURED and not skipped:
        return
    title = f"mdm_kernels benchmark summary: {mb.device_name()}"
    lines = summary_lines(_MEASURED, skipped, gpu=mb.ON_GPU)
    if _MEASURED and lines and "N× eager / compile" in lines[0]:
        # keep the row count and the memory method, say the rest in plain words
        lines = [lines[0].split("; N× eager")[0] + "."] + LEGEND + lines[1:]
    terminalreporter.write_sep("=", title)
    for line in lines:
        terminalreporter.write_line(line)
    path = _summary_path(config)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join([title, ""] + lines) + "\n", encoding="utf-8")
        config._mdm_summary_path = path
    except OSError as exc:
        terminalreporter.write_line(f"(could not write the summary to {path}: {exc})")


def pytest_unconfigure(config):
    path = getattr(config, "_mdm_summary_path", None)
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if path is not None and reporter is not None:  # the run's last line: where the summary is
        reporter.write_line(f"mdm_kernels benchmark summary: {path} (printed above under "
                            f"'mdm_kernels benchmark summary')")

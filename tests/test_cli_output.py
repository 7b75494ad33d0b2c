"""What a user sees from the real command lines (subprocesses): one-line errors with exit
status 2, plain per-epoch lines in piped output, the benchmark summary at the end of
``pytest benchmarks/``."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _run(args, env=None, timeout=300):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=timeout)


@pytest.mark.parametrize("args, needle", [
    (["-m", "mdm_kernels.train", "--dataset", "synthetic", "--epochs", "1", "--penalty", "mine",
      "--backend", "triton", "--out", "{tmp}/run"], "--backend triton: "),
    (["-m", "mdm_kernels.train.analyze", "critic", "{tmp}/nothing", "--out", "{tmp}/o"], "no checkpoint"),
    (["-m", "mdm_kernels.bench", "--out", "{tmp}/file/results"], "--out {tmp}/file/results: "),
])
def test_user_errors_are_one_line(args, needle, tmp_path):
    if torch.cuda.is_available() and "triton" in args:
        pytest.skip("a GPU is present: the Triton backend can run")
    (tmp_path / "file").write_text("x")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # Triton cannot run on CPU
    proc = _run([a.format(tmp=tmp_path) for a in args], env=env)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert ": error: " in lines[0] and needle.format(tmp=tmp_path) in lines[0]


def test_piped_training_prints_plain_epoch_lines(tmp_path):
    proc = _run(["-m", "mdm_kernels.train", "--dataset", "synthetic", "--epochs", "2", "--d", "4",
                 "--hidden", "8", "--batch-size", "128", "--out", str(tmp_path)])
    assert proc.returncode == 0, proc.stderr
    assert "\r" not in proc.stdout and "\r" not in proc.stderr  # no progress-bar frames
    epochs = [ln for ln in proc.stdout.splitlines() if ln.startswith("epoch ")]
    assert len(epochs) == 2 and "val MAE" in epochs[0]


@pytest.mark.slow
def test_benchmark_summary_at_the_end_of_pytest(tmp_path):
    saved = tmp_path / "summary.txt"
    proc = _run(["-m", "pytest", "benchmarks/test_ops.py", "--benchmark-only", "--bench-sizes", "smoke",
                 "-q", "-p", "no:cacheprovider", "-k", "mine and B32 and not compile",
                 "--bench-summary", str(saved)], timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:]
    out = proc.stdout
    summary = out[out.index("mdm_kernels benchmark summary"):]
    assert "Paper scale, m = 3" in summary and "B=32: eager " in summary
    # a plain legend instead of "N× eager / compile ... mem ÷: its peak memory divided by ..."
    assert "How to read it" in summary and "times less memory than eager" in summary
    assert "N× eager / compile" not in summary
    # findable: written to a file, whose path is the run's last line
    assert "B=32: eager " in saved.read_text(encoding="utf-8")
    assert out.strip().splitlines()[-1] == (f"mdm_kernels benchmark summary: {saved} (printed above "
                                            "under 'mdm_kernels benchmark summary')")
    if not torch.cuda.is_available():
        assert "skipped rows, by reason:" in summary and "rows are GPU-only" in summary
        # CPU memory is torch's allocator, not one 4 kB page
        mem = [ln for ln in summary.splitlines() if "B=32: eager" in ln]
        assert mem and all(" kB" in ln or " MB" in ln for ln in mem)
        assert not any(", 4.1 kB" in ln or ", 8.19 kB" in ln for ln in mem)

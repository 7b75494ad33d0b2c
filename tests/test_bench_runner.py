"""The benchmark runner's writers, from a small synthetic pytest-benchmark JSON (no real
benchmarking here)."""
import json
import sys

import pytest

from mdm_kernels import bench


def _bench(key, family, section, op, batch, backend, median, mem, **extra):
    info = {"key": key, "family": family, "section": section, "op": op, "batch": batch,
            "backend": backend, "median_s": median, "peak_mem_bytes": mem, "m": 3,
            "dims": [64, 64, 64], "hidden": [128], "negatives": "shuffle",
            "flops_per_s": 1e9, "compile_s": 0.5, "device": "NVIDIA H200"}
    info.update(extra)
    return {"name": f"test_op[{key}-{backend}]", "group": key, "params": {},
            "stats": {"median": median * 1.1, "rounds": 10}, "extra_info": info}


@pytest.fixture
def synthetic_json(tmp_path):
    benches = []
    fam = "paper/mine/m3-d64x64x64-H128-shuffle"
    for b, scale in ((32, 1.0), (64, 1.5), (128, 2.0)):
        key = f"{fam}/B{b}"
        benches.append(_bench(key, fam, "paper", "mine", b, "eager", 2e-3 * scale, 4e6 * scale))
        benches.append(_bench(key, fam, "paper", "compile", b, "compile", 1e-3 * scale,
                              2e6 * scale))
        # the fused row carries no ratios: the writer must derive them from the same key
        benches.append(_bench(key, fam, "paper", "mine", b, "triton", 2e-4 * scale, 1e6,
                              kernels_per_step=4, peak_share_fp32=0.01))
    benches.append(_bench("train/lf_lstm/mine/B32", "train/lf_lstm/mine", "train",
                          "train-step-mine", 32, "eager", 5e-3, 8e6, model="lf_lstm",
                          penalty="mine"))
    path = tmp_path / "pb.json"
    path.write_text(json.dumps({"benchmarks": benches, "machine_info": {"node": "x"}}))
    return path


def test_write_results_files(synthetic_json, tmp_path):
    meta = {"device": "NVIDIA H200", "date": "2025-01-02", "gpu": True, "torch": "2.13.0",
            "triton": "3.9.0", "cuda": "13.0", "driver": "580.1", "python": "3.11"}
    skipped = [{"test": "a", "reason": "cuda rows are GPU-only"},
               {"test": "b", "reason": "cuda rows are GPU-only"}]
    out = tmp_path / "results"
    paths = bench.write_results(synthetic_json, out, meta, skipped)
    assert paths["json"] == out / "nvidia-h200-2025-01-02.json"
    assert paths["markdown"] == out / "nvidia-h200-2025-01-02.md"
    assert len(paths["plots"]) == 1  # the train family has a single B: no plot
    png = paths["plots"][0]
    assert png.parent == out / "nvidia-h200-2025-01-02"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    record = json.loads(paths["json"].read_text())
    assert record["meta"]["device"] == "NVIDIA H200"
    triton = [r for r in record["rows"] if r["backend"] == "triton" and r["batch"] == 32][0]
    assert triton["speedup_vs_eager"] == pytest.approx(10.0)
    assert triton["speedup_vs_compile"] == pytest.approx(5.0)
    assert triton["mem_ratio_vs_eager"] == pytest.approx(4.0)
    assert len(record["skipped"]) == 2

    md = paths["markdown"].read_text()
    for text in ("NVIDIA H200", "580.1", "2.13.0", "3.9.0", "13.0", "## Paper scale",
                 "## End-to-end training step", "10.00×", "5.00×", "| 2 | cuda rows are GPU-only |",
                 "nvidia-h200-2025-01-02/", "kernels"):
        assert text in md, text
    assert "CPU figures" not in md


def test_cpu_label_and_slug(synthetic_json, tmp_path):
    name = "CPU Intel(R) Xeon(R) Platinum 8480C"
    meta = {"device": name, "date": "2025-01-02", "gpu": False, "torch": "2.13.0+cpu"}
    paths = bench.write_results(synthetic_json, tmp_path, meta)
    assert paths["markdown"].name == "cpu-intel-xeon-platinum-8480c-2025-01-02.md"
    md = paths["markdown"].read_text()
    assert "CPU figures" in md and "kernels" not in md.split("## Paper")[1].splitlines()[2]
    assert bench.device_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"


def test_junit_skips(tmp_path):
    xml = tmp_path / "j.xml"
    xml.write_text('<testsuites><testsuite><testcase name="t1"><skipped message="no GPU"/>'
                   '</testcase><testcase name="t2"/></testsuite></testsuites>')
    assert bench.parse_junit_skips(xml) == [{"test": "t1", "reason": "no GPU"}]
    assert bench.parse_junit_skips(tmp_path / "missing.xml") == []


def test_formatting():
    assert bench.fmt_time(2.5e-3) == "2.5 ms"
    assert bench.fmt_time(3e-6) == "3 µs"
    assert bench.fmt_bytes(24e6) == "24 MB"
    assert bench.fmt_ratio(None) == "—"


def test_target_table():
    """Issue 7's targets read the fused rows of their workloads, derive the verdict from the
    ratios, and stay silent when no fused row of a target ran (CPU runs)."""
    base = dict(section="paper", op="mine", m=3, hidden=[128], negatives="shuffle", batch=256)
    rows = [dict(base, backend="triton", key="k", median_s=2e-4, speedup_vs_eager=12.0,
                 speedup_vs_compile=9.0, peak_mem_bytes=1e6, kernels_per_step=5,
                 triton_path="single"),
            dict(base, backend="cuda", key="k", median_s=1e-3, speedup_vs_eager=3.0,
                 speedup_vs_compile=2.0, peak_mem_bytes=1e6),
            dict(section="sweep-m2", op="mine", hidden=[128], batch=16384, backend="triton",
                 key="s", median_s=0.02, speedup_vs_compile=6.0, peak_mem_bytes=2e9)]
    lines = bench.target_table(rows)
    body = [ln for ln in lines if ln.startswith("| ") and "verdict" not in ln]
    assert len(body) == 3
    assert "triton (single)" in body[0] and body[0].endswith("| met |")
    assert body[1].startswith("| penalty step") and body[1].endswith("| missed |")
    assert "16,384" in body[2] and body[2].endswith("| missed |")  # 2 GB > 1 GB
    assert bench.target_table([dict(base, backend="eager", key="k", median_s=1.0)]) == []


def _suite_helpers():
    import os
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks"))
    import mdm_bench
    return mdm_bench


def test_peer_installed_but_broken_is_an_error(tmp_path, monkeypatch):
    """A torch-mist that is on the path but does not import (the old recipe: no sklearn)
    raises with the recipe instead of skipping every peer row; an absent one is a skip."""
    mb = _suite_helpers()
    case = mb.OpCase("mine", 32, (64, 64), (128,), "shuffle", "paper-m2")
    monkeypatch.delitem(sys.modules, "torch_mist", raising=False)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if "mist" not in p])
    if mb.import_peer() is None:  # not installed here: the row is a skip with the recipe
        assert "not installed" in mb.peer_unavailable(case)
        assert "scikit-learn" in mb.peer_unavailable(case)
    broken = tmp_path / "torch_mist"
    broken.mkdir()
    (broken / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'sklearn'\")\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(mb.PeerImportError, match="installed .* but does not import.*sklearn"):
        mb.peer_unavailable(case)
    # no equivalent in the peer library: still a skip, whatever the installation
    assert "m = 3" in mb.peer_unavailable(mb.OpCase("mine", 32, (64,) * 3, (128,), "all", "sweep-m3"))


def test_peer_rows_of_a_different_estimator_are_labelled(synthetic_json, tmp_path):
    mb = _suite_helpers()
    assert mb.peer_estimator_note(mb.OpCase("infonce", 32, (64, 64), (128,), 8, "paper-m2"))
    assert mb.peer_estimator_note(mb.OpCase("infonce", 32, (64, 64), (128,), "all",
                                            "sweep-m2")) is None
    assert mb.peer_estimator_note(mb.OpCase("mine", 32, (64, 64), (128,), 8, "paper-m2")) is None
    row = _bench("k", "f", "paper-m2", "infonce", 32, "torch-mist", 1e-3, 1e6,
                 peer_estimator="≠ estimator: peer candidates exclude the positive")
    md = bench.markdown([row["extra_info"]], {"device": "x", "date": "d", "gpu": False})
    assert "torch-mist (≠ estimator: peer candidates exclude the positive)" in md


def test_summary_lines(synthetic_json):
    """The end-of-run summary: backends side by side with ratios derived from the same
    workload, memory, and the skipped rows grouped by reason (most frequent first)."""
    rows = [dict(b["extra_info"], op="train-step-mine" if b["extra_info"]["section"] == "train" else "mine")
            for b in json.loads(synthetic_json.read_text())["benchmarks"]]
    skipped = [{"test": "a", "reason": "cuda rows are GPU-only"}, {"test": "b", "reason": "cuda rows\nare GPU-only"},
               {"test": "c", "reason": "torch-mist not installed"}]
    lines = bench.summary_lines(rows, skipped, gpu=True)
    b32 = [ln for ln in lines if ln.strip().startswith("B=32:")]
    assert len(b32) == 2  # the paper workload and the training step
    cells = b32[0].split(" | ")
    assert cells[0].endswith("eager 2 ms, 4 MB (0.50× compile, mem ÷0.50 compile)")
    assert cells[1] == "compile 1 ms, 2 MB (2.00× eager, mem ÷2.00 eager)"
    assert cells[2] == "triton 200 µs, 1 MB (10.00× eager, 5.00× compile, mem ÷4.00 eager, mem ÷2.00 compile)"
    assert "Paper scale, m = 3 (estimator loss or gradient penalty, fwd + bwd):" in lines
    i = lines.index("3 skipped rows, by reason:")
    assert lines[i + 1:] == ["      2  cuda rows are GPU-only", "      1  torch-mist not installed"]
    assert bench.summary_lines([], [])[0] == "no measured rows"


def test_cpu_peak_memory_sees_torch_allocations():
    """Two live 4 MiB tensors then a 2 MiB one: the working peak is 8 MiB (tracemalloc would
    report a few hundred bytes, RSS sampling whatever pages glibc did not reuse)."""
    import torch

    def step():
        a = torch.ones(2**20)
        b = torch.ones(2**20)
        del a, b
        return torch.ones(2**19)

    peak = bench.torch_cpu_peak_bytes(step)
    assert 8 * 2**20 <= peak < 8 * 2**20 + 2**16


@pytest.mark.parametrize("argv, needle", [
    (["--out", "{file}"], "--out {file}: exists and is not a directory"),
    (["--out", "{file}/results"], "--out {file}/results: a parent of it is a file"),
    (["--suite", "{tmp}", "--out", "{tmp}/r"], "--suite {tmp}: no benchmark suite there"),
    (["--bogus"], "unrecognized arguments: --bogus (see --help)"),
    (["--timeout", "0", "--out", "{tmp}/r"], "--timeout must be a positive number"),
    (["--ids", "{tmp}/none.txt", "--out", "{tmp}/r"], "--ids {tmp}/none.txt:"),
    (["--ids", "{file}", "--out", "{tmp}/r"], "no node ids in the file"),
    (["--quick", "--sizes", "full", "--out", "{tmp}/r"], "--quick contradicts --sizes full"),
    (["--stem", "a/b", "--out", "{tmp}/r"], "--stem 'a/b'"),
])
def test_runner_user_errors_are_one_line(argv, needle, tmp_path, capsys):
    (tmp_path / "file").write_text("# comments only\n")
    fill = dict(file=tmp_path / "file", tmp=tmp_path)
    with pytest.raises(SystemExit) as e:
        bench.main([a.format(**fill) for a in argv])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err and "usage:" not in err, err
    assert err.startswith("python -m mdm_kernels.bench: error: ") and needle.format(**fill) in err


def test_rows_file_gives_the_tables_after_a_timeout(tmp_path):
    """The rows the plugin appends while the suite runs (one JSON line per finished row, a
    line cut by the kill ignored) become the result files when pytest wrote no JSON."""
    key = "paper/mine/m3-d64x64x64-H128-shuffle/B256"
    rows = tmp_path / "bench.rows.jsonl"
    lines = []
    for backend, median in (("eager", 4e-3), ("triton", 4e-4)):
        info = {"key": key, "family": key.rsplit("/", 1)[0], "section": "paper", "op": "mine",
                "batch": 256, "backend": backend, "median_s": median, "peak_mem_bytes": 1e6,
                "m": 3, "dims": [64, 64, 64], "hidden": [128], "negatives": "shuffle"}
        lines.append(json.dumps({"test": f"benchmarks/test_ops.py::test_op[x-{backend}]",
                                 "outcome": "passed", "when": "call", "extra_info": info,
                                 "group": key, "stats": {"median": median, "rounds": 10}}))
    lines.append(json.dumps({"test": "benchmarks/test_ops.py::test_op[x-cuda]",
                             "outcome": "skipped", "when": "setup", "reason": "not built"}))
    lines.append('{"test": "cut by the ki')
    rows.write_text("\n".join(lines))
    pb, skipped = bench.read_rows(rows)
    assert len(pb["benchmarks"]) == 2 and skipped == [{"test": "test_op[x-cuda]",
                                                       "reason": "not built"}]
    meta = {"device": "NVIDIA H200", "date": "2026-12-02", "gpu": True}
    paths = bench.write_results(pb, tmp_path / "out", meta, skipped, stem="bench")
    record = json.loads(paths["json"].read_text())
    triton = [r for r in record["rows"] if r["backend"] == "triton"][0]
    assert triton["speedup_vs_eager"] == pytest.approx(10.0)
    assert "not built" in paths["markdown"].read_text()

"""What a new user hit (issue 26), through the real entry points in subprocesses: Ctrl-C before
the first checkpoint, options that would have no effect, --negatives distinct, one --debug
rule, no empty --out left by a refused run, the analyze alias, plain piped output."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TRAIN = [sys.executable, "-m", "mdm_kernels.train"]
SMALL = ["--dataset", "synthetic", "--d", "4", "--hidden", "8", "--batch-size", "128", "--quiet"]


def _run(args, timeout=300, env=None):
    return subprocess.run(args, capture_output=True, text=True, cwd=ROOT, timeout=timeout,
                          env=env)


def _refused(proc, *needles):
    """A refused input: exit status 2, ONE stderr line naming what was wrong, no traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert ": error: " in lines[0]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


# ------------------------------------------------------------------ 1. Ctrl-C before epoch 1

def _interrupt_when_configured(out, run) -> tuple[subprocess.Popen, str]:
    """Start a training run and send it SIGINT (a Ctrl-C at the terminal) as soon as
    OUT/config.json appears.  The child gets SIGINT's default disposition: a test run started
    in the background by a non-interactive shell (``cmd &``, as a CI runner may) inherits SIGINT
    *ignored*, and Python then never raises KeyboardInterrupt -- the run would just go on."""
    proc = subprocess.Popen(TRAIN + run + ["--out", str(out)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 120
        # the configuration is on disk before the data is even loaded: interrupt right then
        while not (out / "config.json").is_file() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc, err


@pytest.mark.slow
def test_ctrl_c_before_the_first_checkpoint_resumes_with_the_runs_configuration(tmp_path):
    run = ["--model", "ef_lstm", "--text-features", "utterance", "--epochs", "2", "--batch-size", "16",
           "--d", "8", "--hidden", "16", "--lr", "0.002"]
    # on a machine loaded enough that this process sleeps through a whole epoch of the child,
    # the interrupt would land after the first checkpoint: try again
    for attempt in range(3):
        out = tmp_path / f"run{attempt}"
        proc, err = _interrupt_when_configured(out, run)
        assert (out / "config.json").is_file(), "the run's configuration was not written before epoch 1"
        if not (out / "last.pt").exists():
            break
    else:
        pytest.fail("interrupted too late three times: epoch 1 had always ended")
    # 130, or death by SIGINT (which a shell also reports as 130): when the interrupt lands
    # inside an import that runs code through CPython's PyRun_* path, CPython remembers an
    # "unhandled" KeyboardInterrupt even though main() caught it, and re-kills itself with
    # SIGINT at exit after main's message (seen under load, 1 run in ~10)
    assert proc.returncode in (130, -signal.SIGINT), err[-2000:]
    assert err.strip().splitlines()[-1] == f"interrupted; continue with --resume --out {out}"

    resumed = _run(TRAIN + ["--resume", "--out", str(out), "--quiet"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    cfg = json.loads((out / "metrics.json").read_text())["config"]
    assert (cfg["model"], cfg["text_features"], cfg["epochs"], cfg["lr"], cfg["d"], cfg["hidden"]) == \
        ("ef_lstm", "utterance", 2, 0.002, 8, 16)
    assert json.loads((out / "metrics.json").read_text())["epochs_run"] == 2


def test_resume_without_a_run_is_refused_in_one_line(tmp_path):
    line = _refused(_run(TRAIN + ["--resume", "--out", str(tmp_path / "nothing")]),
                    "--resume", "last.pt", "config.json")
    assert "(see --help)" not in line
    assert not (tmp_path / "nothing").exists()


def test_resume_from_config_json_keeps_contradiction_checks(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text(json.dumps({"model": "tfn", "dataset": "synthetic", "epochs": 1,
                                                 "d": 4, "hidden": 8, "batch_size": 128}))
    _refused(_run(TRAIN + ["--resume", "--out", str(out), "--model", "lf_lstm"]),
             "--model 'lf_lstm' contradicts the run in", "'tfn'")
    (out / "config.json").write_text("[1, 2]")
    _refused(_run(TRAIN + ["--resume", "--out", str(out)]), "config.json", "not a run configuration")


# ------------------------------------------------------------------ 2. options without effect

@pytest.mark.parametrize("flags, needle", [
    (["--backend", "triton"], "--backend triton has no effect with --penalty none"),
    (["--backend", "cuda"], "--backend cuda has no effect with --penalty none"),
    (["--negatives", "4"], "--negatives 4 has no effect with --penalty none"),
    (["--critic-steps", "3"], "--critic-steps 3 has no effect with --penalty none"),
    (["--penalty", "mine", "--gp-weight", "5"], "--gp-weight 5.0 has no effect with --penalty mine"),
    (["--data-dir", "somewhere"], "--data-dir somewhere has no effect with --dataset synthetic"),
])
def test_ineffective_options_are_refused(flags, needle, tmp_path):
    _refused(_run(TRAIN + SMALL + flags + ["--out", str(tmp_path / "o")]), needle)
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------ 3. --negatives distinct

@pytest.mark.slow
def test_negatives_distinct_trains(tmp_path):
    # B(B-1)(B-2) marginal samples a step on the reference backend: a small batch and critic
    proc = _run(TRAIN + SMALL + ["--penalty", "mine", "--negatives", "distinct", "--epochs", "1",
                                 "--batch-size", "32", "--critic-hidden", "16", "--skip-test",
                                 "--out", str(tmp_path)])
    assert proc.returncode == 0, proc.stderr[-2000:]
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["config"]["negatives"] == "distinct" and m["history"][0]["dependency"] == m["history"][0]["dependency"]


# ------------------------------------------------------------------ 4. one --debug rule

@pytest.mark.slow
@pytest.mark.parametrize("args", [
    TRAIN + ["--epochs", "0"],                                   # a value refused by validation
    TRAIN + ["--model", "bert"],                                 # argparse's own refusal
    TRAIN + ["--resume", "--out", "{tmp}/bad"],                  # a refused checkpoint
    TRAIN + ["--device", "cuda", "--dataset", "synthetic", "--out", "{tmp}/o"],  # refused while running
    [sys.executable, "-m", "mdm_kernels.train.analyze", "critic", "{tmp}/nothing", "--out", "{tmp}/o"],
    [sys.executable, "-m", "mdm_kernels.train.analyze", "sweep", "--seeds", "x", "--out", "{tmp}/o"],
])
def test_debug_shows_the_traceback_of_every_refused_input(args, tmp_path):
    if torch.cuda.is_available() and "cuda" in args:
        pytest.skip("a GPU is present: --device cuda runs")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "last.pt").write_bytes(b"not a checkpoint")
    args = [a.format(tmp=tmp_path) for a in args]
    plain = _run(args)
    line = _refused(plain)
    if "--resume" in args:
        assert "(see --help)" not in line  # not a command-line syntax problem
    debug = _run(args + ["--debug"])  # every refused input: Python's traceback, the same message
    assert debug.returncode == 1, debug.stderr[-2000:]
    assert "Traceback (most recent call last)" in debug.stderr
    message = line.split(": error: ", 1)[1].removesuffix(" (see --help)")
    assert message in debug.stderr.strip().splitlines()[-1]


# ------------------------------------------------------------------ 5. no empty --out

@pytest.mark.parametrize("flags", [
    ["--backend", "cuda", "--penalty", "mine", "--epochs", "1"],
    ["--device", "cuda"],
    ["--data-dir", "{tmp}/nowhere"],
])
def test_refused_runs_leave_no_out_directory(flags, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: these runs are not refused")
    out = tmp_path / "new" / "out"
    small = SMALL[2:] if "--data-dir" in flags else SMALL  # --data-dir: the MOSI reader's refusal
    _refused(_run(TRAIN + small + [f.format(tmp=tmp_path) for f in flags] + ["--out", str(out)]))
    assert not (tmp_path / "new").exists()


def test_refused_analyze_leaves_no_out_directory_but_keeps_an_existing_one(tmp_path):
    out = tmp_path / "analysis"
    _refused(_run([sys.executable, "-m", "mdm_kernels.train.analyze", "critic", str(tmp_path / "none"),
                   "--out", str(out)]), "no checkpoint")
    assert not out.exists()
    out.mkdir()
    _refused(_run([sys.executable, "-m", "mdm_kernels.train.analyze", "critic", str(tmp_path / "none"),
                   "--out", str(out)]), "no checkpoint")
    assert out.is_dir()  # the user's own directory stays


# ------------------------------------------------------------------ 9. small things

def test_analyze_alias_runs_the_same_command(tmp_path):
    help_ = _run([sys.executable, "-m", "mdm_kernels.analyze", "--help"])
    assert help_.returncode == 0 and "{drop,critic,sweep,reproduce}" in help_.stdout
    _refused(_run([sys.executable, "-m", "mdm_kernels.analyze", "critic", str(tmp_path / "none"),
                   "--out", str(tmp_path / "o")]), "no checkpoint")


def test_estimator_demo_writes_no_progress_frames_into_a_pipe():
    proc = _run([sys.executable, "python/estimator_demo.py", "--steps", "3", "--batch-size", "16"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "\r" not in proc.stdout and "\r" not in proc.stderr
    assert "it/s" not in proc.stderr and "true I = " in proc.stdout


def test_sweep_with_one_seed_prints_no_spread():
    from mdm_kernels.train.analysis import sweep_table
    keys = ("acc2", "mae")
    one = sweep_table([{"model": "lf_lstm", "penalty": "none", "n": 1, "acc2": (0.75, 0.0),
                        "mae": (0.9, 0.0)}], keys=keys)
    assert "±" not in one and "| lf_lstm | none | 1 | 0.7500 | 0.9000 |" in one
    two = sweep_table([{"model": "lf_lstm", "penalty": "none", "n": 2, "acc2": (0.75, 0.01),
                        "mae": (0.9, 0.02)}], keys=keys)
    assert "0.7500 ± 0.0100" in two


# ------------------------------------------------------------------ 8. the CUDA extension's build

FAKE_NVCC = """#!/bin/sh
# stands in for nvcc: records each compile/link, writes the output file
case "$1" in --version) echo "fake nvcc, release 0.0"; exit 0;; esac
out=""; prev=""
for a in "$@"; do [ "$prev" = "-o" ] && out="$a"; prev="$a"; done
echo "$*" >> "$NVCC_LOG"
echo "built from $*" > "$out"
"""


def _setup_tree(tmp_path) -> Path:
    """A copy of what setup.py reads (setup.py, pyproject.toml, README.md, csrc/), so that the
    test never writes into the checkout."""
    import shutil
    src = tmp_path / "src"
    shutil.copytree(ROOT / "csrc", src / "csrc")
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    (src / "mdm_kernels").mkdir()
    (src / "mdm_kernels" / "__init__.py").write_text("")
    return src


def test_cuda_build_says_it_compiles_and_skips_an_unchanged_build(tmp_path):
    pytest.importorskip("pybind11")
    src = _setup_tree(tmp_path)
    nvcc = tmp_path / "nvcc"
    nvcc.write_text(FAKE_NVCC)
    nvcc.chmod(0o755)
    log = tmp_path / "nvcc.log"
    env = {**os.environ, "MDM_NVCC": str(nvcc), "MDM_BUILD_CUDA": "1", "NVCC_LOG": str(log)}
    env.pop("MDM_CUDA_REBUILD", None)

    def build(n):  # as pip does: a fresh build directory every time
        proc = subprocess.run([sys.executable, "setup.py", "build_ext", "--build-lib", str(tmp_path / f"lib{n}"),
                               "--build-temp", str(tmp_path / f"tmp{n}")], cwd=src, env=env,
                              capture_output=True, text=True, timeout=300, start_new_session=True)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        built = list((tmp_path / f"lib{n}" / "mdm_kernels").glob("_cuda*"))
        assert len(built) == 1
        calls = log.read_text().splitlines() if log.exists() else []
        return proc.stdout, calls, built[0].read_bytes()

    out1, calls1, so1 = build(1)
    n_sources = len(list((src / "csrc").glob("*.cu"))) + 1
    assert "compiling the CUDA extension" in out1 and "this takes minutes" in out1
    assert len(calls1) == n_sources + 1  # every source compiled, then one link

    out2, calls2, so2 = build(2)  # nothing changed: no nvcc call, the same module
    assert "unchanged since its last build" in out2 and "compiling the CUDA extension" not in out2
    assert calls2 == calls1 and so2 == so1

    header = sorted((src / "csrc").glob("*.h*"))[0]
    header.write_text(header.read_text() + "\n// changed\n")
    out3, calls3, _ = build(3)  # a changed header: compiled again
    assert "compiling the CUDA extension" in out3 and len(calls3) == 2 * len(calls1)


# ------------------------------------------------------------------ 6. benchmark skip advice

@pytest.mark.parametrize("on_gpu", [False, True])
def test_benchmark_skip_advice_works(on_gpu, monkeypatch):
    """A skip reason that says "--bench-sizes X" is only given where X actually runs the row."""
    import re
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import mdm_bench as mb
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    monkeypatch.setattr(mb, "ON_GPU", on_gpu)
    advised = 0
    for sizes in ("full", "quick", "smoke"):
        for case in mb.paper_cases(sizes, on_gpu=on_gpu) + mb.sweep_cases(sizes, on_gpu=on_gpu):
            reason = mb.compile_row_allowed(case, sizes)
            found = re.search(r"--bench-sizes (\w+)", reason or "")
            if found:
                advised += 1
                assert found.group(1) != sizes, (case, sizes, reason)
                assert mb.compile_row_allowed(case, found.group(1)) is None, (case, sizes, reason)
    if not on_gpu:
        assert advised == 0  # on a CPU no size grid compiles the gradient-penalty rows

"""python/gpu_check.sh and python/gpu_lease.py, tested before any GPU sees them (issue 23).

* every stage of both device calls runs end to end on the CPU at reduced sizes (Triton's
  interpreter with the GPU-launch emulation of issue 22, sm_90 with 4 SMs, each autotune
  candidate, NaN-poisoned buffers), and every stage leaves its JSON lines as it goes;
* a call whose budget is spent records its remaining stages as skipped (what a time-out
  keeps);
* the dry run's listing ends with ``compilations: N, estimated device seconds: S``;
* the launch keys follow the JIT's specialisation rules; command-line mistakes are one line
  and exit status 2.
The full-size dry run (~20 s) is CI's own line (``bash python/gpu_check.sh --dry-run``).
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "python"))

import gpu_lease as gl  # noqa: E402

pytestmark = pytest.mark.skipif(torch.cuda.is_available(),
                                reason="the reduced run is the CPU rehearsal (interpreter)")


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def test_every_stage_end_to_end_reduced(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    rc = gl.run_call([1, 2], out, budget=900, reduced=True, plan_path=None, work=work)
    recs = _records(out)
    ends = {r["stage"]: r["stage_end"] for r in recs if "stage_end" in r}
    assert list(ends) == list(gl.STAGES), "every stage of both calls ran, in registry order"
    assert all(v == "done" for v in ends.values()), ends
    assert rc == 0, [r for r in recs if r.get("ok") is False or r.get("error")]
    checks = [r for r in recs if r["stage"] in ("smoke", "correctness") and "ok" in r]
    names = {(r["stage"], r["item"]) for r in checks}
    assert names == {("smoke", i.name) for i in gl.smoke_items()} | \
        {("correctness", i.name) for i in gl.correctness_items()}
    assert all(r["ok"] and r["max_rel"] <= r["tol"] for r in checks)
    # each family ran, and the autotuned items ran more than one candidate
    assert {r["path"] for r in checks} >= {"single", "grid", "outer", "gp"}
    assert any(r["candidate"] > 0 for r in checks)
    launch = [r for r in recs if "max_work_recalibrated" in r]
    assert len(launch) == 1 and launch[0]["t_launch_measured_s"] > 0
    rows = (out / "bench.rows.jsonl").read_text().splitlines()
    assert {json.loads(r)["outcome"] for r in rows} == {"passed", "skipped"}
    assert (work / "bench.md").exists() and (out / "log.txt").exists()
    lines = []
    assert gl.summary(out, print_=lines.append) == 0
    assert lines[0].split()[:4] == ["stage", "pass", "fail", "skip"]


def test_spent_budget_skips_the_rest(tmp_path):
    """A call that runs out of time keeps what finished and says what it skipped."""
    out = tmp_path / "out"
    rc = gl.run_call([2], out, budget=1, reduced=True, plan_path=None, work=tmp_path / "w",
                     only=["ncu", "cuda_build"])
    recs = _records(out)
    assert {r["stage"] for r in recs if r.get("skipped")} == {"cuda_build", "ncu"}
    assert rc == 0


def test_dry_run_listing_and_last_line(tmp_path):
    plan = gl.build_plan(calls=(1, 2), reduced=True)
    lines: list[str] = []
    gl.dry_run(plan, out=lines.append)
    text = "\n".join(lines)
    assert re.fullmatch(r"compilations: \d+, estimated device seconds: \d+", lines[-1])
    assert int(lines[-1].split()[1].rstrip(",")) == len(plan["compilations"]) > 0
    for name in gl.STAGES:
        assert f"stage {name}:" in text
    for key in plan["compilations"]:
        assert key["key"] in text
    for row in gl.bench_ids():
        assert f"row {row}" in text
    est = gl.estimate(plan)
    assert est["total"] == pytest.approx(sum(est["calls"].values()), abs=0.2)
    # every non-synthetic key reproduces as warm-up arguments of its kernel
    for key in plan["compilations"]:
        if key.get("precompile", True):
            args, kwargs = gl.mock_args(key, gpu=False)
            assert "num_warps" in kwargs and len(args) == len(key["spec"])


def test_launch_keys_follow_the_jit_specialisation():
    x = torch.empty(8)
    assert gl._spec(x) == "*float32:16" and gl._spec(x[1:]) == "*float32"
    assert [gl._spec(v) for v in (1, 16, 17, 2 ** 40, 2 ** 40 + 1, True, 0.5, None)] == \
        ["1", "i32:16", "i32", "i64:16", "i64", "i1", "fp32", "None"]

    def kernel(a_ptr, n, BLOCK: "tl.constexpr" = 16):  # noqa: F821 - annotation text only
        pass
    r1 = gl.launch_record(kernel, (x, 16), dict(BLOCK=32, num_warps=8), (4,))
    r2 = gl.launch_record(kernel, (x, 32), dict(BLOCK=32, num_warps=8), (9,))
    r3 = gl.launch_record(kernel, (x, 33), dict(BLOCK=32, num_warps=8), (9,))
    assert r1["key"] == r2["key"] != r3["key"]          # same specialisation, same binary
    assert r1["constexprs"] == {"BLOCK": 32} and r1["num_warps"] == 8 and r1["grid"] == [4]


@pytest.mark.parametrize("argv,needle", [
    (["--call", "3"], "--call must be 1, 2 or all"),
    (["--bogus"], "unknown argument '--bogus'"),
    (["tests"], "the old parts"),
    (["--call", "1", "--budget", "x"], "--budget must be whole seconds"),
    ([], "--call or --dry-run is required"),
])
def test_script_usage_errors_are_one_line(argv, needle):
    proc = subprocess.run(["bash", str(ROOT / "python" / "gpu_check.sh"), *argv],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and needle in proc.stderr


@pytest.mark.parametrize("argv,needle", [
    (["run", "--call", "x", "--out", "o"], "--call must be 1, 2 or all"),
    (["run", "--out", "o", "--budget", "0"], "--budget must be in"),
    (["run", "--out", "o", "--only", "nope"], "--only nope: no such stage"),
    (["run", "--out", "o"], "run needs a CUDA GPU"),
    ([], "a command is required"),
])
def test_runner_usage_errors(argv, needle, capsys):
    assert gl.main(argv) == 2
    assert needle in capsys.readouterr().err


def test_warmup_arguments_specialise_like_the_launch():
    """The pre-compile's warm-up arguments (dtypes for pointers, 1 / 16 / 17 for the
    integer classes) give Triton's binder for sm_90 the same specialisation as the real
    launch arguments recorded under the emulation: the same cache key, so the lease's
    stages find every kernel compiled."""
    seen, checked = set(), []

    def compare(fn, args, kwargs, record):
        if record["key"] in seen:
            return
        seen.add(record["key"])
        kw = {k: v for k, v in kwargs.items() if k not in ("num_ctas", "maxnreg")}
        real = gl.jit_specialisation(fn, args, kw)
        margs, mkw = gl.mock_args(record, gpu=False)
        mkw = {k: v for k, v in mkw.items()}
        assert gl.jit_specialisation(fn, margs, mkw) == real, record["kernel"]
        checked.append(record["kernel"])

    items = [gl.smoke_items()[0], gl.smoke_items()[5], gl.smoke_items()[7],
             gl.correctness_items()[-4]]        # single, gathered, outer, penalty
    with gl.emulation():
        for item in items:
            with gl.record_launches([], execute=False, on_launch=compare):
                gl.check_item(item.reduced(), seed=0, reference=False)
    assert {"_single_program_fwd_kernel", "_bounds_fwd_kernel", "_outer_fwd_kernel",
            "_gp_kernel"} <= set(checked)


def test_precompile_falls_back_to_running_the_item():
    """Without a usable ``JITFunction.warmup`` (here: the interpreter's kernels have none)
    a pool worker runs the first item that uses the key instead, fused only."""
    item = next(i for i in gl.sanitize_items() if i.name == "san-gp")
    sink: list = []
    with gl.emulation(), gl.record_launches(sink, execute=False):
        gl.check_item(item, seed=0, reference=False)
    key = dict(sink[0], items=[item.name], candidate=0)
    res = gl._warm(key)
    assert res["fallback"] == "san-gp" and "warmup_error" in res and "error" not in res

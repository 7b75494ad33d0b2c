#!/usr/bin/env python3
"""One GPU lease, prepared: the stages of ``python/gpu_check.sh`` (issue 23).

A lent GPU comes with about 15 minutes of device time, machine start included, at most
10 minutes a command, and may never come again.  This module is the whole run as a registry
of stages, in two device calls ordered by value; every stage appends JSON lines to
``OUT/results.jsonl`` and text to ``OUT/log.txt`` *as it goes* (flushed per record), so a
time-out keeps what finished.

    python3 python/gpu_lease.py dry-run [--plan-out FILE]         # CPU: stages, launches,
                                                                  # compilations, estimate
    python3 python/gpu_lease.py run --call 1|2|all --out DIR [--budget S] [--reduced]
    python3 python/gpu_lease.py plan --out FILE                   # the launch list only
    python3 python/gpu_lease.py measure-compiles [--per-kernel N] # compile times, sm_90

Call 1 (the evidence; budget 440 s): ``env`` (GPU, driver, versions, copy bandwidth) →
``precompile`` (the distinct Triton compilations of the call, warmed into Triton's cache by a
process pool, ``Pool.apply_async`` in launch-list order, while the next stages run) →
``smoke`` (every family at paper scale against the float64 reference, values and gradients)
→ ``correctness`` (boundary shapes, float16/bfloat16, ``"distinct"``, two-layer critics,
each autotune candidate) → ``launch_cost`` (empty Triton launch, tiny torch op, CUDA-graph
replay, one-program vs multi-program forced; prints the recalibrated one-program threshold)
→ ``bench`` (the headline rows beside eager and ``torch.compile``, incremental).
Call 2 (budget 310 s): ``cuda_build`` (the extension, built in the background since call 1
when the machine stayed warm) → ``sanitize_triton`` (compute-sanitizer memcheck, one launch
per Triton family) → ``cuda_tests`` → ``sanitize_cuda`` (memcheck + racecheck of the CUDA
ops) → ``bench_cuda`` → ``ncu`` (the two headline kernels, if time remains).

The launch list: every stage item runs once on the CPU with the GPU-launch emulation
(``TRITON_INTERPRET=1``, ``MDM_EMULATE_GPU=sm_90``, each ``MDM_EMULATE_CONFIG``) while the
Triton interpreter's launch entry only *records* each launch (kernel, constexprs, the JIT's
specialisation of the other arguments — ``1``, multiples of 16, 64-bit — num_warps,
num_stages, grid) and skips the kernel: the distinct keys are the compilations the GPU run
needs.  ``--reduced`` runs every stage end to end on the CPU at small sizes (interpreter,
emulation, tools replaced by their target scripts): ``tests/test_gpu_check.py``.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import hashlib
import inspect
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PROG = "gpu_lease.py"
#: The two device calls: the most each may run (the device tool allows 10 minutes a command;
#: 9 leave a margin for Python's start and the transfers) and the budget of both together.
CALL_LIMIT_S = 540
TOTAL_LIMIT_S = 780
#: Default budget of each call (``run --budget``): 750 s together, so that with the
#: machine's start (~90 s) and each call's Python start, plan and packing (~30 s) the
#: session's 15 minutes hold; the stages of a call stop inside it, the last (least
#: valuable) ones first.
CALL_BUDGETS = {1: 440, 2: 310}
#: Paper scale (the issue's smoke shape).
PAPER = dict(B=256, dims=(64, 64, 64), hidden=(128,))
#: Upstream weights of (joint, marginal): both gradient paths exercised.
W_JOINT, W_MARG = 0.7, -1.3
#: ‖out − ref‖ / ‖ref‖ tolerances on the GPU, by input dtype (float32: tf32x3 dots and
#: ex2.approx, far under 1e-4; half inputs are bound by rounding the inputs).
TOLERANCE = {"float32": 1e-4, "float16": 5e-3, "bfloat16": 3e-2}
#: Costs of the estimate (device seconds) that no CPU can measure: assumptions, written
#: down, to be replaced by the first lease's ``seconds`` fields (docs/benchmarks.md).
COSTS = dict(
    start_s=12.0,           # python3 + torch + triton import, CUDA context, per process
    check_item_s=0.6,       # one checked step: first call, float64 reference, comparison
    autotune_s=0.15,        # benchmarking one autotune candidate for a new key
    launch_cost_s=25.0,     # launch-cost stage: ~10 timed loops + the forced-path sweep
    bench_row_s=3.5,        # one benchmark row: first call, ~1 s timed, memory, profiler
    bench_compile_row_s=30.0,  # one torch.compile row (Inductor, 16 cores) on top
    bench_start_s=15.0,     # the runner's pytest process
    cuda_build_s=50.0,      # nvcc, sm_90 only: 47 CPU-s measured here (6 sources, parallel)
    cuda_tests_s=60.0,      # tests/test_cuda_backend.py with 8 xdist workers
    sanitize_triton_s=60.0,  # compute-sanitizer start + one launch per family
    sanitize_cuda_s=60.0,   # memcheck + racecheck of python/check_cuda_driver.py --quick
    ncu_s=45.0,             # two kernels, two sections, --clock-control none
)
#: Workers of the pre-compile pool on the GPU machine (16 cores: the main process and the
#: background CUDA build keep one each).
PRECOMPILE_WORKERS = 14
#: Compile seconds per kernel measured here (``measure-compiles``), the committed table.
COMPILE_TABLE = Path(__file__).with_name("gpu_lease_compile_times.json")


# ============================================================================= records
class Recorder:
    """Appends one JSON line per record to ``results.jsonl`` and a text line to ``log.txt``
    (both flushed at once: a killed run keeps every finished record)."""

    def __init__(self, out: Path | None, echo: bool = True):
        import threading
        self.lock = threading.Lock()   # the pre-compile pool reports from another thread
        self.out = out
        self.echo = echo
        self.t0 = time.time()
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            self._jsonl = open(out / "results.jsonl", "a", buffering=1)
            self._log = open(out / "log.txt", "a", buffering=1)
        else:
            self._jsonl = self._log = None

    def log(self, text: str) -> None:
        line = f"[{time.time() - self.t0:7.1f}s] {text}"
        with self.lock:
            if self.echo:
                print(line, flush=True)
            if self._log is not None:
                self._log.write(line + "\n")
                self._log.flush()

    def emit(self, stage: str, **rec) -> dict:
        rec = {"stage": stage, "t": round(time.time() - self.t0, 3), **rec}
        with self.lock:
            if self._jsonl is not None:
                self._jsonl.write(json.dumps(rec, default=str) + "\n")
                self._jsonl.flush()
        return rec

    def close(self):
        for f in (self._jsonl, self._log):
            if f is not None:
                f.close()


# ============================================================================= items
@dataclasses.dataclass(frozen=True)
class Item:
    """One checked step: an estimator's (joint, marginal) terms (``op="terms"``), the
    gradient penalty alone (``"gp"``) or the Wasserstein terms with their GP
    (``"wasserstein"``), on one kernel family (``strategy``), against float64."""
    name: str
    op: str = "terms"
    kind: str = "dv"
    B: int = 256
    dims: tuple = (64, 64, 64)
    hidden: tuple = (128,)
    act: str = "relu"
    negatives: object = "shuffle"     # "shuffle", int K, "all", "distinct"
    dtype: str = "float32"
    strategy: str = "auto"            # "single", "grid", "auto"
    candidates: bool = False          # every autotune candidate of the launch
    one_sided: bool = False

    def reduced(self) -> "Item":
        """The same item at CPU size: B ≤ 9 (odd stays odd; 3 for grids of m ≥ 3), d ≤ 6,
        H ≤ 8, K ≤ 2."""
        b = self.B if self.B <= 9 else (7 if self.B % 2 else 8)
        if self.negatives in ("all", "distinct") and len(self.dims) >= 3:
            b = min(b, 3)
        neg = min(self.negatives, 2) if isinstance(self.negatives, int) else self.negatives
        return dataclasses.replace(
            self, B=b, dims=tuple(min(d, 3 + i) for i, d in enumerate(self.dims)),
            hidden=tuple(min(h, 8 - 2 * i) for i, h in enumerate(self.hidden)),
            negatives=neg)

    def describe(self) -> str:
        neg = f"K={self.negatives}" if isinstance(self.negatives, int) else self.negatives
        what = self.kind if self.op != "gp" else "gp"
        return (f"{what} {self.op if self.op != 'terms' else ''} {neg} B={self.B} "
                f"d={'x'.join(map(str, self.dims))} H={'x'.join(map(str, self.hidden))} "
                f"{self.act} {self.dtype} strategy={self.strategy}"
                f"{' every-candidate' if self.candidates else ''}"
                f"{' one-sided' if self.one_sided else ''}").replace("  ", " ")


def smoke_items() -> list[Item]:
    """Stage 1: every family at paper scale (m = 3, B = 256, d = 64, H = 128): the five
    estimators on the one-program step, the gathered tiles (one LSE and one row-LSE
    reduction), the outer sums (three factors at B = 128 — the float64 reference of 2^24
    samples would need ~50 GB — and InfoNCE's two factors at B = 256), the penalty alone
    and the Wasserstein terms with their penalty on both paths."""
    items = [Item(f"single-{k}", kind=k, strategy="single", **PAPER)
             for k in ("dv", "nwj", "js", "infonce", "wasserstein")]
    items += [Item("grid-dv", kind="dv", strategy="grid", **PAPER),
              Item("grid-infonce-K8", kind="infonce", negatives=8, strategy="grid", **PAPER),
              Item("outer-dv-all", kind="dv", negatives="all", strategy="grid",
                   B=128, dims=PAPER["dims"], hidden=PAPER["hidden"]),
              Item("outer-infonce-all", kind="infonce", negatives="all", strategy="grid",
                   **PAPER),
              Item("gp", op="gp", **PAPER),
              Item("wasserstein-single", op="wasserstein", kind="wasserstein",
                   strategy="single", **PAPER),
              Item("wasserstein-grid", op="wasserstein", kind="wasserstein", strategy="grid",
                   **PAPER)]
    return items


def correctness_items() -> list[Item]:
    """Stage 2: each family at boundary shapes with the GPU's own configs (autotune on,
    each kept candidate on the autotuned families), float32/float16/bfloat16, "distinct"
    negatives, two-layer critics.  Shapes are chosen so that compilations repeat: B = 255
    and 257 (no multiple of 16 or of any tile) share one specialisation, H = 100 pads to
    the H = 128 tile, one width past each limit's edge (H = 512 one program, 1024 gathered
    one-layer, 256 gathered two-layer and GP)."""
    d3, d4 = (64, 64, 64), (32, 48, 64, 16)
    return [
        # one program
        Item("single-dv-B255-fp16", kind="dv", B=255, dims=d3, dtype="float16",
             strategy="single"),
        Item("single-js-odd-bf16", kind="js", B=3, dims=(5, 7, 3), hidden=(100,), act="gelu",
             dtype="bfloat16", strategy="single"),
        Item("single-infonce-distinct", kind="infonce", B=64, dims=d3, negatives="distinct",
             strategy="single"),
        Item("single-dv-2layers-K8", kind="dv", B=256, dims=d3, hidden=(128, 128),
             negatives=8, strategy="single"),
        Item("single-nwj-m4-H512", kind="nwj", B=32, dims=d4, hidden=(512,), act="tanh",
             strategy="single"),
        Item("single-wasserstein-all-m2", kind="wasserstein", B=128, dims=(64, 64),
             negatives="all", strategy="single"),
        # gathered tiles, each kept autotune candidate
        Item("grid-dv-2layers-B255", kind="dv", B=255, dims=d3, hidden=(128, 128),
             strategy="grid", candidates=True),
        Item("grid-infonce-K8-bf16", kind="infonce", B=256, dims=d3, negatives=8,
             dtype="bfloat16", strategy="grid", candidates=True),
        Item("grid-js-distinct-2layers", kind="js", B=48, dims=d3, hidden=(128, 64),
             negatives="distinct", strategy="grid"),
        Item("grid-nwj-all-m4-fp16", kind="nwj", B=12, dims=d4, negatives="all",
             dtype="float16", strategy="grid"),
        Item("grid-wasserstein-K3-H1024", kind="wasserstein", B=257, dims=d3, hidden=(1024,),
             negatives=3, strategy="grid", candidates=True),
        Item("grid-dv-2layers-H256", kind="dv", B=64, dims=d3, hidden=(256, 256),
             act="gelu", strategy="grid"),
        # outer sums
        Item("outer-dv-all-m2-B1000", kind="dv", B=1000, dims=(64, 64), negatives="all",
             strategy="grid"),
        Item("outer-infonce-all-m2-bf16", kind="infonce", B=257, dims=(64, 64),
             negatives="all", dtype="bfloat16", strategy="grid"),
        Item("outer-js-distinct-m3", kind="js", B=60, dims=d3, negatives="distinct",
             strategy="grid"),
        Item("outer-wasserstein-all-m3-fp16", kind="wasserstein", B=33, dims=d3,
             negatives="all", dtype="float16", strategy="grid"),
        # gradient penalty, each kept candidate
        Item("gp-B256", op="gp", B=256, dims=d3, candidates=True),
        Item("gp-gelu-2layers-one-sided", op="gp", B=255, dims=d3, hidden=(128, 128),
             act="gelu", one_sided=True, candidates=True),
        Item("gp-H256-2layers-B4096", op="gp", B=4096, dims=d3, hidden=(256, 256)),
        Item("gp-bf16", op="gp", B=257, dims=d3, dtype="bfloat16"),
        Item("wasserstein-grid-K8-2layers", op="wasserstein", kind="wasserstein", B=256,
             dims=d3, hidden=(128, 128), negatives=8, strategy="grid"),
    ]


def sanitize_items() -> list[Item]:
    """One launch per Triton family (forward + backward) at small odd shapes, for
    compute-sanitizer memcheck (``sanitize-target``)."""
    return [Item("san-single", kind="dv", B=37, dims=(5, 7, 3), hidden=(13,),
                 strategy="single"),
            Item("san-grid", kind="infonce", B=37, dims=(5, 7, 3), hidden=(13, 9),
                 negatives=3, strategy="grid"),
            Item("san-outer", kind="dv", B=37, dims=(5, 7, 3), hidden=(13,), negatives="all",
                 strategy="grid"),
            Item("san-gp", op="gp", B=37, dims=(5, 7, 3), hidden=(13,), act="gelu"),
            Item("san-wasserstein", op="wasserstein", kind="wasserstein", B=37,
                 dims=(5, 7, 3), hidden=(13,), negatives=2, strategy="grid")]


def ncu_items() -> list[Item]:
    """The two headline kernels: the one-program MINE step at paper scale, and the outer
    sums of "all" with m = 2 at B = 16,384."""
    return [Item("ncu-single-mine", kind="dv", strategy="single", **PAPER),
            Item("ncu-outer-all-m2", kind="dv", B=16384, dims=(128, 128), negatives="all",
                 strategy="grid")]


#: launch-cost stage: B of the forced one-program / multi-program sweep (MINE shuffle,
#: m = 3, d = 64, H = 128: the cost model's workload).
CROSSOVER_BATCHES = (256, 512, 1024, 2048, 4096)


def launch_cost_items() -> list[Item]:
    out = []
    for b in CROSSOVER_BATCHES:
        for strategy in ("single", "grid"):
            out.append(Item(f"mine-B{b}-{strategy}", kind="dv", B=b, dims=PAPER["dims"],
                            hidden=PAPER["hidden"], strategy=strategy))
    return out


# ============================================================================= torch helpers
def _torch():
    import torch
    return torch


def _dtype(name):
    return getattr(_torch(), name)


def _on_gpu() -> bool:
    torch = _torch()
    from mdm_kernels.ops.runtime_flags import interpreter_enabled
    return torch.cuda.is_available() and not interpreter_enabled()


def _device():
    torch = _torch()
    return torch.device("cuda" if _on_gpu() else "cpu")


def _sync():
    torch = _torch()
    if _on_gpu():
        torch.cuda.synchronize()


@contextlib.contextmanager
def forced_path(strategy: str):
    """Route ``"auto"`` calls (the Wasserstein terms) to one family: the one-program step
    (threshold raised) or the multi-program kernels (threshold 0).  The router reads
    ``SINGLE_PROGRAM_MAX_WORK`` at each call; restored after."""
    from mdm_kernels.ops import single_program
    saved = single_program.SINGLE_PROGRAM_MAX_WORK
    if strategy == "single":
        single_program.SINGLE_PROGRAM_MAX_WORK = 10 ** 18
    elif strategy == "grid":
        single_program.SINGLE_PROGRAM_MAX_WORK = 0
    try:
        yield
    finally:
        single_program.SINGLE_PROGRAM_MAX_WORK = saved


def _autotuners() -> list:
    from triton.runtime.autotuner import Autotuner
    from mdm_kernels.ops import gathered_tiles, gradient_penalty, outer_sums, single_program
    found = {}
    for mod in (gathered_tiles, gradient_penalty, outer_sums, single_program):
        for value in vars(mod).values():
            if isinstance(value, Autotuner):
                found[id(value)] = value
    return list(found.values())


@contextlib.contextmanager
def candidate(index: int):
    """Launch autotune candidate ``index`` (modulo the candidates a launch keeps after
    pruning) of every autotuned kernel: ``MDM_EMULATE_CONFIG`` for the emulation, and on a
    GPU each autotuner's prune narrowed to that one config (cache cleared before and
    after, so later launches tune again)."""
    old = os.environ.get("MDM_EMULATE_CONFIG")
    os.environ["MDM_EMULATE_CONFIG"] = str(index)
    saved = []
    try:
        if _on_gpu():
            for at in _autotuners():
                orig = at.prune_configs

                def pick(*a, _orig=orig, **k):
                    kept = _orig(*a, **k)
                    return [kept[index % len(kept)]]
                saved.append(at)
                at.prune_configs = pick
                at.cache.clear()
        yield
    finally:
        for at in saved:
            del at.prune_configs
            at.cache.clear()
        if old is None:
            os.environ.pop("MDM_EMULATE_CONFIG", None)
        else:
            os.environ["MDM_EMULATE_CONFIG"] = old


def n_candidates(item: Item) -> int:
    """Autotune candidates the GPU keeps for the item's launches (1 for the fixed-tile
    families): the gathered tiles' and the penalty's fit tables."""
    if not item.candidates:
        return 1
    from mdm_kernels.ops.gathered_tiles import gathered_configs
    from mdm_kernels.ops.gradient_penalty import gp_configs
    h1, two = item.hidden[0], len(item.hidden) == 2
    n = 1
    if item.op in ("gp", "wasserstein"):
        n = max(n, len(gp_configs(h1, item.hidden[1] if two else None)))
    if item.op != "gp" and item.strategy == "grid":
        n = max(n, len(gathered_configs(h1, two)))
    return n


def _rel(out, ref) -> float:
    torch = _torch()
    out = out.detach().double().reshape(-1)
    ref = ref.detach().double().reshape(-1).to(out.device)
    if not bool(torch.isfinite(out).all()):
        return float("nan")
    scale = ref.norm()
    if float(scale) == 0.0:      # an exactly zero reference: the absolute error
        return float(out.norm())
    return float((out - ref).norm() / scale)


def _make_inputs(item: Item, device, seed: int):
    torch = _torch()
    from mdm_kernels import MLPCritic
    torch.manual_seed(seed)
    critic = MLPCritic(item.dims, item.hidden, item.act).to(device)
    zs = [torch.randn(item.B, d, device=device).to(_dtype(item.dtype)).requires_grad_()
          for d in item.dims]
    return critic, zs


def _reference(item, critic, zs, samples, extra):
    """float64 (joint, marginal[, gp]) and the gradients of the weighted sum."""
    torch = _torch()
    from mdm_kernels.reference.estimators import dependency_terms
    from mdm_kernels.reference.gradient_penalty import gradient_penalty_terms
    c64 = copy.deepcopy(critic).double()
    z64 = [z.detach().double().requires_grad_() for z in zs]
    outs = {}
    total = 0
    if item.op in ("terms", "wasserstein"):
        j, m = dependency_terms(item.kind, c64, z64, samples)
        outs.update(joint=j, marginal=m)
        total = W_JOINT * j + W_MARG * m
    if item.op == "gp":
        marg64 = [z[p] for z, p in zip(z64, extra["gp_rows"])]
        gp = gradient_penalty_terms(c64, z64, marg64, extra["eps"].double(), item.one_sided)
        outs["gp"] = gp
        total = total + gp
    if item.op == "wasserstein":
        perms = extra["gp_perms"]                    # (K', m, B)
        k = perms.shape[0]
        joint = [z.repeat(k, 1) for z in z64]
        marg = [z[perms[:, j].reshape(-1)] for j, z in enumerate(z64)]
        gp = gradient_penalty_terms(c64, joint, marg, extra["eps"].double(), item.one_sided)
        outs["gp"] = gp
        total = total + 10.0 * gp
    total.backward()
    grads = {f"z{k}": z.grad for k, z in enumerate(z64)}
    grads.update({f"critic.{n}": p.grad for n, p in c64.named_parameters()})
    return outs, grads


def _fused(item, critic, zs, samples, extra):
    """Fused (outputs, path) with the item's family; backward of the same weighted sum."""
    from mdm_kernels.ops.router import (execution_path, fused_dependency_terms,
                                        fused_gradient_penalty, fused_wasserstein_terms)
    outs, total, path = {}, 0, None
    if item.op == "terms":
        path = execution_path(item.kind, critic, zs, samples, strategy=item.strategy)
        j, m = fused_dependency_terms(item.kind, critic, zs, samples, strategy=item.strategy)
        outs.update(joint=j, marginal=m)
        total = W_JOINT * j + W_MARG * m
    elif item.op == "gp":
        marg = [z[p] for z, p in zip(zs, extra["gp_rows"])]
        gp = fused_gradient_penalty(critic, zs, marg, extra["eps"], item.one_sided)
        outs["gp"], total, path = gp, gp, "gp"
    else:
        with forced_path(item.strategy):
            path = execution_path("wasserstein", critic, zs, samples)
            j, m, gp = fused_wasserstein_terms(critic, zs, samples, extra["gp_perms"],
                                               extra["eps"], item.one_sided)
        outs.update(joint=j, marginal=m, gp=gp)
        total = W_JOINT * j + W_MARG * m + 10.0 * gp
    total.backward()
    return outs, path


def check_item(item: Item, seed: int | None = None, reference: bool = True) -> dict:
    """Run ``item`` fused (first call timed) and, with ``reference``, compare values and
    every gradient with float64: ‖out − ref‖/‖ref‖ against :data:`TOLERANCE`, NaN fails."""
    torch = _torch()
    from mdm_kernels.reference.estimators import resolve_samples
    from mdm_kernels.estimators import gradient_penalty_pairs
    device = _device()
    seed = int.from_bytes(os.urandom(4), "little") if seed is None else seed
    critic, zs = _make_inputs(item, device, seed)
    samples, extra = None, {}
    if item.op != "gp":
        samples = resolve_samples(item.kind, zs, item.negatives, None, None)
    if item.op == "gp":
        extra["gp_rows"] = [torch.arange(item.B, device=device)] + \
            [torch.randperm(item.B, device=device) for _ in zs[1:]]
        extra["eps"] = torch.rand(item.B, device=device)
    if item.op == "wasserstein":
        extra["gp_perms"] = gradient_penalty_pairs(samples, None, device)
        extra["eps"] = torch.rand(extra["gp_perms"].shape[0] * item.B, device=device)
    _sync()
    t0 = time.perf_counter()
    outs, path = _fused(item, critic, zs, samples, extra)
    _sync()
    rec = dict(item=item.name, what=item.describe(), path=path, seed=seed,
               first_call_s=round(time.perf_counter() - t0, 4))
    if not reference:
        return rec
    ref_outs, ref_grads = _reference(item, critic, zs, samples, extra)
    errors = {k: _rel(v, ref_outs[k]) for k, v in outs.items()}
    named = [(f"z{k}", z) for k, z in enumerate(zs)]
    named += [(f"critic.{n}", p) for n, p in critic.named_parameters()]
    for name, t in named:
        g = ref_grads[name]
        if g is None and t.grad is None:
            continue
        # no gradient is a zero gradient (the relu penalty's ∂z, ∂b_1: σ'' = 0)
        errors[name] = _rel(t.grad if t.grad is not None else torch.zeros_like(t),
                            g if g is not None else torch.zeros_like(t))
    tol = TOLERANCE[item.dtype]
    worst = max(errors.values(), key=lambda e: math.inf if math.isnan(e) else e)
    rec.update(ok=all(not math.isnan(e) and e <= tol for e in errors.values()),
               max_rel=worst, tol=tol,
               errors={k: (None if math.isnan(v) else float(f"{v:.3g}"))
                       for k, v in errors.items()},
               values={k: float(v.detach()) for k, v in outs.items()})
    return rec


# ============================================================================= launch capture
def _spec(value) -> str:
    """The JIT's specialisation of one non-constexpr argument (Triton 3.x): pointers by
    dtype and 16-byte alignment, integers 1 (a constant), multiples of 16, 32/64-bit."""
    torch = _torch()
    if value is None:
        return "None"
    if isinstance(value, torch.Tensor):
        dt = str(value.dtype).replace("torch.", "")
        return f"*{dt}" + (":16" if value.data_ptr() % 16 == 0 else "")
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        if value == 1:
            return "1"
        width = "i32" if -2 ** 31 <= value < 2 ** 31 else "i64"
        return width + (":16" if value % 16 == 0 else "")
    if isinstance(value, float):
        return "fp32"
    return type(value).__name__


def _plain(value):
    value = getattr(value, "value", value)      # tl.constexpr
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    return repr(value)


_SIGNATURES: dict = {}


def launch_record(fn, args, kwargs, grid) -> dict:
    """(key, record) of one launch of the raw kernel function ``fn``."""
    params = _SIGNATURES.get(fn)
    if params is None:
        params = _SIGNATURES[fn] = list(inspect.signature(fn).parameters.values())
    kwargs = dict(kwargs)
    options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages", "num_ctas", "maxnreg")
               if k in kwargs}
    bound = dict(zip([p.name for p in params], args))
    bound.update(kwargs)
    consts, spec = {}, []
    for p in params:
        value = bound.get(p.name, p.default)
        if "constexpr" in str(p.annotation):
            consts[p.name] = _plain(value)
        else:
            spec.append([p.name, _spec(value)])
    if callable(grid):
        try:
            grid = grid({**bound, **options})
        except Exception:  # noqa: BLE001 - only for the listing
            grid = "callable"
    grid = [int(g) for g in grid] if isinstance(grid, (tuple, list)) else grid
    rec = dict(module=fn.__module__, kernel=fn.__name__, constexprs=consts, spec=spec,
               num_warps=options.get("num_warps", 4), num_stages=options.get("num_stages", 3),
               grid=grid)
    text = json.dumps([rec["module"], rec["kernel"], sorted(consts.items()), spec,
                       rec["num_warps"], rec["num_stages"]], default=str)
    rec["key"] = hashlib.sha256(text.encode()).hexdigest()[:16]
    return rec


@contextlib.contextmanager
def record_launches(sink: list, execute: bool, on_launch=None):
    """Inside: every interpreter launch appends its :func:`launch_record` to ``sink``; the
    kernel runs only with ``execute`` (the dry run skips it: outputs stay as allocated).
    ``on_launch(fn, args, kwargs, record)`` sees each launch's real arguments (tests)."""
    from triton.runtime.interpreter import InterpretedFunction
    original = InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        if not warmup:
            sink.append(launch_record(self.fn, args, kwargs, grid))
            if on_launch is not None:
                on_launch(self.fn, args, kwargs, sink[-1])
        if execute:
            return original(self, *args, grid=grid, warmup=warmup, **kwargs)
        return None

    InterpretedFunction.run = run
    try:
        yield
    finally:
        InterpretedFunction.run = original


@contextlib.contextmanager
def emulation(sms: int | None = None, poison: bool = True):
    """The GPU's launch decisions in the interpreter (issue 22's switches)."""
    from mdm_kernels.ops.runtime_flags import emulate_gpu
    with emulate_gpu("sm_90", sms=sms, config=0, poison=poison):
        yield


def capture_item(item: Item, execute: bool = False) -> list[dict]:
    """The distinct launches of one item under the emulation, over each autotune
    candidate the GPU keeps (:func:`n_candidates`; the index is taken modulo each
    launch's own count)."""
    seen = {}
    for index in range(n_candidates(item)):
        sink: list = []
        with candidate(index), record_launches(sink, execute):
            try:
                check_item(item, seed=index, reference=False)
            except Exception as exc:  # noqa: BLE001 - the listing says which item failed
                return [dict(error=f"{type(exc).__name__}: {exc}", item=item.name)]
        for r in sink:
            seen.setdefault(r["key"], dict(r, candidate=index))
    return list(seen.values())


def source_hash() -> str:
    """Hash of the package's sources, the benchmark workloads and this file: a stored plan
    is stale when any of them changes (the launches depend on the routing, the samples'
    layout and the critic too, not only on the kernels)."""
    h = hashlib.sha256()
    paths = sorted((ROOT / "mdm_kernels").rglob("*.py"))
    for path in paths + [ROOT / "benchmarks" / "mdm_bench.py", Path(__file__)]:
        h.update(str(path.relative_to(ROOT)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


# ============================================================================= stages
@dataclasses.dataclass
class Ctx:
    rec: Recorder
    out: Path           # the streams: results.jsonl, log.txt, <bench>.rows.jsonl
    work: Path          # everything else: logs of the tools, plan, tables, build markers
    reduced: bool
    deadline: float
    plan: dict | None = None
    precompile: "Precompiler | None" = None
    failures: int = 0

    def left(self) -> float:
        return self.deadline - time.time()


@dataclasses.dataclass
class Stage:
    name: str
    call: int
    title: str
    run: Callable[[Ctx], None]
    items: Callable[[], list] | None = None


def stage_items(stage: "Stage", reduced: bool) -> list[Item]:
    items = stage.items() if stage.items else []
    return [i.reduced() for i in items] if reduced else items


def _versions() -> dict:
    torch = _torch()
    import triton
    info = dict(python=platform.python_version(), torch=torch.__version__,
                torch_cuda=torch.version.cuda, triton=triton.__version__,
                host=platform.node(), cpus=os.cpu_count())
    info["commit"] = _sh(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    info["dirty_files"] = len((_sh(["git", "-C", str(ROOT), "status", "--porcelain"]) or "")
                              .splitlines())
    info["nvidia_smi"] = _sh(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,"
                              "clocks.sm,clocks.max.sm,clocks.mem,power.limit,temperature.gpu",
                              "--format=csv,noheader"])
    info["nvcc"] = (_sh(["nvcc", "--version"]) or "").strip().splitlines()[-1:] or None
    if _on_gpu():
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
                    memory_gib=round(p.total_memory / 2 ** 30, 1),
                    l2_mib=round(getattr(p, "L2_cache_size", 0) / 2 ** 20, 1))
    return info


def _sh(cmd, timeout=60) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def stage_env(ctx: Ctx) -> None:
    """Versions, the GPU's properties and clocks, and one measured ceiling (a large
    device-to-device copy; bytes read + written over time)."""
    torch = _torch()
    info = _versions()
    if _on_gpu():
        x = torch.empty(2 ** 30 // 4, device="cuda")      # 1 GiB, random: never zeros
        x.uniform_()
        y = torch.empty_like(x)
        for _ in range(3):
            y.copy_(x)
        start, end = torch.cuda.Event(True), torch.cuda.Event(True)
        start.record()
        for _ in range(10):
            y.copy_(x)
        end.record()
        end.synchronize()
        info["copy_tb_per_s"] = round(2 * 10 * x.numel() * 4 / (start.elapsed_time(end) / 1e3)
                                      / 1e12, 2)
        del x, y
        torch.cuda.empty_cache()
    ctx.rec.emit("env", **info)
    ctx.rec.log("env: " + ", ".join(f"{k}={v}" for k, v in info.items()
                                     if k in ("gpu", "sms", "nvidia_smi", "torch", "triton",
                                              "torch_cuda", "copy_tb_per_s", "commit")))


def _run_items(ctx: Ctx, stage: str, items: list[Item]) -> None:
    for item in items:
        if ctx.left() < 5:
            ctx.rec.emit(stage, item=item.name, skipped="call budget spent")
            ctx.rec.log(f"{stage}: {item.name} skipped (budget)")
            continue
        if ctx.precompile is not None:
            ctx.precompile.wait(item, ctx)
        t0 = time.perf_counter()
        for index in range(n_candidates(item)):
            try:
                with candidate(index), _poisoned():
                    rec = check_item(item)
            except Exception as exc:  # noqa: BLE001 - recorded, the run goes on
                rec = dict(item=item.name, what=item.describe(), ok=False,
                           error=f"{type(exc).__name__}: {str(exc)[:500]}",
                           traceback=traceback.format_exc(limit=6)[-2000:])
            rec.update(candidate=index, seconds=round(time.perf_counter() - t0, 3))
            t0 = time.perf_counter()
            ctx.rec.emit(stage, **rec)
            ctx.failures += not rec.get("ok")
            ctx.rec.log(f"{stage}: {'PASS' if rec.get('ok') else 'FAIL'} {item.name} "
                        f"[{rec.get('path')}] cand={index} max_rel="
                        f"{rec.get('max_rel', float('nan')):.2e} "
                        f"first={rec.get('first_call_s', 0):.2f}s"
                        + (f" {rec['error']}" if "error" in rec else ""))


@contextlib.contextmanager
def _poisoned():
    old = os.environ.get("MDM_POISON_EMPTY")
    os.environ["MDM_POISON_EMPTY"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("MDM_POISON_EMPTY", None)
        else:
            os.environ["MDM_POISON_EMPTY"] = old


def stage_smoke(ctx: Ctx) -> None:
    _run_items(ctx, "smoke", stage_items(STAGES["smoke"], ctx.reduced))


def stage_correctness(ctx: Ctx) -> None:
    _run_items(ctx, "correctness", stage_items(STAGES["correctness"], ctx.reduced))


# ----------------------------------------------------------------------------- launch cost
_EMPTY = []


def _triton_empty_kernel():
    """A kernel that does nothing (``n`` ≥ 0): the launch cost alone."""
    if not _EMPTY:
        import triton
        import triton.language as tl

        @triton.jit
        def _empty_kernel(x_ptr, n):
            if n < 0:
                tl.store(x_ptr, 0.0)
        _EMPTY.append(_empty_kernel)
    return _EMPTY[0]


def _median_time(fn, reps: int) -> float:
    """Median seconds per call: CUDA events on a GPU, perf_counter on the CPU."""
    torch = _torch()
    for _ in range(3 if reps > 1 else 1):
        fn()
    times = []
    for _ in range(reps):
        if _on_gpu():
            s, e = torch.cuda.Event(True), torch.cuda.Event(True)
            s.record()
            fn()
            e.record()
            e.synchronize()
            times.append(s.elapsed_time(e) / 1e3)
        else:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def _host_per_call(fn, n: int) -> float:
    """Host seconds per call of ``n`` back-to-back calls (one sync at the end): the
    dispatch + launch cost when the kernels are too short to back up the queue."""
    fn()
    _sync()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    _sync()
    return (time.perf_counter() - t) / n


def _mine_step(item: Item):
    """One MINE step (fwd + bwd, shuffles drawn inside) on the fused path of ``item``."""
    import mdm_kernels as mk
    critic, zs = _make_inputs(item, _device(), 0)
    params = list(critic.parameters()) + zs

    def step():
        for p in params:
            p.grad = None
        with forced_path(item.strategy):
            mk.mine_loss(critic, *zs, negatives=item.negatives, backend="triton").backward()
    return step


def stage_launch_cost(ctx: Ctx) -> None:
    """Launch costs and the one-program threshold they imply (printed, not applied)."""
    torch = _torch()
    from mdm_kernels.ops import single_program as sp
    device = _device()
    reps, n = (1, 5) if ctx.reduced else (50, 2000)
    x = torch.zeros(1, device=device)
    res = {}
    empty = _triton_empty_kernel()
    launch = (lambda: empty[(1,)](x, 1))
    res["triton_empty_launch_s"] = _host_per_call(launch, n)
    res["torch_tiny_op_s"] = _host_per_call(lambda: x.add_(1.0), n)
    if _on_gpu():
        g = torch.cuda.CUDAGraph()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3):
                x.add_(1.0)
        torch.cuda.current_stream().wait_stream(s)
        with torch.cuda.graph(g):
            for _ in range(100):
                x.add_(1.0)
        res["cuda_graph_replay_per_op_s"] = _median_time(g.replay, reps) / 100
    # the cost model's workload on each path, forced
    steps = {}
    items = stage_items(STAGES["launch_cost"], ctx.reduced)
    for item in items[:2] if ctx.reduced else items:
        if ctx.left() < 10:
            break
        if ctx.precompile is not None:
            ctx.precompile.wait(item, ctx)
        try:
            step = _mine_step(item)
            steps[item.name] = t = _median_time(step, reps)
            host = _host_per_call(step, max(1, reps // 5))
            work = sp.single_program_work(item.B, list(item.dims), list(item.hidden), item.B)
            ctx.rec.emit("launch_cost", item=item.name, strategy=item.strategy, B=item.B,
                         work=work, median_s=t, host_per_step_s=host)
            ctx.rec.log(f"launch_cost: {item.name} median {t * 1e6:.1f} µs "
                        f"(host {host * 1e6:.1f} µs/step), W={work:.3g}")
        except Exception as exc:  # noqa: BLE001
            ctx.failures += 1
            ctx.rec.emit("launch_cost", item=item.name, ok=False,
                         error=f"{type(exc).__name__}: {exc}")
    t_launch = max(res["torch_tiny_op_s"], res["triton_empty_launch_s"])
    w_now = sp.SINGLE_PROGRAM_MAX_WORK
    w_model = sp.single_program_max_work(launch_overhead_s=t_launch)
    res.update(t_launch_assumed_s=sp.LAUNCH_OVERHEAD_S, t_launch_measured_s=t_launch,
               max_work_now=w_now, max_work_recalibrated=w_model)
    # measured crossover: the smallest W where the multi-program step is faster
    cross = None
    for b in CROSSOVER_BATCHES:
        a, g_ = steps.get(f"mine-B{b}-single"), steps.get(f"mine-B{b}-grid")
        if a is not None and g_ is not None and g_ < a:
            cross = sp.single_program_work(b, list(PAPER["dims"]), list(PAPER["hidden"]), b)
            break
    res["measured_crossover_work"] = cross
    # the launch cost the paper-scale steps imply: their difference over the difference
    # of dispatched ops (the cost model's L_multi − L_one), where the work is ~equal
    a, g_ = steps.get(f"mine-B{CROSSOVER_BATCHES[0]}-single"), \
        steps.get(f"mine-B{CROSSOVER_BATCHES[0]}-grid")
    if a is not None and g_ is not None and g_ > a:
        implied = (g_ - a) / (sp.MULTI_PROGRAM_OPS - sp.SINGLE_PROGRAM_OPS)
        res.update(t_launch_implied_s=implied,
                   max_work_implied=sp.single_program_max_work(launch_overhead_s=implied))
    ctx.rec.emit("launch_cost", **res)
    ctx.rec.log(f"launch_cost: t_launch measured {t_launch * 1e6:.2f} µs (assumed "
                f"{sp.LAUNCH_OVERHEAD_S * 1e6:.0f} µs; empty Triton launch "
                f"{res['triton_empty_launch_s'] * 1e6:.2f} µs, tiny torch op "
                f"{res['torch_tiny_op_s'] * 1e6:.2f} µs"
                + (f", graph replay {res['cuda_graph_replay_per_op_s'] * 1e6:.2f} µs/op"
                   if "cuda_graph_replay_per_op_s" in res else "") + ")")
    if "t_launch_implied_s" in res:
        ctx.rec.log(f"launch_cost: the paper-scale steps imply {res['t_launch_implied_s'] * 1e6:.2f}"
                    f" µs per dispatched op (their difference over "
                    f"{sp.MULTI_PROGRAM_OPS - sp.SINGLE_PROGRAM_OPS} ops): W* "
                    f"{res['max_work_implied']:.3g}")
    ctx.rec.log(f"RECALIBRATION SINGLE_PROGRAM_MAX_WORK: now {w_now:.3g}; cost model with the "
                f"measured t_launch {w_model:.3g}; measured crossover "
                f"{'none below B=' + str(CROSSOVER_BATCHES[-1]) if cross is None else f'{cross:.3g}'}"
                " (not applied: set MDM_SINGLE_PROGRAM_MAX_WORK or change LAUNCH_OVERHEAD_S)")


# ----------------------------------------------------------------------------- benchmarks
def bench_ids(backends=("eager", "compile", "triton"), gpu: bool = True) -> list[str]:
    """Node ids of the headline rows (issue 23, stage 3), in value order: MINE / NWJ /
    InfoNCE / Wasserstein at paper scale (shuffle, H = 128), MINE with K = 8 and with two
    hidden layers, the GP alone (B = 256 and 4,096), "all" m = 2 at B = 4,096, 16,384 and
    65,536 — each beside eager and torch.compile; no compile row from B = 16,384 (the
    reference's gathered inputs alone need 275 GB there; eager rows skip with the predicted
    memory) and none for the penalty (double backward does not compile)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import mdm_bench as mb
    paper = [c for c in mb.paper_cases("quick", on_gpu=gpu) if c.batch == 256]
    sweep = mb.sweep_cases("quick", on_gpu=gpu)
    pick = []
    for op in ("mine", "nwj", "infonce", "wasserstein"):
        pick += [("test_ops", c) for c in paper if c.op == op and c.section == "paper"
                 and c.hidden == (128,) and c.negatives == "shuffle"]
    pick += [("test_ops", c) for c in paper if c.op == "mine" and c.section == "paper"
             and (c.negatives == 8 and c.hidden == (128,)
                  or c.negatives == "shuffle" and c.hidden == (128, 128))]
    pick += [("test_scale", c) for c in sweep if c.op == "gp"]
    pick += [("test_scale", c) for c in sweep if c.op == "mine" and c.section == "sweep-m2"
             and c.negatives == "all" and c.hidden == (128,) and c.batch >= 4096]
    ids = []
    for module, c in pick:
        for b in backends:
            if b == "compile" and (c.op in ("gp", "wasserstein") or c.batch >= 16384):
                continue
            fn = "test_op" if module == "test_ops" else "test_scale"
            ids.append(f"benchmarks/{module}.py::{fn}[{c.id()}-{b}]")
    return ids


def reduced_bench_ids() -> list[str]:
    """CPU stand-ins of the headline rows at smoke size (eager, and the fused rows that
    skip with their reason)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import mdm_bench as mb
    c = [c for c in mb.paper_cases("smoke", on_gpu=False) if c.op == "mine"
         and c.section == "paper" and c.hidden == (128,) and c.negatives == "shuffle"][0]
    return [f"benchmarks/test_ops.py::test_op[{c.id()}-{b}]"
            for b in ("eager", "triton", "cuda")]


def bench_items() -> list[Item]:
    """The Triton rows of :func:`bench_ids` as items, so that the plan captures (and the
    pool pre-compiles) their launches too: the losses route with ``strategy="auto"`` as in
    the benchmark, the penalty alone is the penalty item (every autotune candidate: the
    benchmark's autotuner compiles them all)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import mdm_bench as mb
    cases = {}
    for c in mb.paper_cases("quick", on_gpu=True) + mb.sweep_cases("quick", on_gpu=True):
        cases[f"{c.id()}-triton"] = c
    items = []
    for node in bench_ids(("triton",)):
        c = cases[node.split("[", 1)[1].rstrip("]")]
        kind = {"mine": "dv"}.get(c.op, c.op)
        common = dict(B=c.batch, dims=tuple(c.dims), hidden=tuple(c.hidden))
        if c.op == "gp":
            items.append(Item(f"bench-{c.id()}", op="gp", candidates=True, **common))
        elif c.op == "wasserstein":
            items.append(Item(f"bench-{c.id()}", op="wasserstein", kind="wasserstein",
                              negatives=c.negatives, candidates=True, **common))
        else:
            neg = None if kind == "infonce" and c.negatives == "all" else c.negatives
            items.append(Item(f"bench-{c.id()}", kind=kind, negatives=neg, **common))
    return items


def _subprocess_stage(ctx: Ctx, stage: str, cmd: list[str], limit: float, env=None,
                      log_name: str | None = None, accept=()) -> int | None:
    """Run ``cmd`` with a time limit (never past the call's budget), its output teed to
    ``WORK/<log_name>``; one record with rc, seconds and the output's tail (an exit status
    in ``accept`` is no failure: ``accepted`` in the record)."""
    limit = max(1.0, min(limit, ctx.left() - 3))
    log_path = ctx.work / (log_name or f"{stage}.log")
    ctx.rec.log(f"{stage}: $ {' '.join(shlex.quote(c) for c in cmd)} (limit {limit:.0f} s)")
    t0 = time.time()
    rc = None
    with open(log_path, "a") as log:
        try:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                    env={**os.environ, **(env or {})}, start_new_session=True)
            try:
                rc = proc.wait(timeout=limit)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 15)
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, 9)
                    proc.wait()
                rc = "timeout"
        except OSError as exc:
            rc = f"cannot start: {exc}"
    tail = log_path.read_text(errors="replace")[-1500:] if log_path.exists() else ""
    accepted = rc in accept
    ctx.rec.emit(stage, cmd=cmd, rc=rc, seconds=round(time.time() - t0, 1), log=log_path.name,
                 tail=tail, **({"accepted": True} if accepted else {}))
    ctx.rec.log(f"{stage}: rc={rc} ({time.time() - t0:.0f} s); last line: "
                f"{(tail.strip().splitlines() or [''])[-1][:200]}")
    if rc != 0 and not accepted:
        ctx.failures += 1
    return rc


def _bench_stage(ctx: Ctx, stage: str, ids: list[str], sizes: str) -> None:
    if ctx.precompile is not None:      # the rows' compilations, pre-compiled in the pool
        for item in stage_items(STAGES[stage], ctx.reduced):
            ctx.precompile.wait(item, ctx)
    ids_file = ctx.work / f"{stage}-ids.txt"
    ids_file.write_text("\n".join(ids) + "\n")
    rows = ctx.out / f"{stage}.rows.jsonl"
    cmd = [sys.executable, "-m", "mdm_kernels.bench", "--out", str(ctx.work), "--sizes", sizes,
           "--ids", str(ids_file), "--rows", str(rows),
           "--timeout", str(int(max(10, ctx.left() - 20))), "--stem", stage]
    _subprocess_stage(ctx, stage, cmd, ctx.left() - 5)
    n = sum(1 for _ in open(rows)) if rows.exists() else 0
    ctx.rec.emit(stage, rows_file=rows.name, rows=n)


def stage_bench(ctx: Ctx) -> None:
    """The headline rows (eager, torch.compile, Triton), one JSON line per row as it ends
    (``OUT/bench.rows.jsonl``), tables at the end (or from the rows after a time-out)."""
    if ctx.reduced:
        _bench_stage(ctx, "bench", reduced_bench_ids(), "smoke")
    else:
        _bench_stage(ctx, "bench", bench_ids(), "quick")


def stage_bench_cuda(ctx: Ctx) -> None:
    """The headline rows on the CUDA backend (the extension of ``cuda_build``)."""
    if ctx.reduced:     # bench ran the suite here already: the row list only
        ids = bench_ids(("cuda",))
        ctx.rec.emit("bench_cuda", rows_listed=len(ids), ids=ids)
        ctx.rec.log(f"bench_cuda: {len(ids)} CUDA rows listed (reduced run: not run)")
    else:
        _bench_stage(ctx, "bench_cuda", [i for i in bench_ids(("cuda",))], "quick")


# ----------------------------------------------------------------------------- call 2
def _cuda_built() -> bool:
    try:
        from mdm_kernels.ops import cuda_backend
        return cuda_backend.is_built()
    except Exception:  # noqa: BLE001
        return False


def stage_cuda_build(ctx: Ctx) -> None:
    """The CUDA extension, sm_90 only: reuse the background build started in call 1 (the
    machine stays warm between the calls), else build now with every core."""
    done = ctx.work / "cuda-build.done"
    log = ctx.work / "cuda-build.log"
    pid_file = ctx.work / "cuda-build.pid"
    if ctx.reduced:
        ctx.rec.emit("cuda_build", built=_cuda_built(), note="reduced run: no build")
        ctx.rec.log(f"cuda_build: reduced run, extension importable: {_cuda_built()}")
        return
    if pid_file.exists() and not done.exists():
        ctx.rec.log("cuda_build: waiting for the background build of call 1")
        t0 = time.time()
        while not done.exists() and time.time() - t0 < min(240, ctx.left() - 60):
            time.sleep(2)
    if not _have_extension_file():
        _subprocess_stage(ctx, "cuda_build", [sys.executable, "setup.py", "-q", "build_ext",
                                              "--inplace"], 300,
                          env=dict(MDM_BUILD_CUDA="1", MDM_CUDA_ARCHS="90"),
                          log_name="cuda-build.log")
    ctx.rec.emit("cuda_build", built=_have_extension_file(),
                 log_tail=log.read_text()[-800:] if log.exists() else "")


def _have_extension_file() -> bool:
    return any((ROOT / "mdm_kernels").glob("_cuda*.so"))


def start_background_cuda_build(out: Path) -> None:
    """Start the CUDA build in its own session (it outlives call 1's command when the
    machine stays warm for call 2): nice'd, so the Triton pre-compile keeps the cores."""
    if _have_extension_file():
        return
    script = (f"MDM_BUILD_CUDA=1 MDM_CUDA_ARCHS=90 nice -n 5 {shlex.quote(sys.executable)} "
              f"setup.py -q build_ext --inplace > {shlex.quote(str(out / 'cuda-build.log'))} "
              f"2>&1; echo $? > {shlex.quote(str(out / 'cuda-build.done'))}")
    proc = subprocess.Popen(["bash", "-c", script], cwd=ROOT, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    (out / "cuda-build.pid").write_text(str(proc.pid))


def stage_cuda_tests(ctx: Ctx) -> None:
    """The CUDA build and backend tests, 8 pytest-xdist workers (installed there)."""
    tests = ["tests/test_cuda_build.py", "tests/test_cuda_backend.py"]
    if ctx.reduced:     # CI runs these files itself: that they exist is the check here
        missing = [t for t in tests if not (ROOT / t).is_file()]
        ctx.rec.emit("cuda_tests", tests=tests, ok=not missing, missing=missing)
        ctx.failures += bool(missing)
        return
    cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-n", "8", "-p", "no:cacheprovider",
           *tests]
    _subprocess_stage(ctx, "cuda_tests", cmd, 150)


def _sanitizer() -> str:
    import shutil
    return shutil.which("compute-sanitizer") or \
        f"{os.environ.get('CUDA_HOME', '/usr/local/cuda')}/bin/compute-sanitizer"


def stage_sanitize_triton(ctx: Ctx) -> None:
    """compute-sanitizer memcheck on one launch per Triton family (``sanitize-target``)."""
    target = [sys.executable, str(Path(__file__)), "sanitize-target"]
    if ctx.reduced:     # the tool's program, in this process (the interpreter is on)
        rc = sanitize_target(True, log=ctx.rec.log)
        ctx.rec.emit("sanitize_triton", cmd=["sanitize-target", "--reduced"], rc=rc)
        ctx.failures += rc != 0
        return
    cmd = [_sanitizer(), "--tool", "memcheck", "--error-exitcode", "1", "--print-limit", "30",
           *target]
    _subprocess_stage(ctx, "sanitize_triton", cmd, 150,
                      env=dict(PYTORCH_NO_CUDA_MEMORY_CACHING="1"))


def stage_sanitize_cuda(ctx: Ctx) -> None:
    """memcheck and racecheck of the CUDA ops (``python/check_cuda_driver.py --quick``)."""
    driver = [sys.executable, str(ROOT / "python" / "check_cuda_driver.py"), "--quick"]
    if ctx.reduced or not _have_extension_file():
        rc = _subprocess_stage(ctx, "sanitize_cuda", driver, 60, accept=(2,) if ctx.reduced
                               else ())     # no GPU / extension here: the driver says so
        return
    env = dict(PYTORCH_NO_CUDA_MEMORY_CACHING="1")
    for tool in ("memcheck", "racecheck"):
        extra = ["--racecheck-report", "all"] if tool == "racecheck" else []
        _subprocess_stage(ctx, "sanitize_cuda", [_sanitizer(), "--tool", tool, *extra,
                                                 "--error-exitcode", "1", "--print-limit",
                                                 "30", *driver], 90, env=env,
                          log_name=f"sanitize-cuda-{tool}.log")


def stage_ncu(ctx: Ctx) -> None:
    """Nsight Compute on the two headline kernels (one launch each, clocks untouched)."""
    target = [sys.executable, str(Path(__file__)), "ncu-target"]
    if ctx.reduced:     # the profiled program, in this process
        rc = ncu_target(True, log=ctx.rec.log)
        ctx.rec.emit("ncu", cmd=["ncu-target", "--reduced"], rc=rc)
        return
    import shutil
    ncu = shutil.which("ncu") or "/usr/local/cuda/bin/ncu"
    cmd = [ncu, "--clock-control", "none", "--target-processes", "all",
           "-k", "regex:_single_program_fwd_kernel|_outer_fwd_kernel", "--launch-count", "2",
           "--section", "SpeedOfLight", "--section", "LaunchStats", "--section", "Occupancy",
           "--csv", "--page", "details", *target]
    _subprocess_stage(ctx, "ncu", cmd, max(30, ctx.left() - 5), log_name="ncu.csv")


def stage_precompile(ctx: Ctx) -> None:
    """The launch list of this call's stages (the stored plan when current, else captured
    now under the emulation), then the pool that warms Triton's cache with it (GPU), or
    a check that every key binds to its kernel (reduced run)."""
    keys = ctx.plan["compilations"] if ctx.plan else []
    ctx.rec.emit("precompile", compilations=len(keys), plan_hash=ctx.plan.get("source_hash")
                 if ctx.plan else None)
    if not keys:
        return
    if ctx.reduced or not _on_gpu():
        bad = 0
        for k in keys:
            if not k.get("precompile", True):
                continue
            try:
                mock_args(k, gpu=False)
            except Exception as exc:  # noqa: BLE001
                bad += 1
                ctx.rec.emit("precompile", key=k["key"], error=str(exc))
        ctx.rec.log(f"precompile: {len(keys)} launch keys bind to their kernels "
                    f"({bad} do not); no GPU: nothing compiled")
        ctx.failures += bad
        return
    ctx.precompile = Precompiler(keys, ctx)


STAGES: dict[str, Stage] = {}


def _register(*stages: Stage) -> None:
    for s in stages:
        STAGES[s.name] = s


_register(
    Stage("env", 1, "versions, GPU properties and clocks, copy bandwidth", stage_env),
    Stage("precompile", 1, "warm Triton's cache with the call's distinct compilations "
          f"({PRECOMPILE_WORKERS} processes, in the background of the next stages)",
          stage_precompile),
    Stage("smoke", 1, "every family at paper scale (m=3, B=256, d=64, H=128) against "
          "float64, values and gradients", stage_smoke, smoke_items),
    Stage("correctness", 1, "boundary shapes, float16/bfloat16, distinct, two layers, each "
          "autotune candidate", stage_correctness, correctness_items),
    Stage("launch_cost", 1, "empty Triton launch, tiny torch op, CUDA-graph replay, "
          "one-program vs multi-program forced; threshold recalibration", stage_launch_cost,
          launch_cost_items),
    Stage("bench", 1, "headline rows beside eager and torch.compile (row by row)",
          stage_bench, bench_items),
    Stage("cuda_build", 2, "the CUDA extension (sm_90), from call 1's background build",
          stage_cuda_build),
    Stage("sanitize_triton", 2, "compute-sanitizer memcheck, one launch per Triton family",
          stage_sanitize_triton, sanitize_items),
    Stage("cuda_tests", 2, "CUDA build + backend tests (8 xdist workers)", stage_cuda_tests),
    Stage("sanitize_cuda", 2, "compute-sanitizer memcheck + racecheck of the CUDA ops",
          stage_sanitize_cuda),
    Stage("bench_cuda", 2, "the headline rows on the CUDA backend", stage_bench_cuda),
    Stage("ncu", 2, "Nsight Compute on the two headline kernels", stage_ncu, ncu_items),
)


# ============================================================================= pre-compile
def _jit_function(module: str, name: str):
    import importlib
    from triton.runtime.jit import JITFunction
    obj = getattr(importlib.import_module(module), name)
    while not isinstance(obj, JITFunction) and hasattr(obj, "fn"):
        obj = obj.fn
    return obj


def mock_args(key: dict, gpu: bool = True):
    """(positional args, kwargs) reproducing ``key``'s specialisation for
    ``JITFunction.warmup``: dtypes for aligned pointers (Triton's MockTensor), 1 / 16 / 17 /
    2^33+… for the integer classes, 1.5 for floats, the constexprs and launch options."""
    torch = _torch()
    args = []
    for name, spec in key["spec"]:
        if spec.startswith("*"):
            dt, _, aligned = spec[1:].partition(":")
            dtype = getattr(torch, dt)
            if aligned or not gpu:
                args.append(dtype)
            else:   # an unaligned pointer: a real tensor at a 4-byte offset
                args.append(torch.empty(8, dtype=dtype, device="cuda")[1:])
        elif spec == "1":
            args.append(1)
        elif spec.startswith("i32"):
            args.append(16 if spec.endswith(":16") else 17)
        elif spec.startswith("i64"):
            args.append(2 ** 36 if spec.endswith(":16") else 2 ** 36 + 1)
        elif spec == "i1":
            args.append(True)
        elif spec == "fp32":
            args.append(1.5)
        elif spec == "None":
            args.append(None)
        else:
            raise ValueError(f"{key['kernel']}: argument {name} of unknown kind {spec!r}")
    kwargs = dict(key["constexprs"], num_warps=key["num_warps"], num_stages=key["num_stages"])
    fn = _jit_function(key["module"], key["kernel"])
    raw = getattr(fn, "fn", fn)
    names = list(inspect.signature(raw).parameters)
    positional = [n for n in names if n not in key["constexprs"]]
    if len(positional) != len(args):
        raise ValueError(f"{key['kernel']}: {len(args)} arguments for {len(positional)} "
                         f"non-constexpr parameters")
    return args, kwargs


_BINDERS: dict = {}


def jit_specialisation(raw_fn, args, kwargs, arch: int = 90) -> str:
    """Triton's own specialisation of a launch for ``sm_<arch>`` (the binder a CUDA
    ``JITFunction`` builds; no GPU needed): equal for two argument lists means one cache
    key.  ``args`` may hold dtypes for pointers, as ``warmup`` takes them."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import JITFunction, MockTensor, create_function_from_signature
    binder = _BINDERS.get((raw_fn, arch))
    if binder is None:
        jf = JITFunction(raw_fn)
        binder = _BINDERS[(raw_fn, arch)] = create_function_from_signature(
            jf.signature, jf.params, make_backend(GPUTarget("cuda", arch, 32)))
    _, spec, options = binder(*map(MockTensor.wrap_dtype, args), **kwargs)
    return repr(spec)


def _items_by_name() -> dict:
    return {i.name: i for stage in STAGES.values() for i in stage_items(stage, False)}


def _warm(key: dict) -> dict:
    """Pool worker: compile one key into Triton's cache (``JITFunction.warmup`` with the
    recorded specialisation).  Should that fail (another Triton's API), run the first item
    that uses the key, fused only, with the key's candidate: it compiles the same kernels
    through the library's own launches."""
    t0 = time.time()
    try:
        args, kwargs = mock_args(key)
        _jit_function(key["module"], key["kernel"]).warmup(*args, grid=(1,), **kwargs)
        return dict(key=key["key"], seconds=round(time.time() - t0, 2))
    except Exception as exc:  # noqa: BLE001
        error = f"{type(exc).__name__}: {str(exc)[:300]}"
    try:
        item = _items_by_name()[key["items"][0]]
        with candidate(key.get("candidate", 0)):
            check_item(item, seed=0, reference=False)
        return dict(key=key["key"], seconds=round(time.time() - t0, 2),
                    warmup_error=error, fallback=item.name)
    except Exception as exc:  # noqa: BLE001
        return dict(key=key["key"], seconds=round(time.time() - t0, 2), warmup_error=error,
                    error=f"{type(exc).__name__}: {str(exc)[:300]}")


def _worker_init():
    os.environ.pop("TRITON_INTERPRET", None)
    import torch  # noqa: F401  - the CUDA context of the worker, once
    import mdm_kernels.ops.triton_backend  # noqa: F401


class Precompiler:
    """A spawn pool warming Triton's on-disk cache with every key, in launch-list order;
    stages wait for their own items' keys (``wait``), so compilation overlaps the GPU work
    of the stages before."""

    def __init__(self, keys: list[dict], ctx: Ctx):
        import multiprocessing
        self.by_item: dict[str, list[str]] = {}
        for k in keys:
            for item in k["items"]:
                self.by_item.setdefault(item, []).append(k["key"])
        self.pool = multiprocessing.get_context("spawn").Pool(PRECOMPILE_WORKERS,
                                                              initializer=_worker_init)
        self.results = {}
        self.t0 = time.time()
        for k in keys:
            if not k.get("precompile", True):
                continue
            self.results[k["key"]] = self.pool.apply_async(_warm, (k,),
                                                           callback=self._done(ctx, k))
        self.pool.close()

    @staticmethod
    def _done(ctx, k):
        def report(res):
            ctx.rec.emit("precompile", kernel=k["kernel"], items=k["items"], **res)
        return report

    def wait(self, item: Item, ctx: Ctx) -> None:
        t0 = time.time()
        for key in self.by_item.get(item.name, []):
            res = self.results.get(key)
            if res is not None:
                res.wait(timeout=max(0.0, ctx.left() - 30))
        waited = time.time() - t0
        if waited > 0.5:
            ctx.rec.log(f"precompile: waited {waited:.1f} s for {item.name}'s compilations")


# ============================================================================= plan
def build_plan(calls=(1, 2), log=None, reduced: bool = False) -> dict:
    """Capture every stage item's launches under the emulation (kernels skipped): the
    launch configurations and the distinct compilations of each call (of the reduced
    items with ``reduced``).  Needs the interpreter (``TRITON_INTERPRET=1``)."""
    t0 = time.time()
    plan = dict(source_hash=source_hash(), reduced=reduced, stages=[], compilations=[])
    by_key: dict = {}
    with emulation():
        for stage in STAGES.values():
            if stage.call not in calls:
                continue
            entry = dict(name=stage.name, call=stage.call, title=stage.title, items=[])
            for item in stage_items(stage, reduced):
                t1 = time.time()
                launches = capture_item(item)
                errors = [lr["error"] for lr in launches if "error" in lr]
                launches = [lr for lr in launches if "error" not in lr]
                for lr in launches:
                    k = by_key.setdefault(lr["key"], {**lr, "items": [], "stages": []})
                    if item.name not in k["items"]:
                        k["items"].append(item.name)
                    if stage.name not in k["stages"]:
                        k["stages"].append(stage.name)
                entry["items"].append(dict(name=item.name, what=item.describe(),
                                           candidates=n_candidates(item),
                                           launches=launches, errors=errors,
                                           capture_s=round(time.time() - t1, 2)))
                if log:
                    log(f"  captured {stage.name}/{item.name}: {len(launches)} launches "
                        f"({time.time() - t1:.1f} s){' ERROR ' + errors[0] if errors else ''}")
            plan["stages"].append(entry)
    if 1 in calls:   # the launch-cost stage's empty kernel (compiled where it is launched)
        by_key["empty-kernel"] = dict(module="gpu_lease", kernel="_empty_kernel",
                                      constexprs={}, spec=[["x_ptr", "*float32:16"],
                                                           ["n", "1"]],
                                      num_warps=4, num_stages=3, grid=[1], key="empty-kernel",
                                      candidate=0, items=["launch_cost"],
                                      stages=["launch_cost"], precompile=False)
    plan["compilations"] = list(by_key.values())
    plan["capture_s"] = round(time.time() - t0, 1)
    return plan


def load_plan(path: Path | None) -> dict | None:
    """A stored plan when it matches the current sources, else None."""
    if path is None or not path.exists():
        return None
    plan = json.loads(path.read_text())
    return plan if plan.get("source_hash") == source_hash() else None


# ============================================================================= estimate
def compile_seconds() -> dict:
    """Per kernel: measured compile seconds for sm_90 (``measure-compiles``) or the
    fallback (the gate table's median, 1.6 s)."""
    if COMPILE_TABLE.exists():
        return json.loads(COMPILE_TABLE.read_text())
    return {}


def _compile_estimate(keys: list[dict], table: dict) -> tuple[float, float]:
    """(CPU seconds of the compilations, wall seconds on the pool)."""
    kernels = table.get("kernels", {})
    fallback = table.get("fallback_s", 3.0)
    cpu = sum(kernels.get(k["kernel"], {}).get("median_s", fallback) for k in keys)
    speed = table.get("gpu_machine_speedup", 1.0)
    longest = max([kernels.get(k["kernel"], {}).get("max_s", fallback) for k in keys],
                  default=0.0)
    return cpu, max(cpu / speed / PRECOMPILE_WORKERS, longest / speed)


def estimate(plan: dict) -> dict:
    """Device seconds per stage and call, from the plan, the measured compile times and
    :data:`COSTS`."""
    table = compile_seconds()
    keys = plan["compilations"]
    per_stage = {}
    for entry in plan["stages"]:
        name = entry["name"]
        items = entry["items"]
        checks = sum(i["candidates"] for i in items)
        autotuned = sum(1 for k in keys if name in k["stages"] and k["candidate"] > 0)
        if name == "env":
            s = 3.0
        elif name == "precompile":
            # the pool works in stage order beside the stages: smoke waits for its own
            # keys, the later stages only where the rest outlasts their GPU work
            call1 = [k for k in keys if set(k["stages"]) - {"sanitize_triton", "ncu"}]
            smoke = [k for k in keys if "smoke" in k["stages"]]
            cpu, wall = _compile_estimate(call1, table)
            _, wall_smoke = _compile_estimate(smoke, table)
            gpu_work = sum(sum(i["candidates"] for i in e["items"]) for e in plan["stages"]
                           if e["name"] in ("smoke", "correctness")) * COSTS["check_item_s"]
            gpu_work += COSTS["launch_cost_s"]
            s = 2.0 + wall_smoke + max(0.0, wall - wall_smoke - gpu_work)
            per_stage["precompile_cpu_s"] = round(cpu, 1)
            per_stage["precompile_wall_s"] = round(wall, 1)
        elif name in ("smoke", "correctness"):
            s = checks * COSTS["check_item_s"] + autotuned * COSTS["autotune_s"]
        elif name == "launch_cost":
            s = COSTS["launch_cost_s"]
        elif name == "bench":
            ids = bench_ids()
            comp = sum("-compile]" in i for i in ids)
            s = COSTS["bench_start_s"] + len(ids) * COSTS["bench_row_s"] + \
                comp * COSTS["bench_compile_row_s"]
        elif name == "bench_cuda":
            s = COSTS["bench_start_s"] + len(bench_ids(("cuda",))) * COSTS["bench_row_s"]
        elif name == "cuda_build":
            s = 10.0    # normally built in call 1's background; COSTS["cuda_build_s"] if not
        elif name == "sanitize_triton":
            s = COSTS["sanitize_triton_s"]
        elif name == "cuda_tests":
            s = COSTS["cuda_tests_s"]
        elif name == "sanitize_cuda":
            s = COSTS["sanitize_cuda_s"]
        elif name == "ncu":
            s = COSTS["ncu_s"]
        else:
            s = 10.0
        per_stage[name] = round(s, 1)
    calls = {}
    for entry in plan["stages"]:
        calls[entry["call"]] = calls.get(entry["call"], COSTS["start_s"]) + per_stage[entry["name"]]
    return dict(stages=per_stage, calls={k: round(v, 1) for k, v in calls.items()},
                total=round(sum(calls.values()), 1))


def dry_run(plan: dict, out=print) -> int:
    """The listing: every stage, item, launch configuration and distinct compilation, and
    the last line ``compilations: N, estimated device seconds: S``."""
    table = compile_seconds()
    est = estimate(plan)
    keys = plan["compilations"]
    out(f"# GPU lease plan (sources {plan['source_hash']}, captured in {plan['capture_s']} s "
        f"on the CPU under MDM_EMULATE_GPU=sm_90)")
    for entry in plan["stages"]:
        out(f"\n## call {entry['call']} stage {entry['name']}: {entry['title']} "
            f"(~{est['stages'][entry['name']]:.0f} device s)")
        for item in entry["items"]:
            out(f"  item {item['name']}: {item['what']} (candidates {item['candidates']})")
            for e in item["errors"]:
                out(f"    CAPTURE ERROR {e}")
            for lr in item["launches"]:
                c = lr["constexprs"]
                short = " ".join(f"{k}={v}" for k, v in c.items() if k.startswith("BLOCK")
                                 or k in ("M", "NF", "IDX", "KIND", "TWO_LAYERS", "ACT"))
                out(f"    launch {lr['kernel']} grid={lr['grid']} warps={lr['num_warps']} "
                    f"stages={lr['num_stages']} {short} key={lr['key']}")
        if entry["name"] == "bench":
            for i in bench_ids():
                out(f"  row {i}")
        if entry["name"] == "bench_cuda":
            for i in bench_ids(("cuda",)):
                out(f"  row {i}")
    out(f"\n## distinct Triton compilations ({len(keys)})")
    kernels = table.get("kernels", {})
    for k in keys:
        secs = kernels.get(k["kernel"], {}).get("median_s", table.get("fallback_s", 3.0))
        spec = ",".join(s for _, s in k["spec"])
        out(f"  {k['key']} {k['kernel']} warps={k['num_warps']} stages={k['num_stages']} "
            f"~{secs:.1f}s [{spec}] used by {', '.join(k['items'][:4])}"
            + (" …" if len(k['items']) > 4 else ""))
    cpu, wall = _compile_estimate(keys, table)
    out(f"\ncompile time: {cpu:.0f} CPU-s measured per kernel on "
        f"{table.get('machine', 'an unmeasured machine')} (triton {table.get('triton', '?')}, "
        f"sm_90), {PRECOMPILE_WORKERS} parallel processes on the GPU machine's 16 cores: "
        f"~{wall:.0f} s wall, overlapped with the stages")
    out("stage estimates (device s): " + ", ".join(f"{k} {v}" for k, v in est["stages"].items()))
    out(f"call 1: {est['calls'].get(1, 0):.0f} s (budget {CALL_BUDGETS[1]}), call 2: "
        f"{est['calls'].get(2, 0):.0f} s (budget {CALL_BUDGETS[2]}); both {est['total']:.0f} s "
        f"(limit {TOTAL_LIMIT_S}; one command at most {CALL_LIMIT_S}); assumed costs: "
        + ", ".join(f"{k}={v}" for k, v in COSTS.items()))
    out(f"compilations: {len(keys)}, estimated device seconds: {est['total']:.0f}")
    over = [c for c, s in est["calls"].items() if s > CALL_BUDGETS.get(c, CALL_LIMIT_S)]
    return 1 if over or est["total"] > TOTAL_LIMIT_S or any(
        i["errors"] for e in plan["stages"] for i in e["items"]) else 0


# ============================================================================= targets
def sanitize_target(reduced: bool, log=print) -> int:
    """One forward + backward per Triton family at small odd shapes (compute-sanitizer's
    program: every kernel of the families launches at least once)."""
    bad = 0
    ctx = emulation() if reduced else contextlib.nullcontext()
    with ctx:
        for item in sanitize_items():
            it = item.reduced() if reduced else item
            rec = check_item(it)
            log(f"{'PASS' if rec['ok'] else 'FAIL'} {it.name} [{rec['path']}] "
                f"max_rel={rec['max_rel']:.2e}")
            bad += not rec["ok"]
    _sync()
    return 1 if bad else 0


def ncu_target(reduced: bool, log=print) -> int:
    """One launch of each headline kernel (after a warm-up call outside the profiled
    range would need NVTX; ncu's --launch-count picks the first launches)."""
    ctx = emulation() if reduced else contextlib.nullcontext()
    with ctx:
        for item in ncu_items():
            it = item.reduced() if reduced else item
            rec = check_item(it, reference=False)
            log(f"{it.name}: [{rec['path']}] first call {rec['first_call_s']:.3f} s")
    _sync()
    return 0


# ============================================================================= summary
def summary(out: Path, print_=print) -> int:
    """A short table of ``OUT/results.jsonl`` (the device tool returns the end of the
    output): per stage the checks passed / failed / skipped and its seconds; the failures;
    the recalibration line; the headline benchmark rows."""
    path = out / "results.jsonl"
    if not path.exists():
        print_(f"no {path}")
        return 1
    stages: dict = {}
    fails, recal, smoke, warmed = [], None, [], []
    for line in path.read_text().splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        st = stages.setdefault(r["stage"], dict(ok=0, fail=0, skipped=0, seconds=None,
                                                status=None))
        if "ok" in r:
            st["ok" if r["ok"] else "fail"] += 1
            if not r["ok"]:
                fails.append(f"{r['stage']}/{r.get('item')} cand={r.get('candidate')}: "
                             f"{r.get('error') or r.get('max_rel')}")
        if "rc" in r and r["rc"] not in (0, None) and not r.get("accepted"):
            st["fail"] += 1
            fails.append(f"{r['stage']}: rc={r['rc']}")
        if "skipped" in r:
            st["skipped"] += 1
        if "stage_end" in r:
            st["seconds"], st["status"] = r["seconds"], r["stage_end"]
        if "max_work_recalibrated" in r:
            recal = r
        if r["stage"] == "smoke" and "ok" in r:
            smoke.append(r)
        if r["stage"] == "precompile" and "kernel" in r:
            warmed.append(r)
    print_(f"{'stage':16s} {'pass':>5s} {'fail':>5s} {'skip':>5s} {'seconds':>8s}  status")
    for name, st in stages.items():
        print_(f"{name:16s} {st['ok']:5d} {st['fail']:5d} {st['skipped']:5d} "
               f"{st['seconds'] if st['seconds'] is not None else '-':>8}  "
               f"{st['status'] or 'unfinished'}")
    if warmed:
        print_(f"precompile: {len(warmed)} keys, "
               f"{sum(1 for w in warmed if 'error' not in w)} in the cache, "
               f"{sum(1 for w in warmed if 'fallback' in w)} by running their item, "
               f"{sum(1 for w in warmed if 'error' in w)} failed; "
               f"{sum(w.get('seconds', 0) for w in warmed):.0f} worker-seconds")
    for r in smoke:
        print_(f"smoke {r['item']:22s} [{r.get('path')}] max_rel {r.get('max_rel', float('nan')):.2e}"
               f" (tol {r.get('tol')}) first call {r.get('first_call_s', float('nan')):.2f} s "
               f"{'PASS' if r['ok'] else 'FAIL'}")
    for f in fails[:20]:
        print_(f"FAIL {f}")
    if recal:
        print_(f"launch: t_launch {recal['t_launch_measured_s'] * 1e6:.2f} µs measured "
               f"(assumed {recal['t_launch_assumed_s'] * 1e6:.0f}); SINGLE_PROGRAM_MAX_WORK now "
               f"{recal['max_work_now']:.3g}, recalibrated {recal['max_work_recalibrated']:.3g}, "
               f"measured crossover {recal['measured_crossover_work']}")
    for rows in sorted(out.glob("*.rows.jsonl")):
        for line in rows.read_text().splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue
            info = r.get("extra_info") or {}
            if info.get("median_s") is not None:
                ratio = info.get("speedup_vs_eager")
                print_(f"row {info.get('key')} {info.get('backend')}"
                       f"{' (' + info['triton_path'] + ')' if info.get('triton_path') else ''}: "
                       f"{info['median_s'] * 1e3:.3f} ms"
                       + (f", {ratio:.2f}x eager" if ratio else "")
                       + (f", {info.get('kernels_per_step')} kernels"
                          if info.get("kernels_per_step") is not None else ""))
    return 0 if not fails else 1


# ============================================================================= command line
def _usage_error(msg: str) -> int:
    print(f"{PROG}: error: {msg}", file=sys.stderr)
    return 2


def run_call(calls: list[int], out: Path, budget: float, reduced: bool,
             plan_path: Path | None, only: list[str] | None = None,
             work: Path | None = None) -> int:
    """Run the stages of ``calls`` within ``budget`` seconds; exit status 0 when every
    check passed and every tool exited 0."""
    work = work or ROOT / "build" / "gpu-lease"
    work.mkdir(parents=True, exist_ok=True)
    rec = Recorder(out)
    ctx = Ctx(rec=rec, out=out, work=work, reduced=reduced, deadline=time.time() + budget)
    names = [s.name for s in STAGES.values() if s.call in calls and (not only or s.name in only)]
    rec.log(f"gpu_lease: calls {calls}, budget {budget:.0f} s, stages {', '.join(names)}"
            f"{' (reduced, CPU)' if reduced else ''}")
    if "precompile" in names:
        plan = None if reduced else load_plan(plan_path)
        if plan is None:
            rec.log("precompile: no current stored plan: capturing the launch list now")
            t0 = time.time()
            if reduced:     # already in the interpreter
                plan = build_plan(tuple(calls), reduced=True)
            else:           # the interpreter in a process of its own
                path = work / "plan.json"
                subprocess.run([sys.executable, str(Path(__file__)), "plan", "--out",
                                str(path)], env={**os.environ, "TRITON_INTERPRET": "1"},
                               cwd=ROOT, stdout=subprocess.DEVNULL, check=False,
                               timeout=max(10, min(120, ctx.left() - 60)))
                plan = json.loads(path.read_text()) if path.exists() else None
            rec.emit("precompile", plan="captured", seconds=round(time.time() - t0, 1),
                     compilations=len(plan["compilations"]) if plan else None)
        ctx.plan = plan
    if 1 in calls and not reduced and _on_gpu():
        start_background_cuda_build(work)
    emul = emulation(sms=4) if reduced else contextlib.nullcontext()
    with emul:
        for name in names:
            stage = STAGES[name]
            if ctx.left() < 3:
                rec.emit(name, skipped="call budget spent")
                rec.log(f"=== {name}: skipped, budget spent")
                continue
            rec.log(f"=== {name}: {stage.title} ({ctx.left():.0f} s left)")
            t0 = time.time()
            try:
                stage.run(ctx)
                status = "done"
            except Exception as exc:  # noqa: BLE001 - one stage never ends the run
                ctx.failures += 1
                status = f"error: {type(exc).__name__}: {exc}"
                rec.emit(name, error=status, traceback=traceback.format_exc(limit=8)[-3000:])
            rec.emit(name, stage_end=status, seconds=round(time.time() - t0, 2))
            rec.log(f"--- {name}: {status} ({time.time() - t0:.1f} s)")
    if ctx.precompile is not None:
        ctx.precompile.pool.terminate()
    rec.log(f"gpu_lease: {'PASS' if ctx.failures == 0 else f'{ctx.failures} FAILURES'} "
            f"(results: {out / 'results.jsonl'})")
    rec.close()
    return 0 if ctx.failures == 0 else 1


def measure_compiles(per_kernel: int, plan: dict, jobs: int) -> dict:
    """Compile ``per_kernel`` keys of each kernel for sm_90 (``triton.compile`` with a
    ``GPUTarget``, no GPU; :mod:`mdm_kernels.gpu_resources`' machinery) and store each
    kernel's median / max seconds in :data:`COMPILE_TABLE`."""
    code = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
from mdm_kernels import gpu_resources as gr
import gpu_lease as gl
keys = json.loads(open(sys.argv[2]).read())
variants = []
for k in keys:
    fn = gl._jit_function(k["module"], k["kernel"])
    ints, floats, ptrs, consts = {}, [], {}, dict(k["constexprs"])
    for name, spec in k["spec"]:
        if spec.startswith("*"):
            ptrs[name] = "*" + {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16",
                                "int64": "i64", "int32": "i32", "int8": "i8"}.get(
                spec[1:].split(":")[0], "fp32")
        elif spec == "1" or spec.startswith("i32") or spec.startswith("i64"):
            ints[name] = 1 if spec == "1" else (16 if spec.endswith(":16") else 17)
        elif spec == "fp32":
            floats.append(name)
        elif spec == "None":
            consts[name] = None
    variants.append(gr.Variant("lease", k["key"], fn, consts, ints, tuple(floats), ptrs,
                               k["num_warps"], k["num_stages"]))
out = {}
for k, v in zip(keys, variants):
    res = gr.compile_variant(v, 90)
    out[k["key"]] = dict(kernel=k["kernel"], **res)
    print(json.dumps(out[k["key"]]), flush=True)
json.dump(out, open(sys.argv[3], "w"))
"""
    by_kernel: dict = {}
    for k in plan["compilations"]:
        if k.get("precompile", True):
            by_kernel.setdefault(k["kernel"], []).append(k)
    chosen = []
    for kernel, keys in by_kernel.items():
        step = max(1, len(keys) // per_kernel)
        chosen += keys[::step][:per_kernel]
    import tempfile
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        chunks = [chosen[i::jobs] for i in range(jobs)]
        procs = []
        for i, chunk in enumerate(chunks):
            if not chunk:
                continue
            kf, of = Path(tmp) / f"k{i}.json", Path(tmp) / f"o{i}.json"
            kf.write_text(json.dumps(chunk))
            env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
            env["PYTHONPATH"] = f"{ROOT / 'python'}:{ROOT}"
            procs.append((subprocess.Popen([sys.executable, "-c", code, str(ROOT), str(kf),
                                            str(of)], env=env), of))
        for proc, of in procs:
            proc.wait()
            if of.exists():
                results.update(json.loads(of.read_text()))
    kernels: dict = {}
    for res in results.values():
        if "error" in res:
            print(f"compile error {res['kernel']}: {res['error']}", file=sys.stderr)
            continue
        kernels.setdefault(res["kernel"], []).append(res["seconds"])
    import triton
    table = dict(triton=triton.__version__, arch="sm_90",
                 machine=f"{platform.node() or 'this machine'} ({os.cpu_count()} CPUs, "
                         f"{jobs} parallel compiles, shared)",
                 measured=time.strftime("%Y-%m-%d"),
                 gpu_machine_speedup=1.0, fallback_s=round(statistics.median(
                     [s for v in kernels.values() for s in v]) if kernels else 3.0, 2),
                 kernels={k: dict(median_s=round(statistics.median(v), 2),
                                  max_s=round(max(v), 2), n=len(v))
                          for k, v in sorted(kernels.items())})
    return table


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd")
    d = sub.add_parser("dry-run", help="list stages, launches, compilations, estimate")
    d.add_argument("--plan-out", type=Path, help="also store the plan (JSON) here")
    p = sub.add_parser("plan", help="capture the launch list")
    p.add_argument("--out", type=Path, required=True)
    r = sub.add_parser("run", help="run one device call's stages")
    r.add_argument("--call", default="1", help="1, 2 or all")
    r.add_argument("--out", type=Path, required=True,
                   help="the streams (results.jsonl, log.txt, bench rows): $OUT on the device")
    r.add_argument("--work", type=Path, default=None,
                   help="tool logs, plan, tables, build markers (default build/gpu-lease)")
    r.add_argument("--budget", type=float, default=None,
                   help=f"seconds this call may use (default: call 1 {CALL_BUDGETS[1]}, "
                        f"call 2 {CALL_BUDGETS[2]}, all {sum(CALL_BUDGETS.values())})")
    r.add_argument("--plan", type=Path, default=None, help="a stored plan (dry-run --plan-out)")
    r.add_argument("--reduced", action="store_true", help="CPU: reduced sizes, interpreter")
    r.add_argument("--only", action="append", help="only this stage (repeatable)")
    m = sub.add_parser("measure-compiles", help="compile a sample per kernel for sm_90")
    m.add_argument("--per-kernel", type=int, default=2)
    m.add_argument("--jobs", type=int, default=2)
    sm = sub.add_parser("summary", help="the table of a run's results.jsonl")
    sm.add_argument("--out", type=Path, required=True)
    for name in ("sanitize-target", "ncu-target"):
        t = sub.add_parser(name)
        t.add_argument("--reduced", action="store_true")
    try:
        args = ap.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    if args.cmd is None:
        return _usage_error("a command is required: dry-run, plan, run, measure-compiles")
    if args.cmd == "run":
        if args.call not in ("1", "2", "all"):
            return _usage_error(f"--call must be 1, 2 or all, got {args.call!r}")
        if args.budget is None:
            args.budget = float(CALL_BUDGETS.get(int(args.call), sum(CALL_BUDGETS.values()))
                                if args.call != "all" else sum(CALL_BUDGETS.values()))
        if not 0 < args.budget <= 3600:
            return _usage_error(f"--budget must be in (0, 3600] seconds, got {args.budget}")
        unknown = [s for s in args.only or [] if s not in STAGES]
        if unknown:
            return _usage_error(f"--only {unknown[0]}: no such stage ({', '.join(STAGES)})")
    if args.cmd in ("dry-run", "plan") or getattr(args, "reduced", False):
        os.environ["TRITON_INTERPRET"] = "1"     # before Triton is imported
    if args.cmd == "dry-run":
        plan = build_plan()
        if args.plan_out:
            args.plan_out.write_text(json.dumps(plan, default=str))
        return dry_run(plan)
    if args.cmd == "plan":
        args.out.write_text(json.dumps(build_plan(log=print), default=str))
        return 0
    if args.cmd == "summary":
        return summary(args.out)
    if args.cmd == "run":
        if not args.reduced and not _on_gpu():
            return _usage_error("run needs a CUDA GPU (Triton's interpreter is off); on a "
                                "CPU use --reduced")
        calls = [1, 2] if args.call == "all" else [int(args.call)]
        return run_call(calls, args.out, args.budget, args.reduced, args.plan, args.only,
                        args.work)
    if args.cmd == "measure-compiles":
        os.environ["TRITON_INTERPRET"] = "1"
        plan = build_plan(calls=(1,))
        table = measure_compiles(args.per_kernel, plan, args.jobs)
        COMPILE_TABLE.write_text(json.dumps(table, indent=1) + "\n")
        print(json.dumps(table, indent=1))
        return 0
    if args.cmd == "sanitize-target":
        return sanitize_target(args.reduced)
    if args.cmd == "ncu-target":
        return ncu_target(args.reduced)
    return 2


if __name__ == "__main__":
    sys.exit(main())

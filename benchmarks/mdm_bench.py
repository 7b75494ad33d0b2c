"""Helpers of the benchmark suite: device, sizes, workloads, measurement and ``extra_info``.

The suite *measures*; it never asserts timings.  Every row is one (workload, backend) pair;
rows of the same workload share a pytest-benchmark ``group`` so the backends sit side by side,
and ``extra_info`` carries the figures the runner (``python -m mdm_kernels.bench``) tabulates.

Timing
    GPU: CUDA events around each step inside pytest-benchmark's pedantic mode (the pedantic
    target synchronises, so pytest-benchmark's own wall-clock stats are synchronised too);
    ``extra_info["median_s"]`` is the CUDA-event median.  CPU: ``time.perf_counter``.
    The first call (JIT/``torch.compile`` compilation, autotuning) and the warm-up rounds are
    excluded from the statistics; the first call's duration is reported as ``compile_s``.
Memory
    GPU: ``torch.cuda.max_memory_allocated`` during one step, minus what was allocated before
    it (inputs and parameters), i.e. the step's working memory.  CPU: the peak of torch's CPU
    allocator during one step above its level at the start, from ``torch.profiler``'s memory
    events (:func:`mdm_kernels.bench.torch_cpu_peak_bytes`; tracemalloc and RSS miss it).
FLOPs
    A *nominal* count, the same for every backend of a workload (so FLOP/s ratios equal speed
    ratios): matmul FLOPs of the critic on every scored sample, forward + backward = 3x forward,
    gradient penalty by double backward = 6x forward on its interpolated rows.
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ON_GPU = DEVICE.type == "cuda"

#: Backends of an op row, in the order they run (eager and compile first: the fused rows
#: take their ratios from them).
OP_BACKENDS = ("eager", "compile", "triton", "cuda", "torch-mist")

#: Dense peak throughput, FLOP/s, per device-name pattern (first match wins):
#: FP32 (CUDA cores), TF32 and BF16 (tensor cores, dense, no sparsity).  NVIDIA datasheets.
DEVICE_PEAKS = (
    ("H200", {"fp32": 67e12, "tf32": 494.7e12, "bf16": 989.4e12}),
    ("H100 NVL", {"fp32": 60e12, "tf32": 417.5e12, "bf16": 835.5e12}),
    ("H100 PCIe", {"fp32": 51.2e12, "tf32": 378e12, "bf16": 756e12}),
    ("H100", {"fp32": 67e12, "tf32": 494.7e12, "bf16": 989.4e12}),  # SXM5
)

#: FP32 instructions per (pair, hidden unit) of the forward of a one-hidden-layer critic on
#: the "all" grid (gather-add of projections, activation, FMA with the output weight).
INSTR_PER_PAIR_HIDDEN = 3


def device_name() -> str:
    """The benchmarked device: the GPU in use, else the host CPU (as the runner names it)."""
    if ON_GPU:
        return torch.cuda.get_device_name(DEVICE)
    from mdm_kernels.bench import device_name as host_device_name
    return host_device_name()


def device_peaks(name: str | None = None) -> dict | None:
    """Peak FLOP/s of the GPU called ``name`` (None on CPU or an unknown GPU)."""
    if not ON_GPU and name is None:
        return None
    name = name or device_name()
    for pattern, peaks in DEVICE_PEAKS:
        if pattern.lower() in name.lower():
            return peaks
    return None


# --------------------------------------------------------------------------- workloads

@dataclass(frozen=True)
class OpCase:
    """One workload: an estimator loss (or the gradient penalty alone), fwd + bwd."""
    op: str                      # mine, nwj, js, infonce, wasserstein, gp
    batch: int
    dims: tuple
    hidden: tuple
    negatives: object            # "shuffle", int K, "all", "distinct"
    section: str                 # paper, paper-m2, sweep-m2, sweep-m3, sweep-gp

    @property
    def m(self) -> int:
        return len(self.dims)

    def family(self) -> str:
        """The workload without its batch size (one curve of the plots)."""
        d = "x".join(map(str, self.dims))
        h = "x".join(map(str, self.hidden))
        neg = self.negatives if self.op != "gp" else "shuffle"
        return f"{self.section}/{self.op}/m{self.m}-d{d}-H{h}-{neg}"

    def key(self) -> str:
        return f"{self.family()}/B{self.batch}"

    def id(self) -> str:
        return self.key().replace("/", ":")

    def num_marginal(self) -> int:
        b = self.batch
        if self.op == "gp":
            return 0
        if self.negatives == "all":
            return b * b if self.op == "infonce" else b ** self.m
        if self.negatives == "distinct":  # pairwise distinct indices; InfoNCE: j != i
            return b * (b - 1) if self.op == "infonce" else math.perm(b, self.m)
        k = 1 if self.negatives == "shuffle" else int(self.negatives)
        return b * (k + 1) if self.op == "infonce" else b * k

    def gp_rows(self) -> int:
        if self.op == "gp":
            return self.batch
        if self.op != "wasserstein":
            return 0
        k = 1 if self.negatives in ("shuffle", "all", "distinct") else int(self.negatives)
        return k * self.batch


def critic_fwd_flops(n: int, dims, hidden) -> int:
    """Matmul FLOPs of the critic's forward on n samples."""
    per = 2 * sum(dims) * hidden[0] + 2 * hidden[-1]
    for a, b in zip(hidden[:-1], hidden[1:]):
        per += 2 * a * b
    return n * per


def nominal_flops(case: OpCase) -> int:
    joint = case.batch if case.op != "gp" else 0
    fwd = critic_fwd_flops(joint + case.num_marginal(), case.dims, case.hidden)
    gp = critic_fwd_flops(case.gp_rows(), case.dims, case.hidden)
    return 3 * fwd + 6 * gp


def predicted_eager_bytes(case: OpCase) -> int:
    """Rough working memory of the broadcast reference (gathered inputs, pre-activations,
    activations and their gradients of every scored sample), to skip hopeless rows."""
    n = case.batch + case.num_marginal() + 3 * case.gp_rows()
    return 4 * n * (2 * sum(case.dims) + 4 * sum(case.hidden) + 8)


def _dims(m: int, d: int) -> tuple:
    return (d,) * m


def paper_cases(sizes: str, on_gpu: bool | None = None) -> list[OpCase]:
    """Paper scale: m = 3, B = 32-256, d = 32-128, H = 64-256, "shuffle" and K = 8.
    ``on_gpu``: the grid of a GPU (True) or a CPU (False) machine, default this one's
    (``python/gpu_lease.py`` lists the GPU's rows on a CPU)."""
    on_gpu = ON_GPU if on_gpu is None else on_gpu
    ops = ("mine", "nwj", "js", "infonce", "wasserstein", "gp")
    if sizes == "full":
        batches = (32, 64, 128, 256)
    elif sizes == "quick":
        batches = (32, 256) if on_gpu else (32, 128)
    else:  # smoke
        batches = (32,)
    hiddens = ((128,), (128, 128))
    cases = []
    for op in ops:
        for hidden in hiddens:
            for neg in (("shuffle",) if op == "gp" else ("shuffle", 8)):
                for b in batches:
                    cases.append(OpCase(op, b, _dims(3, 64), hidden, neg, "paper"))
    if sizes != "smoke":  # the rest of the paper's range of widths, at the largest batch
        for hidden in ((64,), (256,)):
            cases.append(OpCase("mine", batches[-1], (32, 64, 128), hidden, "shuffle", "paper"))
    # m = 2 at paper scale, where the peer library (two variables only) has the same estimators
    m2_batches = batches if sizes != "full" else (32, 256)
    for op in ("mine", "nwj", "js", "infonce"):
        for neg in ("shuffle", 8):
            for b in (m2_batches if sizes != "smoke" else batches):
                cases.append(OpCase(op, b, _dims(2, 64), (128,), neg, "paper-m2"))
    return cases


def sweep_cases(sizes: str, on_gpu: bool | None = None) -> list[OpCase]:
    """Scale sweeps: "all" negatives, m = 2 to B = 65,536; m = 3 to B^3 = 10^9; GP to 4,096;
    ``"distinct"`` negatives (no coinciding indices) next to the one-layer ``"all"`` rows of
    ``mine`` (m = 2 and 3) and ``infonce`` (m = 2), at the same sizes.  ``on_gpu`` as in
    :func:`paper_cases`."""
    on_gpu = ON_GPU if on_gpu is None else on_gpu
    if on_gpu:
        m2 = (256, 1024, 4096, 16384, 65536) if sizes == "full" else (256, 4096, 16384)
        m3 = (64, 256, 1000) if sizes == "full" else (64, 256)
        gp = (256, 4096)
    else:
        m2 = (64, 256) if sizes != "smoke" else (64,)
        m3 = (16, 32) if sizes != "smoke" else (16,)
        gp = (256,) if sizes != "smoke" else (64,)
    if sizes == "smoke":
        m2, m3 = m2[:1], m3[:1]
    cases = []
    for op in ("mine", "infonce"):
        for hidden in ((128,), (128, 128)):
            for b in m2:
                cases.append(OpCase(op, b, _dims(2, 128), hidden, "all", "sweep-m2"))
    for op in ("mine", "infonce"):
        for b in m2:
            cases.append(OpCase(op, b, _dims(2, 128), (128,), "distinct", "sweep-m2"))
    if on_gpu and sizes == "quick":  # issue 7's largest target row, one-layer MINE only
        cases.append(OpCase("mine", 65536, _dims(2, 128), (128,), "all", "sweep-m2"))
    for b in m3:
        for neg in ("all", "distinct"):
            cases.append(OpCase("mine", b, _dims(3, 64), (128,), neg, "sweep-m3"))
    for b in gp:
        cases.append(OpCase("gp", b, _dims(3, 64), (128,), "shuffle", "sweep-gp"))
    return cases


def compile_row_allowed(case: OpCase, sizes: str) -> str | None:
    """Why the torch.compile row of ``case`` is skipped (compilation takes 10-30 s a shape),
    or None."""
    if case.op == "gp" or (case.op == "wasserstein" and (sizes != "full" or not ON_GPU)):
        # the double backward (autograd.grad(create_graph=True)) does not compile; the full
        # grid still tries (and reports the error as the skip reason)
        why = ("torch.compile cannot trace the gradient penalty's double backward "
               "(autograd.grad(create_graph=True))")
        if case.op == "wasserstein" and ON_GPU:  # only the GPU's full grid tries this row
            return why + "; on a GPU, --bench-sizes full tries it and reports the error"
        return why + "; no size grid compiles this row"
    if ON_GPU:
        if sizes == "full":
            if case.section in ("paper", "paper-m2") and case.batch not in (32, 256):
                return "torch.compile rows at paper scale: B = 32 and 256 only (compile time)"
            return None
        # quick: the reference workloads only
        if case.section == "paper" and case.batch == 256 and (
                case.op == "mine" or (case.hidden == (128,) and case.negatives == "shuffle")):
            return None
        if case.section == "sweep-m2" and case.op == "mine" and case.hidden == (128,) \
                and case.negatives == "all":
            return None
        return "quick run: torch.compile rows for the reference workloads only (compile time)"
    if sizes == "smoke":
        return ("smoke run: torch.compile rows need 15-40 s of compilation each on a CPU; "
                "they run with --benchmark-only")
    if case.op == "mine" and case.hidden == (128,) and (
            (case.section in ("paper", "paper-m2") and case.batch == 32
             and case.negatives == "shuffle")
            or (case.section == "sweep-m2" and case.batch == 256 and case.negatives == "all")):
        return None
    return "CPU run: three torch.compile rows only (mine: paper m = 3 and m = 2 at B = 32, " \
           "'all' m = 2 at B = 256) — compilation takes 15-40 s a shape on a small CPU"


# --------------------------------------------------------------------------- steps

LOSSES = {}


def _loss_fn(op: str):
    import mdm_kernels as mk
    return {"mine": mk.mine_loss, "nwj": mk.nwj_loss, "js": mk.js_loss,
            "infonce": mk.infonce_loss, "wasserstein": mk.wasserstein_loss}[op]


def make_inputs(case: OpCase, seed: int = 0):
    from mdm_kernels import MLPCritic
    torch.manual_seed(seed)
    critic = MLPCritic(case.dims, hidden=case.hidden).to(DEVICE)
    zs = [torch.randn(case.batch, d, device=DEVICE, requires_grad=True) for d in case.dims]
    return critic, zs


def triton_path(case: OpCase, critic, zs) -> str | None:
    """Which Triton kernel family runs the estimator of ``case`` (``"single"``, ``"outer"`` or
    ``"grid"``, see docs/triton_backend.md); None for the gradient penalty alone."""
    if case.op == "gp":
        return None
    from mdm_kernels.ops.router import execution_path
    from mdm_kernels.reference.estimators import resolve_samples
    kind = {"mine": "dv"}.get(case.op, case.op)
    neg = None if (kind == "infonce" and case.negatives == "all") else case.negatives
    return execution_path(kind, critic, zs, resolve_samples(kind, zs, neg, None, None))


def make_op_step(case: OpCase, backend: str, critic, zs) -> Callable[[], torch.Tensor]:
    """A closure running one fwd + bwd of ``case`` on ``backend`` (random negatives drawn
    inside, as in training)."""
    params = list(critic.parameters()) + list(zs)
    lib_backend = {"eager": "reference", "compile": "reference"}.get(backend, backend)

    if case.op == "gp":
        from mdm_kernels import gradient_penalty

        def loss(*zs):
            b = zs[0].shape[0]
            marg = [zs[0]] + [z[torch.randperm(b, device=z.device)] for z in zs[1:]]
            return gradient_penalty(critic, list(zs), marg, backend=lib_backend)
    else:
        fn = _loss_fn(case.op)
        neg = case.negatives

        def loss(*zs):
            return fn(critic, *zs, negatives=neg, backend=lib_backend)

    if backend == "compile":
        torch._dynamo.reset()
        loss = torch.compile(loss, dynamic=False)

    def step():
        for p in params:
            p.grad = None
        out = loss(*zs)
        out.backward()
        return out

    return step


#: The documented way to install the optional peer library beside the environment
#: (docs/benchmarks.md): its metadata pins numpy<2, so no dependency resolution.
PEER_INSTALL = ("pip install --no-deps --target DIR torch-mist pyro-ppl pyro-api opt_einsum "
                "pandas python-dateutil tzdata scikit-learn joblib threadpoolctl cloudpickle "
                "narwhals; PYTHONPATH=DIR")

#: The peer library's ``neg_samples`` for our grid modes (m = 2): 0 = all B candidates of
#: each row, the diagonal included; -1 = the B − 1 others.  An int K (and "shuffle" = 1) is
#: K cyclic shifts of the batch, (n + 1 + k) mod B, k < K — never the positive itself.
PEER_NEG_SAMPLES = {"all": 0, "distinct": -1, "shuffle": 1}


class PeerImportError(RuntimeError):
    """The peer library is installed but does not import: an error of the run, not a skip."""


def peer_estimator_note(case: OpCase) -> str | None:
    """How the peer row's estimator differs from ours, or None when both sides compute the
    same estimator (tests/test_peer_torch_mist.py checks those value for value).

    InfoNCE with K shuffles: our candidates are the positive and K shuffled rows (bound
    ≤ log(K + 1)); torch-mist's ``neg_samples=K`` candidates are K other rows without the
    positive (the partition function of the ``"distinct"`` form, over K rows) — a different
    estimator, no configuration of either side makes them equal.  The other rows match:
    DV/NWJ/JS over K·B marginal samples (ours random shuffles, the peer's cyclic shifts:
    other draws of the same estimator), InfoNCE ``"all"``/``"distinct"`` exactly.
    """
    if case.op == "infonce" and case.negatives not in ("all", "distinct"):
        return "≠ estimator: peer candidates exclude the positive"
    return None


def make_peer_step(case: OpCase, zs) -> Callable[[], torch.Tensor]:
    """The same estimator in torch-mist (two variables, joint MLP critic).

    ``mine``: torch-mist's ``MINE.loss`` trains with a moving-average partition term (its
    ``_train_baseline``, γ = 0.9, the batch mean of e^T clamped to [1e-4, 1e4] before
    averaging); our ``mine_loss`` row has no moving average, so the peer trains with its
    batch log-mean-exp baseline instead — the DV loss and gradient, like ours.
    """
    import torch_mist.estimators as tme
    factory = {"mine": tme.mine, "nwj": tme.nwj, "js": tme.js, "infonce": tme.infonce}[case.op]
    neg = PEER_NEG_SAMPLES.get(case.negatives, case.negatives)
    est = factory(x_dim=case.dims[0], y_dim=case.dims[1], hidden_dims=list(case.hidden),
                  critic_type="joint", neg_samples=neg).to(DEVICE)
    if case.op == "mine":
        est._train_baseline = est.baseline  # BatchLogMeanExp("all"): the DV bound
    params = list(est.parameters()) + list(zs)
    cached = [mod for mod in est.modules()]

    def step():
        # torch-mist memoises method results keyed on the argument values (torch.equal);
        # with the same z's every step it would return the previous step's freed graph.
        # Training feeds new z's each step, so start every step from an empty cache.
        for mod in cached:
            if "__cache" in mod.__dict__:
                mod.__dict__["__cache"] = {}
        for p in params:
            p.grad = None
        out = est.loss(zs[0], zs[1])
        out.backward()
        return out

    return step


def import_peer():
    """Import torch-mist: None when it is not installed; raises :class:`PeerImportError`
    when it is installed (found on the path) but fails to import — a broken recipe must not
    silently turn every peer row into a skip."""
    import importlib
    import importlib.util
    try:
        spec = importlib.util.find_spec("torch_mist")
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        return None
    try:
        return importlib.import_module("torch_mist")
    except Exception as exc:  # a missing dependency (sklearn, narwhals...) or a broken one
        raise PeerImportError(
            f"torch-mist is installed ({spec.origin}) but does not import: "
            f"{type(exc).__name__}: {exc}; install it as documented: {PEER_INSTALL}") from exc


def peer_unavailable(case: OpCase) -> str | None:
    """Why the torch-mist row of ``case`` is skipped (no equivalent, not installed), or None;
    raises :class:`PeerImportError` for an installation that does not import."""
    if case.op not in ("mine", "nwj", "js", "infonce"):
        return f"torch-mist has no {case.op} estimator with this critic/penalty"
    if case.m != 2:
        return "torch-mist estimates I(X;Y) between two variables; no m = 3 equivalent"
    if import_peer() is None:
        return f"optional peer library torch-mist not installed ({PEER_INSTALL})"
    return None


def fused_unavailable(backend: str) -> str | None:
    """Why a fused backend row cannot run here at all, or None."""
    if not ON_GPU:
        return (f"{backend} rows are GPU-only: no CUDA device here (the Triton CPU interpreter, "
                "TRITON_INTERPRET=1, is a test vehicle and is not benchmarked)")
    from mdm_kernels.dispatch import BackendUnavailable, get_backend
    try:
        impl = get_backend(backend)
    except BackendUnavailable as exc:
        return str(exc)
    return impl.unavailable_reason(DEVICE)


# --------------------------------------------------------------------------- measurement

def sync():
    if ON_GPU:
        torch.cuda.synchronize(DEVICE)


def peak_memory(step) -> tuple[int | None, int | None, str]:
    """(working bytes of one step, absolute peak bytes, kind)."""
    if ON_GPU:
        sync()
        torch.cuda.reset_peak_memory_stats(DEVICE)
        base = torch.cuda.memory_allocated(DEVICE)
        step()
        sync()
        peak = torch.cuda.max_memory_allocated(DEVICE)
        return peak - base, peak, "cuda_max_memory_allocated"
    from mdm_kernels.bench import torch_cpu_peak_bytes
    working = torch_cpu_peak_bytes(step)
    return working, None, "torch_cpu_allocator_profiler" if working is not None else "unavailable"


def count_kernels(step) -> dict:
    """Kernels launched by one step (GPU, torch.profiler); empty on CPU."""
    if not ON_GPU:
        return {}
    try:
        from torch.autograd import DeviceType
        from torch.profiler import ProfilerActivity, profile
        sync()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            step()
            sync()
        names = [e.name for e in prof.events() if e.device_type == DeviceType.CUDA]
        kernels = [n for n in names if not n.lower().startswith(("memcpy", "memset"))]
        return {"kernels_per_step": len(kernels), "cuda_events_per_step": len(names)}
    except Exception as exc:  # profiler quirks must not kill the row
        return {"kernels_per_step": None, "kernel_count_error": f"{type(exc).__name__}: {exc}"}


class OOM(Exception):
    pass


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


@dataclass
class Measurement:
    times: list = field(default_factory=list)
    compile_s: float | None = None


#: Per-session results for the ratios: key -> backend -> (median_s, peak_bytes).
RESULTS: dict[str, dict[str, tuple]] = {}


def run_row(benchmark, step, *, key: str, backend: str, flops: int | None,
            disabled: bool, info: dict, pair_hidden: int | None = None) -> None:
    """Warm up (compile), then time ``step`` in pedantic mode and fill ``extra_info``."""
    benchmark.group = key
    benchmark.extra_info.update(info)
    benchmark.extra_info.update(backend=backend, device=device_name(), key=key,
                                torch_threads=torch.get_num_threads())
    meas = Measurement()
    oom = None
    try:
        t0 = time.perf_counter()
        step()
        sync()
        meas.compile_s = time.perf_counter() - t0
    except Exception as exc:
        if not _is_oom(exc):
            raise
        oom = f"out of memory on {device_name()}: {str(exc).strip().splitlines()[0][:200]}"
    if oom:  # outside the except block, so the traceback's tensors can be freed
        _free()
        raise OOM(oom)
    if disabled:  # smoke: the body runs once more through pytest-benchmark, nothing else
        benchmark.pedantic(step, rounds=1, iterations=1)
        return
    first = meas.compile_s
    # a second call estimates the steady step time, to size the rounds
    t0 = time.perf_counter()
    step()
    sync()
    est = max(time.perf_counter() - t0, 1e-6)
    budget = 1.0 if ON_GPU else 0.4
    rounds = int(min(200 if ON_GPU else 30, max(3, math.ceil(budget / est))))
    warmup = 3 if ON_GPU else 1

    if ON_GPU:
        def target():
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            meas.times.append(start.elapsed_time(end) / 1e3)
        timer = "cuda_events"
    else:
        def target():
            t = time.perf_counter()
            step()
            meas.times.append(time.perf_counter() - t)
        timer = "perf_counter"
    benchmark.pedantic(target, rounds=rounds, iterations=1, warmup_rounds=warmup)
    times = meas.times[warmup:] or meas.times
    median = statistics.median(times)
    mem, mem_total, mem_kind = peak_memory(step)
    ex = benchmark.extra_info
    ex.update(median_s=median, median_ms=median * 1e3, timer=timer, rounds=len(times),
              warmup_rounds=warmup, compile_s=first, steady_first_s=est,
              peak_mem_bytes=mem, peak_mem_total_bytes=mem_total, peak_mem_kind=mem_kind)
    if flops:
        ex["flops"] = flops
        ex["flops_per_s"] = flops / median
        peaks = device_peaks()
        if peaks:
            for k, v in peaks.items():
                ex[f"peak_share_{k}"] = flops / median / v
    if pair_hidden:
        ex["pair_hidden_per_s"] = pair_hidden / median
        peaks = device_peaks()
        if peaks:
            bound = peaks["fp32"] / 2 / INSTR_PER_PAIR_HIDDEN  # FMA = 2 FLOPs, 1 instruction
            ex["pair_hidden_share_fp32_instr"] = pair_hidden / median / bound
    ex.update(count_kernels(step))
    RESULTS.setdefault(key, {})[backend] = (median, mem)
    add_ratios(ex, key, backend)


def add_ratios(ex: dict, key: str, backend: str) -> None:
    mine = RESULTS.get(key, {}).get(backend)
    if mine is None:
        return
    for base in ("eager", "compile"):
        other = RESULTS.get(key, {}).get(base)
        if other is None or base == backend:
            continue
        ex[f"speedup_vs_{base}"] = other[0] / mine[0]
        if other[1] and mine[1]:
            ex[f"mem_ratio_vs_{base}"] = other[1] / mine[1]


def _free():
    import gc
    gc.collect()
    if ON_GPU:
        torch.cuda.empty_cache()

"""Static GPU-resource gate: compile the fused kernels ahead of time for sm_80 and sm_90 and
read what each needs — shared memory per block, registers and spills per thread — with no
GPU.

The variants are what the router (:mod:`~mdm_kernels.ops.router`) can launch at the edges of
what it accepts: every kernel family × 1/2 hidden layers × each activation × the widest
hidden layer it takes (:data:`~mdm_kernels.ops.gathered_tiles.GATHERED_MAX_HIDDEN`,
:data:`~mdm_kernels.ops.gradient_penalty.GP_MAX_HIDDEN`,
:data:`~mdm_kernels.ops.single_program.MAX_HIDDEN`) × each m and negatives layout × every tile
config its autotuner keeps there.  Each is compiled the way a launch compiles it: integer
arguments that are multiples of 16 at the edge carry ``tt.divisibility = 16``, integers equal
to 1 are constants, pointers are 16-byte aligned (torch allocations).

* shared memory: ``CompiledKernel.metadata.shared`` (bytes per block), against
  :data:`SHARED_LIMITS` (the opt-in per-block maximum of the target);
* registers and spills per thread: the ``ptxas -v`` log of the binary that runs — Triton's
  own ptxas run (``TRITON_DUMP_PTXAS_LOG``), or, when Triton's compile came from its cache
  and ran no ptxas, a ptxas run with Triton's own command line (:func:`triton_ptxas_args`:
  the ptxas Triton picks for the target, ``-lineinfo``, ``--fmad``, ``-v``,
  ``--regAllocOptLevel=2``, ``--gpu-name=sm_90a``) whose cubin must equal Triton's byte
  for byte (else the variant is an error, never a figure of another binary).

Each variant compiles with the launch's options: its ``num_warps`` and ``num_stages`` — the
autotune config's for the autotuned families, Triton's default (:func:`launch_num_stages`,
3) for the kernels launched without one (one-program, outer sums, split sums).

Results are cached on disk (:func:`cache_dir`), one JSON file per variant keyed by a hash of
the kernel source and everything it calls (Triton's ``cache_key``), the signature, the
constants, the target, the options and the Triton and ptxas versions: a changed kernel or
compiler is compiled again, an unchanged one is read back.  Compiles run in parallel
(a fork-based process pool).

Nothing in the package imports this module (it sits above the backend in the ``ops``
layering); ``python/compile_sm90.py`` is its command line and ``tests/test_gpu_resources.py``
its CI gate.  Triton's interpreter must be off in the process that compiles
(``TRITON_INTERPRET`` unset before Triton is imported): :func:`main` is meant to run in a
fresh process.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import inspect
import io
import itertools
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

#: Shared memory a block may use (the opt-in maximum, ``cudaDevAttrMaxSharedMemoryPerBlockOptin``):
#: sm_90 (H100 / H200) 227 KiB, sm_80 (A100) 163 KiB.
SHARED_LIMITS = {90: 232_448, 80: 166_912}
#: Spill stores per thread (bytes, ptxas) that a variant may have: the kernels' measured
#: worst case rounded up (module docstrings and docs/triton_backend.md give the figures);
#: above it a change has made some kernel markedly worse.
SPILL_BUDGET = 4096
#: Targets the gate compiles for.
ARCHS = (90, 80)


@dataclasses.dataclass
class Variant:
    """One kernel compilation: ``kernel`` (a ``JITFunction``), its constexprs, the values of
    its integer arguments at the edge (for the launch-like specialisation), the names of its
    float and integer-pointer arguments, and the launch options."""
    family: str
    label: str
    kernel: object
    constexprs: dict
    ints: dict
    floats: tuple = ()
    ptr_types: dict = dataclasses.field(default_factory=dict)
    num_warps: int = 8
    #: ``None``: the launch passes no ``num_stages`` and compiles at Triton's default
    #: (:func:`launch_num_stages`); else the autotune config's.
    num_stages: int | None = None

    def stages(self) -> int:
        """The ``num_stages`` the launch compiles with."""
        return launch_num_stages() if self.num_stages is None else self.num_stages

    def signature(self) -> tuple[dict, dict, dict]:
        """(signature, constexprs, attrs) as ``triton.compile`` takes them, specialised like
        a launch: an int equal to 1 becomes a constant, a multiple of 16 gets
        ``tt.divisibility``, every pointer is 16-byte aligned."""
        fn = self.kernel
        consts = dict(self.constexprs)
        params = inspect.signature(fn.fn).parameters
        for name, param in params.items():
            if "constexpr" in str(param.annotation) and name not in consts:
                if param.default is inspect.Parameter.empty:
                    raise ValueError(f"{fn.fn.__name__}: no value for the constexpr {name!r} "
                                     f"(variant {self.label})")
                consts[name] = param.default
        sig, attrs = {}, {}
        for i, name in enumerate(params):
            if name in consts:
                sig[name] = "constexpr"
            elif name in self.ints:
                value = self.ints[name]
                if value == 1:
                    sig[name] = "constexpr"
                    consts[name] = 1
                else:
                    sig[name] = "i32"
                    if value % 16 == 0:
                        attrs[(i,)] = [["tt.divisibility", 16]]
            elif name in self.floats:
                sig[name] = "fp32"
            elif name in self.ptr_types or name.endswith("_ptr") \
                    or re.fullmatch(r"d?[zw]\d", name):
                sig[name] = self.ptr_types.get(name, "*fp32")
                attrs[(i,)] = [["tt.divisibility", 16]]
            else:
                raise ValueError(f"{fn.fn.__name__}: no value for the argument {name!r} "
                                 f"(variant {self.label}): add it to the variant's ints, "
                                 f"floats or ptr_types")
        return sig, consts, attrs


# ----------------------------------------------------------------------------- compiling
#: Version of how a record is measured (part of every cache key): 2 = the launch's
#: ``num_stages`` and the registers / spills of the binary Triton builds (its ptxas log, or
#: its exact ptxas command line checked against its cubin); 1 was ``num_stages = 1`` for
#: the default-launched kernels and a plain ``ptxas -v`` when Triton's compile was cached.
MEASUREMENT = 2


def launch_num_stages() -> int:
    """``num_stages`` of a launch that passes none: Triton's CUDA default
    (``CUDAOptions.num_stages``, 3 in Triton 3.x)."""
    from triton.backends.nvidia.compiler import CUDAOptions
    return CUDAOptions.num_stages


def _ptxas_path(arch: int) -> str:
    """The ptxas Triton runs for ``sm_<arch>`` (Triton 3.9: its bundled CUDA 13 ptxas,
    ``ptxas-blackwell``, for sm_90+, the CUDA 12 one below; ``TRITON_PTXAS_PATH`` et al.
    override them)."""
    from triton.backends.nvidia.compiler import get_ptxas
    return get_ptxas(arch).path


def ptxas_available() -> str | None:
    """Path of the ptxas Triton runs for sm_90 when it runs, or None."""
    try:
        path = _ptxas_path(90)
        subprocess.run([path, "--version"], capture_output=True, check=True, timeout=60)
    except (ImportError, AttributeError, RuntimeError, OSError, subprocess.SubprocessError):
        return None
    return path


def _ptxas_version() -> str:
    versions = []
    for arch in ARCHS:
        path = _ptxas_path(arch)
        out = subprocess.run([path, "--version"], capture_output=True, text=True).stdout
        versions.append(out.strip().splitlines()[-1] if out.strip() else path)
    return ";".join(versions) or "none"


def triton_ptxas_args(metadata, arch: int) -> list[str]:
    """The ptxas options Triton's CUDA backend passes when it builds the cubin of a kernel
    compiled with ``metadata`` (its options) for ``sm_<arch>`` — written after
    ``CUDABackend.make_cubin`` of Triton 3.9 (``triton/backends/nvidia/compiler.py``): line
    information (``-lineinfo``, or ``-lineinfo -suppress-debug-info`` with
    ``TRITON_DISABLE_LINE_INFO``, or ``-g`` with ``DISABLE_PTXAS_OPT``), ``--fmad=false``
    unless FP fusion is on, ``-v``, ``--opt-level 0`` with ``DISABLE_PTXAS_OPT``,
    ``--regAllocOptLevel=2`` (Triton's work-around of a ptxas 13 bug), the options'
    ``ptx_options`` and ``--gpu-name=sm_<arch>`` (``a`` suffix from sm_90).  Input and output
    files are not included.  A Triton whose command differs is caught by the cubin
    comparison of :func:`measure_binary`."""
    from triton import knobs
    if getattr(metadata, "instrumentation_mode", ""):
        raise ValueError("instrumented compiles (consan / fpsan) take other ptxas options")
    if knobs.compilation.disable_line_info:
        debug = ["-lineinfo", "-suppress-debug-info"]
    elif knobs.nvidia.disable_ptxas_opt:
        debug = ["-g"]
    else:
        debug = ["-lineinfo"]
    fmad = [] if metadata.enable_fp_fusion else ["--fmad=false"]
    no_opt = ["--opt-level", "0"] if knobs.nvidia.disable_ptxas_opt else []
    extra = metadata.ptx_options.split(" ") if getattr(metadata, "ptx_options", None) else []
    gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    return [*debug, *fmad, "-v", *no_opt, "--regAllocOptLevel=2", *extra, f"--gpu-name={gpu}"]


def run_triton_ptxas(ptx: str, metadata, arch: int) -> tuple[str, bytes]:
    """(``-v`` log, cubin) of Triton's ptxas command (:func:`triton_ptxas_args`) on ``ptx``."""
    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp) / "kernel.ptx", Path(tmp) / "kernel.cubin"
        src.write_text(ptx)
        proc = subprocess.run([_ptxas_path(arch), *triton_ptxas_args(metadata, arch),
                               str(src), "-o", str(out)], capture_output=True, text=True)
        log = proc.stdout + proc.stderr
        if proc.returncode != 0 or not out.exists():
            raise RuntimeError("ptxas: " + (log.strip().splitlines()[0] if log.strip()
                                            else f"exit status {proc.returncode}"))
        return log, out.read_bytes()


def measure_binary(kernel, arch: int, triton_log: str = "") -> dict:
    """registers / spill stores / spill loads / stack frame per thread of the cubin of
    ``kernel`` (a ``CompiledKernel`` for ``sm_<arch>``): from ``triton_log`` (the ``ptxas -v``
    log Triton printed while building that cubin) when it holds the kernel's entry, else
    from Triton's ptxas command re-run on the kernel's PTX, accepted only when the cubin it
    builds is byte-identical to ``kernel``'s (dict(error=...) otherwise)."""
    name = kernel.metadata.name
    if f"'{name}'" in triton_log and _parse_ptxas(triton_log) is not None:
        return _parse_ptxas(triton_log)
    try:
        log, cubin = run_triton_ptxas(kernel.asm["ptx"], kernel.metadata, arch)
    except (RuntimeError, ValueError, OSError) as exc:
        return dict(error=str(exc)[:300])
    if cubin != kernel.asm["cubin"]:
        return dict(error="ptxas: Triton's cubin differs from a re-run of its ptxas command "
                          "(gpu_resources.triton_ptxas_args is out of date with this Triton)")
    usage = _parse_ptxas(log)
    return usage if usage is not None else dict(error="ptxas: no resource usage in its log")


def _source(variant: Variant):
    from triton.compiler import ASTSource
    sig, consts, attrs = variant.signature()
    return ASTSource(variant.kernel, sig, constexprs=consts, attrs=attrs)


def _jit_functions():
    """Every ``@triton.jit`` function of the kernel modules (the ones a kernel can call)."""
    from triton.runtime.jit import JITFunction
    from .ops import (gathered_tiles, gradient_penalty, marginal_terms, outer_sums,
                      sample_tiles, single_program, triton_helpers)
    found = {}
    for module in (triton_helpers, marginal_terms, sample_tiles, gathered_tiles, outer_sums,
                   single_program, gradient_penalty):
        for value in vars(module).values():
            value = getattr(value, "fn", value) if not isinstance(value, JITFunction) else value
            if isinstance(value, JITFunction):
                found[id(value)] = value
    return list(found.values())


@contextlib.contextmanager
def line_free_hashes():
    """Within it, Triton's source hashes of the kernel functions ignore line numbers
    (moving code around a file changes no binary's resources); restored after."""
    saved = [(fn, fn.starting_line_number) for fn in _jit_functions()]
    try:
        for fn, _ in saved:
            fn.starting_line_number, fn.hash = 0, None
        yield
    finally:
        for fn, line in saved:
            fn.starting_line_number, fn.hash = line, None


def variant_key(variant: Variant, arch: int, ptxas_version: str) -> str:
    """Cache key: the source of the kernel and of every function it calls (Triton's
    dependency hash, taken inside :func:`line_free_hashes`), the signature, constants,
    attributes, target, options and the Triton and ptxas versions."""
    return variant_keys([(variant, arch)], ptxas_version)[0]


def variant_keys(pairs, ptxas_version: str) -> list[str]:
    """:func:`variant_key` of every (variant, arch) pair, hashing the sources once."""
    import triton
    keys = []
    with line_free_hashes():
        for variant, arch in pairs:
            text = "|".join([_source(variant).hash(), str(arch), str(variant.num_warps),
                             str(variant.stages()), triton.__version__, ptxas_version,
                             f"measurement {MEASUREMENT}"])
            keys.append(hashlib.sha256(text.encode()).hexdigest()[:32])
    return keys


def _parse_ptxas(text: str) -> dict | None:
    """registers / spill stores / spill loads / stack frame from a ``ptxas -v`` log."""
    def grab(pattern):
        found = re.search(pattern, text)
        return int(found.group(1)) if found else None
    if grab(r"Used (\d+) registers") is None:
        return None
    return dict(registers=grab(r"Used (\d+) registers"),
                spill_stores=grab(r"(\d+) bytes spill stores"),
                spill_loads=grab(r"(\d+) bytes spill loads"),
                stack=grab(r"(\d+) bytes stack frame"))


def compile_kernel(variant: Variant, arch: int, log=None):
    """``triton.compile`` of ``variant`` for ``sm_<arch>`` with the launch's options
    (``num_warps``, :meth:`Variant.stages`); Triton's ``ptxas -v`` log, when it runs ptxas,
    goes to ``log`` (a text stream)."""
    import triton
    from triton.backends.compiler import GPUTarget
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    with contextlib.redirect_stdout(log if log is not None else io.StringIO()):
        return triton.compile(_source(variant), target=GPUTarget("cuda", arch, 32),
                              options=dict(num_warps=variant.num_warps,
                                           num_stages=variant.stages()))


def compile_variant(variant: Variant, arch: int) -> dict:
    """Compile ``variant`` for ``sm_<arch>`` as its launch does and measure the binary:
    dict(shared, registers, spill_stores, spill_loads, stack, seconds) or dict(error=...)
    (:func:`measure_binary`)."""
    t0 = time.time()
    log = io.StringIO()
    try:
        kernel = compile_kernel(variant, arch, log)
    except Exception as exc:  # noqa: BLE001 - reported per variant
        return dict(error=f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]}",
                    seconds=round(time.time() - t0, 2))
    usage = measure_binary(kernel, arch, log.getvalue())
    if "error" in usage:
        return dict(usage, seconds=round(time.time() - t0, 2))
    result = dict(shared=int(kernel.metadata.shared), **usage)
    result["seconds"] = round(time.time() - t0, 2)
    return result


def cache_dir() -> Path:
    """``$MDM_RESOURCE_CACHE``, else ``~/.cache/mdm_kernels/gpu_resources``."""
    env = os.environ.get("MDM_RESOURCE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "mdm_kernels" / "gpu_resources"


_JOBS: list = []   # (variant, arch) of the current measure() call, inherited by fork


def _work(i: int) -> dict:
    variant, arch = _JOBS[i]
    return compile_variant(variant, arch)


def spread_order(keys_by_family: dict[str, list[str]]) -> list[str]:
    """Every key, taken round-robin over the families (each family's keys in their listed
    order): any prefix covers every family evenly."""
    chosen: list[str] = []
    queues = [list(keys) for keys in keys_by_family.values()]
    while any(queues):
        for queue in queues:
            if queue:
                chosen.append(queue.pop(0))
    return chosen


def spread_subset(keys_by_family: dict[str, list[str]], budget: int) -> set[str]:
    """At most ``budget`` keys taken round-robin over the families (:func:`spread_order`):
    a bounded compile still covers every family."""
    return set(spread_order(keys_by_family)[:max(0, budget)])


def measure(variants: list[Variant], archs=ARCHS, jobs: int | None = None,
            cache: Path | None = None, log=None, max_compiles: int | None = None) -> list[dict]:
    """Compile every (variant, arch) not in the cache — in parallel, identical compilations
    once — and return one record per pair: family, label, arch, limit, key, cached and the
    measurements of :func:`compile_variant`.  With ``max_compiles``, at most that many
    compilations run (:func:`spread_subset` over the families); the pairs left out are
    records with ``skipped=True`` and no measurements (a cold cache — a new Triton or ptxas
    release — would otherwise cost hours of CPU on a small machine)."""
    cache = cache_dir() if cache is None else cache
    cache.mkdir(parents=True, exist_ok=True)
    version = _ptxas_version()
    records, todo, seen = [], {}, {}
    pairs = list(itertools.product(variants, archs))
    for (variant, arch), key in zip(pairs, variant_keys(pairs, version)):
        rec = dict(family=variant.family, label=variant.label, arch=arch,
                   limit=SHARED_LIMITS[arch], key=key)
        path = cache / f"{key}.json"
        if path.exists():
            rec.update(json.loads(path.read_text()), cached=True)
        elif key not in seen:
            seen[key] = len(todo)
            todo[key] = (variant, arch)
        records.append(rec)
    by_family: dict[str, list[str]] = {}
    for key, (variant, _) in todo.items():
        by_family.setdefault(variant.family, []).append(key)
    # round-robin over the families: an interrupted or bounded run covers each of them
    order = spread_order(by_family)
    if max_compiles is not None and len(order) > max_compiles:
        left_out = set(order[max_compiles:])
        order = order[:max_compiles]
        for rec in records:
            if rec["key"] in left_out:
                rec["skipped"] = True
    todo = {k: todo[k] for k in order}
    global _JOBS
    _JOBS = list(todo.values())
    keys = list(todo)
    results: dict[str, dict] = {}
    if _JOBS:
        jobs = max(1, min(jobs or os.cpu_count() or 1, len(_JOBS)))
        ctx = multiprocessing.get_context("fork")
        with ctx.Pool(jobs) as pool:
            for i, res in enumerate(pool.imap(_work, range(len(_JOBS)))):
                results[keys[i]] = res
                if "error" not in res or "ptxas" not in res.get("error", ""):
                    (cache / f"{keys[i]}.json").write_text(json.dumps(res))
                if log is not None:
                    variant, arch = _JOBS[i]
                    log(format_record(dict(family=variant.family, label=variant.label,
                                           arch=arch, limit=SHARED_LIMITS[arch], **res)))
    _JOBS = []
    for rec in records:
        if "cached" not in rec and not rec.get("skipped"):
            rec.update(results[rec["key"]], cached=False)
    return records


def problems(records: list[dict], spill_budget: int = SPILL_BUDGET) -> list[str]:
    """The records that fail the gate: compile errors, shared memory above the target's
    limit, spill stores above ``spill_budget`` (records ``skipped`` by a compile budget are
    not measured and not judged)."""
    bad = []
    for rec in records:
        where = f"{rec['family']} {rec['label']} sm_{rec['arch']}"
        if rec.get("skipped"):
            continue
        if "error" in rec:
            bad.append(f"{where}: {rec['error']}")
        elif rec["shared"] > rec["limit"]:
            bad.append(f"{where}: {rec['shared']} B shared memory > {rec['limit']} B")
        elif (rec.get("spill_stores") or 0) > spill_budget:
            bad.append(f"{where}: {rec['spill_stores']} B spill stores per thread > "
                       f"{spill_budget} B")
    return bad


def format_record(rec: dict) -> str:
    head = f"sm_{rec['arch']} {rec['family']:16s} {rec['label']:58s}"
    if "error" in rec:
        return f"{head} ERROR {rec['error']}"
    return (f"{head} smem {rec['shared']:7d} / {rec['limit']}  regs {rec.get('registers')}  "
            f"spill {rec.get('spill_stores')}/{rec.get('spill_loads')}  "
            f"({rec.get('seconds', 0):.0f}s{', cached' if rec.get('cached') else ''})")


# ----------------------------------------------------------------------------- variants
# Which variants: every resource-relevant axis in full — kernel, hidden layers, each tile
# config at the widest hidden layer where the fit table keeps it, sample layout, m, the
# "distinct" grid, owner factor / parameter gradients, Gram or direct GP path, gathered or
# direct GP rows.  Activations and estimator reductions change only element-wise code: the
# estimator kernels are compiled with gelu (erf and exp: the costliest σ and σ') and one
# reduction per layout (the online log-sum-exp, the widest state), and with all five
# activations and every reduction on one layout (:data:`_FULL_LAYOUT`); the penalty, whose
# relu / leaky_relu variant drops the σ'' terms at compile time, with relu and gelu (all five
# on its gathered rows).
_TWO_ACTS = ("relu", "gelu")
_ONE_ACT = ("gelu",)


def _activations(names=None) -> dict:
    """Activation name → kernel code (all of them, or ``names``)."""
    from .ops.triton_helpers import ACTIVATION_CODES
    return {k: v for k, v in ACTIVATION_CODES.items() if names is None or k in names}


def _edge_configs(configs_at, cap: int) -> list:
    """(config, width): each config that ``configs_at(width)`` keeps for some power-of-two
    width ≤ ``cap``, with the widest such width (where it needs the most resources)."""
    widest = {}
    width = 16
    while width <= cap:
        for cfg in configs_at(width):
            widest[(cfg.kwargs["BLOCK_N"], cfg.num_warps)] = (cfg, width)
        width *= 2
    return list(widest.values())


def gradient_penalty_variants() -> list[Variant]:
    """``_gp_kernel``: ``gradient_penalty`` (rows read directly, plain stores) and
    ``wasserstein_loss`` (rows gathered from m = 4 modalities' projections, atomics) ×
    Gram / direct path × 1/2 hidden layers × each BLOCK_N at the widest H_1 = H_2 its fit
    table (:data:`~mdm_kernels.ops.gradient_penalty.GP_CONFIG_MAX_HIDDEN`) allows; all five
    activations on the gathered rows; value-only passes too."""
    from .ops import gradient_penalty as gp
    from .ops.triton_helpers import DOT_PRECISION
    out = []
    layouts = [("direct rows", False, 1), ("gathered m=4", True, 4)]
    for (layout, gather, m), gram, two in itertools.product(layouts, (True, False),
                                                            (False, True)):
        acts = _activations(None if gather else _TWO_ACTS)
        configs = _edge_configs(lambda w: gp.gp_configs(w, w if two else None),
                                gp.GP_MAX_HIDDEN)
        for (act_name, act), (cfg, width), grad in itertools.product(
                acts.items(), configs, (True, False)):
            if not grad and (gather or act_name != "gelu"):
                continue          # value-only: a subset of the gradient pass
            blocks = gp.gp_block_sizes(width, width if two else None, width, gram)
            consts = dict(M_TERMS=m, GATHER=gather, ATOMIC=gather, TWO_LAYERS=two, GRAM=gram,
                          ONE_SIDED=False, ACT=act, COMPUTE_GRAD=grad, DOT_PREC=DOT_PRECISION,
                          BLOCK_N=cfg.kwargs["BLOCK_N"], **blocks)
            ints = dict(N=4096, JB=1024, H1=width, H2=width if two else 1, K=width,
                        N_BUCKET=4096, PSTRIDE=gp._partial_layout(blocks, two)[0])
            out.append(Variant(
                "gradient_penalty",
                f"{layout} {'gram' if gram else 'direct'} L{1 + two} {act_name} H={width} "
                f"BN={cfg.kwargs['BLOCK_N']}{'' if grad else ' value-only'}",
                gp._gp_kernel, consts, ints, floats=("inv_n",), ptr_types={"mi_ptr": "*i32"},
                num_warps=cfg.num_warps, num_stages=cfg.num_stages))
    return out


def _estimator_layouts():
    """(label, IDX, NF, GROUPED, DISTINCT, m, kinds) of every sample layout the estimators
    use: the joint diagonal, shuffles (K explicit index rows), the "all" grid of m = 2, 3, 4
    factors and its "distinct" form (m = 3: the mask does not depend on m), InfoNCE's anchor rows (shuffled candidates, or the
    grouped grid)."""
    from .ops.sample_tiles import IDX_GRID, IDX_JOINT, IDX_NCE, IDX_PERMS
    flat = ("dv", "js", "wasserstein")
    out = [("joint", IDX_JOINT, 0, False, False, 4, ("dv", "js")),
           ("shuffles m=4", IDX_PERMS, 0, False, False, 4, flat),
           ("infonce shuffles m=4", IDX_NCE, 0, False, False, 4, ("infonce",))]
    for distinct in (False, True):
        tag = " distinct" if distinct else ""
        out += [(f"all m={m}{tag}", IDX_GRID, m, False, distinct, m, flat)
                for m in ((3,) if distinct else (2, 3, 4))]
        out.append((f"infonce all m=3{tag}", IDX_GRID, 2, True, distinct, 3, ("infonce",)))
    return out


#: The layout on which every activation and every estimator reduction is compiled.
_FULL_LAYOUT = "all m=3"


def _edge_ints(B: int, h1: int, h2: int | None, nf: int) -> dict:
    """Integer arguments of a launch at batch size B and hidden widths h1 / h2 (with the
    gathered tiles' power-of-two autotune keys)."""
    n, ncol = (B ** nf if nf else 8 * B), B ** max(nf - 1, 1)
    return dict(B=B, N=n, NCOL=ncol, H1=h1, H2=h2 if h2 else 1, N_KEY=n, NCOL_KEY=ncol,
                B_KEY=B)


def gathered_variants() -> list[Variant]:
    """``_bounds_fwd_kernel`` / ``_bounds_bwd_kernel`` of
    :mod:`~mdm_kernels.ops.gathered_tiles`: every sample layout × 1/2 hidden layers × each
    autotune config at the widest first layer its fit table
    (:func:`~mdm_kernels.ops.gathered_tiles.gathered_configs`, up to
    :data:`~mdm_kernels.ops.gathered_tiles.GATHERED_MAX_HIDDEN_ONE_LAYER` /
    :data:`~mdm_kernels.ops.gathered_tiles.GATHERED_MAX_HIDDEN`) keeps it; the backward
    with parameter gradients (owner 0) and, on the grid, without (owner 1)."""
    from .ops import gathered_tiles as gt
    from .ops import marginal_terms as mt
    out = []
    fwd, bwd = gt._bounds_fwd_kernel.fn, gt._bounds_bwd_kernel.fn
    for (label, idx, nf, grouped, distinct, m, kinds), two in itertools.product(
            _estimator_layouts(), (False, True)):
        cap = gt.GATHERED_MAX_HIDDEN if two else gt.GATHERED_MAX_HIDDEN_ONE_LAYER
        owners = [(0, True)] + ([(1, False)] if idx == 2 and not grouped else [])
        edges = _edge_configs(lambda w: gt.gathered_configs(w, two), cap)
        if label != _FULL_LAYOUT:       # the other layouts at the widest layer
            edges = [(cfg, h1) for cfg, h1 in edges if h1 == cap]
        for cfg, h1 in edges:
            # every activation and reduction on the full layout, at the widest layer only
            full = label == _FULL_LAYOUT and h1 == cap
            if label == "joint":
                reds = [mt.RED_SUM, mt.RED_NEG_SOFTPLUS_NEG]
                gmodes = [mt.G_ONE, mt.G_SIGMOID_NEG]
            else:
                use = kinds if full else kinds[:1]
                reds = sorted({mt.MARGINAL_RED[k] for k in use})
                gmodes = sorted({mt.MARGINAL_GMODE[k] for k in use})
            for act_name, act in _activations(None if full else _ONE_ACT).items():
                bn, warps = cfg.kwargs["BLOCK_N"], cfg.num_warps
                tag = f"{label} L{1 + two} {act_name} H1={h1} BN={bn} w{warps}"
                common = dict(M=m, IDX=idx, NF=nf, GROUPED=grouped, DISTINCT=distinct,
                              TWO_LAYERS=two, ACT=act, BLOCK_N=bn, BLOCK_H1=gt.block_size(h1),
                              BLOCK_H2=gt.gathered_block_h2(h1) if two else 16)
                ints = _edge_ints(256, h1, h1 if two else None, nf)
                every = act_name == "gelu"      # every reduction once, with gelu
                for red in reds if every else reds[:1]:
                    out.append(Variant("gathered_tiles", f"fwd {tag} red={red}", fwd,
                                       dict(RED=red, **common), ints,
                                       ptr_types={"perm_ptr": "*i64"}, num_warps=warps,
                                       num_stages=cfg.num_stages))
                for gmode, (owner, pg) in itertools.product(gmodes if every else gmodes[:1],
                                                            owners):
                    out.append(Variant("gathered_tiles", f"bwd {tag} g={gmode} owner={owner}",
                                       bwd, dict(GMODE=gmode, OWNER=owner, PARAM_GRADS=pg,
                                                 **common), ints,
                                       ptr_types={"perm_ptr": "*i64"}, num_warps=warps,
                                       num_stages=cfg.num_stages))
    return out


def single_program_variants() -> list[Variant]:
    """The one-program kernels of :mod:`~mdm_kernels.ops.single_program` at the widest
    hidden layers the router sends there (:func:`~mdm_kernels.ops.router.single_program_reason`:
    :data:`~mdm_kernels.ops.single_program.MAX_HIDDEN` with one hidden layer,
    :data:`~mdm_kernels.ops.router.SINGLE_PROGRAM_MAX_HIDDEN_TWO_LAYERS` with two) × every
    sample layout of m ≤ 4 modalities (unused modality slots: dim = 1, a constant in a
    launch); the backward for m = 2 and 4, with and without the projections' gradient."""
    from .ops import marginal_terms as mt
    from .ops import single_program as sp
    from .ops.router import SINGLE_PROGRAM_MAX_HIDDEN_TWO_LAYERS
    out = []
    fwd, bwd = sp._single_program_fwd_kernel, sp._single_program_bwd_kernel

    def dims(m):
        return {f"dim{j}": (304 if j < m else 1) for j in range(4)}

    for (label, idx, nf, grouped, distinct, m, kinds), two in itertools.product(
            _estimator_layouts(), (False, True)):
        if label == "joint":
            continue          # the joint term is part of every forward
        full = label == _FULL_LAYOUT
        h1 = SINGLE_PROGRAM_MAX_HIDDEN_TWO_LAYERS if two else sp.MAX_HIDDEN
        combos = [(kinds[0], a) for a in _activations(None if full else _ONE_ACT).items()]
        combos += [(k, a) for k in kinds[1:] if full for a in _activations(_ONE_ACT).items()]
        for kind, (act_name, act) in combos:
            consts = dict(M=m, KIND=sp.KIND_CODES[kind], RED_M=mt.MARGINAL_RED[kind],
                          GMODE_J=mt.G_SIGMOID_NEG if kind == "js" else mt.G_ONE,
                          GMODE_M=mt.MARGINAL_GMODE[kind], IDX=idx, NF=nf, GROUPED=grouped,
                          DISTINCT=distinct, TWO_LAYERS=two, ACT=act,
                          BLOCK_H1=sp.block_size(h1), BLOCK_H2=16, BLOCK_N=16,
                          BLOCK_K=32 if two else 16)
            ints = dict(_edge_ints(64, h1, h1 if two else None, nf), SP=4096, **dims(m))
            out.append(Variant("single_program", f"fwd {kind} {label} L{1 + two} {act_name} "
                               f"H={h1}", fwd, consts, ints, floats=("log_n", "log_ncol"),
                               ptr_types={"perm_ptr": "*i64"}))
    for m, has_gp in itertools.product((2, 4), (False, True)):
        consts = dict(M=m, HAS_GP=has_gp, NRB=2, NHB=16, NEED_DZ=True, BLOCK_R=32, BLOCK_K=16,
                      BLOCK_D=64, BLOCK_S=256)
        out.append(Variant("single_program", f"bwd m={m} projections-grad={has_gp} "
                           f"H={sp.MAX_HIDDEN}", bwd, consts,
                           dict(B=64, H1=sp.MAX_HIDDEN, SP=4096, **dims(m))))
    return out


def outer_sum_variants() -> list[Variant]:
    """The outer-sum kernels of :mod:`~mdm_kernels.ops.outer_sums` (one hidden layer; H is a
    loop bound, so their resources do not depend on it): the forward (two and three factors
    × each reduction, every activation on three factors, "distinct"); the fused backward at
    :data:`~mdm_kernels.ops.outer_sums.OUTER_FUSED_TILE` (each score-gradient mode, every
    activation on three factors — relu and leaky relu take the homogeneous ∂w_out path —
    each chunk size the plan may pick, "distinct"); the per-factor backward (two factors:
    each owned factor and mode, every tile of
    :data:`~mdm_kernels.ops.outer_sums.OUTER_BACKWARD_TILES` at BLOCK_O / 32 warps,
    "distinct"); the split-sum kernel."""
    from .ops import marginal_terms as mt
    from .ops import outer_sums as osm
    from .ops.triton_helpers import HOMOGENEOUS_ACTIVATIONS
    out = []
    br, bc = 16, 256       # outer_sums._fwd_tiles() on a GPU
    first = osm.OUTER_BACKWARD_TILES[0]
    rows, cols, chunk = osm.OUTER_FUSED_TILE
    ints = dict(B=256, S=256, H=512, SPLIT_BLOCKS=16, SPAN=64)

    def bwd(gmode, owned, act_name, act, tile=first, distinct=False):
        bs, bo = tile
        label = f"bwd nf=2 g={gmode} owned={owned} {act_name}"
        label += (f" tile={bs}x{bo}" if tile != first else "") + \
            (" distinct" if distinct else "")
        return Variant("outer_sums", label, osm._outer_bwd_kernel,
                       dict(NF=2, OWNED=owned, GMODE=gmode, PARAM_GRADS=owned == 0, ACT=act,
                            BLOCK_S=bs, BLOCK_O=bo, DISTINCT=distinct), ints,
                       num_warps=max(1, bo // 32))

    def fused(nf, gmode, act_name, act, chunk_size=chunk, distinct=False):
        label = f"fused bwd nf={nf} g={gmode} {act_name}"
        label += (f" chunk={chunk_size}" if chunk_size != chunk else "") + \
            (" distinct" if distinct else "")
        return Variant("outer_sums", label, osm._outer_bwd_fused_kernel,
                       dict(NF=nf, GMODE=gmode, ACT=act,
                            HOMOGENEOUS=act in HOMOGENEOUS_ACTIVATIONS, BLOCK_R=rows,
                            BLOCK_O=cols, CHUNK=chunk_size, DISTINCT=distinct), ints,
                       num_warps=max(1, cols // 32))

    for nf in (2, 3):
        kinds = ("dv", "js", "wasserstein") + (("infonce",) if nf == 2 else ())
        reds = sorted({mt.MARGINAL_RED[k] for k in kinds})
        gmodes = sorted({mt.MARGINAL_GMODE[k] for k in kinds})
        for act_name, act in _activations(None if nf == 3 else _ONE_ACT).items():
            every = act_name == "gelu"          # every mode once, with gelu
            for red in reds if every else reds[:1]:
                out.append(Variant("outer_sums", f"fwd nf={nf} red={red} {act_name}",
                                   osm._outer_fwd_kernel,
                                   dict(NF=nf, RED=red, ACT=act, BLOCK_R=br, BLOCK_C=bc), ints,
                                   num_warps=osm.OUTER_FORWARD_WARPS))
            for gmode in gmodes if every else gmodes[:1]:
                out.append(fused(nf, gmode, act_name, act))
        gelu = _activations(_ONE_ACT)["gelu"]
        relu = _activations(("relu",))["relu"]
        for smaller in (chunk // 2,):   # the plan's halved chunk
            out.append(fused(nf, gmodes[0], "relu", relu, smaller))
        out.append(fused(nf, gmodes[0], "gelu", gelu, distinct=True))
        out.append(Variant("outer_sums", f"fwd nf={nf} red={reds[0]} gelu distinct",
                           osm._outer_fwd_kernel, dict(NF=nf, RED=reds[0], ACT=gelu,
                                                       BLOCK_R=br, BLOCK_C=bc, DISTINCT=True),
                           ints, num_warps=osm.OUTER_FORWARD_WARPS))
        if nf == 2:
            for gmode, owned in itertools.product(gmodes, range(2)):
                out.append(bwd(gmode, owned, "gelu", gelu))
            for tile in osm.OUTER_BACKWARD_TILES[1:]:
                out.append(bwd(gmodes[0], 0, "gelu", gelu, tile))
            out.append(bwd(gmodes[0], 0, "gelu", gelu, distinct=True))
    out.append(Variant("outer_sums", "split sums", osm._sum_splits_kernel,
                       dict(BLOCK=osm.SPLIT_SUM_BLOCK),
                       dict(n=256 * 512, NSPLIT=8), num_warps=4))
    return out


#: family name → variant generator.
FAMILIES = {"gradient_penalty": gradient_penalty_variants,
            "gathered_tiles": gathered_variants,
            "single_program": single_program_variants,
            "outer_sums": outer_sum_variants}


def all_variants(families=None) -> list[Variant]:
    """The variants of ``families`` (default: all of :data:`FAMILIES`)."""
    return [v for name in (families or FAMILIES) for v in FAMILIES[name]()]


# ----------------------------------------------------------------------------- command line
#: The committed cache of measurements (key → result), read before the on-disk cache: a CI
#: run compiles only what changed since it was written (``--write-table``).
TABLE = Path(__file__).resolve().parent.parent / "tests" / "gpu_resources_table.json"


def read_table(path: Path = TABLE) -> dict:
    """The committed measurements (an empty dict when the file is missing)."""
    return json.loads(path.read_text()) if path.exists() else {}


def run(families=None, archs=ARCHS, jobs=None, cache=None, table: Path | None = TABLE,
        log=None, max_compiles: int | None = None) -> list[dict]:
    """Measure every variant of ``families`` for ``archs``: the committed ``table``'s
    results first, then the on-disk cache, then compiles (seeding the cache from the table).
    Must run with Triton's interpreter off (see the module docstring)."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("gpu_resources compiles kernels: unset TRITON_INTERPRET before "
                           "Triton is imported (run python/compile_sm90.py)")
    cache = cache_dir() if cache is None else Path(cache)
    cache.mkdir(parents=True, exist_ok=True)
    for key, result in (read_table(table) if table is not None else {}).items():
        path = cache / f"{key}.json"
        if not path.exists():
            path.write_text(json.dumps(result))
    return measure(all_variants(families), archs, jobs, cache, log, max_compiles)


def write_table(records: list[dict], path: Path = TABLE) -> None:
    """Store the measurements of ``records`` (compile errors excluded) as the committed
    table, keyed like the cache."""
    keep = {"shared", "registers", "spill_stores", "spill_loads", "stack", "seconds"}
    table = {r["key"]: {k: r[k] for k in keep if k in r} for r in records
             if "error" not in r and not r.get("skipped")}
    path.write_text(json.dumps(dict(sorted(table.items())), indent=0) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="compile_sm90.py",
        description="Compile the fused kernels for sm_90 and sm_80 (no GPU) and check shared "
                    "memory and register spills against the targets' limits.")
    ap.add_argument("--family", action="append", choices=sorted(FAMILIES),
                    help="only this kernel family (repeatable; default: all)")
    ap.add_argument("--arch", action="append", type=int, choices=sorted(SHARED_LIMITS),
                    help="only this target (repeatable; default: 90 and 80)")
    ap.add_argument("--jobs", type=int, default=None, help="parallel compiles (default: CPUs)")
    ap.add_argument("--json", type=Path, help="write every record to this JSON file")
    ap.add_argument("--no-table", action="store_true",
                    help=f"ignore the committed table ({TABLE.name}); still uses the cache")
    ap.add_argument("--write-table", action="store_true",
                    help=f"store the measurements in {TABLE} for CI")
    ap.add_argument("--partial", action="store_true",
                    help="with --write-table and --max-compiles: store the variants measured "
                         "so far (the committed table then lacks the skipped ones, which CI "
                         "compiles up to its budget and warns about)")
    ap.add_argument("--quiet", action="store_true", help="print only failures and a summary")
    ap.add_argument("--max-compiles", type=int, default=None,
                    help="compile at most this many uncached variants, spread over the "
                         "families; the rest are reported as skipped (default: no limit)")
    args = ap.parse_args(argv)
    if args.jobs is not None and args.jobs < 1:
        ap.error("--jobs must be >= 1")
    if args.max_compiles is not None and args.max_compiles < 0:
        ap.error("--max-compiles must be >= 0")
    if ptxas_available() is None:
        print("compile_sm90.py: error: no ptxas found (Triton's bundled one or CUDA's)",
              file=sys.stderr)
        return 2
    t0 = time.time()
    log = None if args.quiet else (lambda line: print(line, flush=True))
    records = run(args.family, tuple(args.arch or ARCHS), args.jobs,
                  table=None if args.no_table else TABLE, log=log,
                  max_compiles=args.max_compiles)
    if log is not None:
        for rec in records:
            if rec.get("cached"):
                log(format_record(rec))
    bad = problems(records)
    import triton
    skipped = sum(bool(r.get("skipped")) for r in records)
    compiled = sum(not r.get("cached") and not r.get("skipped") for r in records)
    print(f"{len(records)} variant compilations (triton {triton.__version__}; {compiled} "
          f"compiled, {len(records) - compiled - skipped} cached, {skipped} skipped by "
          f"--max-compiles) in {time.time() - t0:.0f} s; "
          f"{len(bad)} over the limits (shared memory per block: "
          + ", ".join(f"sm_{a} {SHARED_LIMITS[a]} B" for a in sorted(SHARED_LIMITS))
          + f"; spill stores: {SPILL_BUDGET} B per thread)")
    for line in bad:
        print("FAIL " + line)
    if args.json:
        args.json.write_text(json.dumps(records, indent=1))
    if args.write_table:
        if skipped and not args.partial:
            print("compile_sm90.py: error: --write-table needs every variant measured "
                  "(drop --max-compiles, or add --partial)", file=sys.stderr)
            return 2
        write_table(records)
        if skipped:
            print(f"compile_sm90.py: partial table: {skipped} of {len(records)} compilations "
                  f"not measured and not stored", file=sys.stderr)
    return 1 if bad else 0

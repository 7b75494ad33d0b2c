"""Performance counted without a GPU (issue 24): the sm_90 machine code and the launch grids
of the headline launches, and an issue-bound lower time from those counts.

For each workload (default: paper scale m = 3, d = 64, H = 128, relu, at B = 256, 1,024 and
4,096 — MINE with one shuffle, ``"all"`` with m = 3 and m = 2 (outer sums), the gradient
penalty on B rows):

1. **Launches.**  The fused op runs in Triton's CPU interpreter under the GPU-launch
   emulation (``runtime_flags.emulate_gpu("sm_90", sms=132)``: every family takes the tile
   tables, grids, split factors and autotune candidates it takes on an H100/H200) with every
   kernel launch *recorded and not executed* (a patched ``InterpretedFunction.run``): the
   kernel, its constexprs, its arguments' values and dtypes, ``num_warps``, ``num_stages``
   (Triton's default 3 when the launch passes none) and the grid.  Outputs stay as
   allocated, so nothing downstream depends on them but shapes.
2. **Machine code.**  Each distinct launch is compiled for sm_90 (``triton.compile`` with the
   launch's specialisation — integers equal to 1 constant, multiples of 16 divisible,
   16-byte-aligned tensors divisible — and options); registers and spills per thread come
   from the binary that runs (``gpu_resources.measure_binary``: Triton's own ptxas log or its
   exact ptxas command checked against its cubin); the cubin is disassembled by ``nvdisasm``
   (Triton's bundled one).
3. **Loops.**  A loop is a backward branch: a ``BRA`` whose target label lies at or before
   it; its body is every instruction from the target to the branch (``NOP`` excluded).  The
   hot loops are the innermost ones (containing no other loop).  Each is counted by opcode:
   ``HMMA`` (tensor core), ``FFMA``, the FP32 ALU ops (``FADD``, ``FMUL``, ``FFMA``,
   ``FMNMX``), memory (``LD*`` / ``ST*``) and the rest (integer, address, predicate, moves).
4. **Work per iteration** (outer sums and split sums, whose loops do one thing per element):
   relu makes one ``FMNMX`` per (sample pair, hidden unit) in a score loop, so a score loop's
   pair·units per thread and iteration is its ``FMNMX`` count (checked: a multiple of the
   tile's pairs per thread, BLOCK_R·BLOCK_C / threads, and equal to its ``FFMA`` count); a
   backward gradient loop stores one ∂Fᵀ element (and one w_out partial with PARAM_GRADS) per
   owned index and hidden unit, one owned index per thread, so its units per iteration is
   ``STG`` / (1 + PARAM_GRADS) and its pair·units BLOCK_S × that; the split-sum loop adds one
   element per ``FADD``.  Instructions per pair·unit = body ÷ pair·units per iteration
   (per thread; a warp instruction serves 32 threads).
5. **Issue-bound lower time.**  Model: an SM has 4 warp schedulers, each issuing at most one
   warp-instruction per clock (NVIDIA H100 Tensor Core GPU Architecture whitepaper, 2022:
   "four … processing blocks (partitions) … each with … a warp scheduler, dispatch unit";
   CUDA C++ Programming Guide, compute capability 9.0: 4 warp schedulers per SM); boost clock
   f = 1.98 GHz for H100 SXM5 and H200 SXM: NVIDIA's datasheets give 67 TFLOPS FP32 for both
   (the same GH100 configuration, 132 SMs × 128 FP32 lanes), and 67e12 / (2 × 128 × 132) =
   1.98e9; NVIDIA's final H100 specification table lists 1,980 MHz boost for the SXM5 and
   1,755 MHz for the PCIe card (the 1.755 GHz of issue 24 is the PCIe part's).  A launch's hot loops issue W = Σ_loops (instructions per
   pair·unit × pair·units of its tiles) / 32 warp-instructions; its P programs of w warps
   spread over the SMs, the busiest SM running n = ⌈P / SMs⌉ of them, so
   T ≥ n · (W / P) / (min(4, n·w) · f) — equal work per program, all n co-resident (the
   most favourable case), everything outside the hot loops and every memory and
   dependency stall ignored: a floor, not an estimate.  Launches without a per-element model
   (gradient penalty, one program, gathered tiles) get loop counts, shares, resources and
   grids, no time.

Command line (``python python/sass_report.py --help``): ``--batch`` (repeatable),
``--markdown FILE`` (the table of docs/performance_counts.md), ``--json FILE``.  Needs ptxas
and nvdisasm (Triton's bundled ones); no GPU.  ``tests/test_sass_report.py`` runs the loop
finder and the counts on one small compiled kernel in CI.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import importlib
import inspect
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

#: Streaming multiprocessors of the target (H100 SXM5 and H200 SXM: 132).
SMS = 132
#: Warp schedulers per SM, one warp-instruction per clock each (sm_90).
SCHEDULERS = 4
#: Boost clocks, GHz (SXM parts; H100 PCIe: 1.755).
CLOCK_GHZ = {"H200 SXM": 1.98, "H100 SXM5": 1.98}
#: Paper scale: m modalities of d features, H hidden units.
PAPER = dict(m=3, d=64, H=128)
BATCHES = (256, 1024, 4096)


# ============================================================================= SASS
@dataclasses.dataclass
class Instr:
    addr: int
    opcode: str          # with modifiers, e.g. LDG.E.128
    operands: str
    predicate: str = ""

    @property
    def base(self) -> str:
        return self.opcode.split(".")[0]


@dataclasses.dataclass
class Loop:
    start: int           # address of the back-edge's target
    end: int             # address of the backward branch
    body: list           # Instr from start to end, NOPs excluded
    inner: bool = True   # contains no other loop

    def counts(self) -> Counter:
        return Counter(i.base for i in self.body)


_LINE = re.compile(r"^\s*/\*([0-9a-fA-F]+)\*/\s+(@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)\s*(.*?)\s*;")
_LABEL = re.compile(r"^\s*(\.[A-Za-z_$][\w$.]*):")
_TARGET = re.compile(r"`\((\.[A-Za-z_$][\w$.]*)\)")
BRANCHES = ("BRA", "BRX", "JMP")


def parse_sass(text: str) -> tuple[list[Instr], dict[str, int]]:
    """Instructions and label → address of one function's ``nvdisasm`` listing (a label's
    address is that of the next instruction)."""
    instrs, labels, pending = [], {}, []
    for line in text.splitlines():
        label = _LABEL.match(line)
        if label:
            pending.append(label.group(1))
            continue
        found = _LINE.match(line)
        if not found:
            continue
        addr = int(found.group(1), 16)
        for name in pending:
            labels[name] = addr
        pending = []
        instrs.append(Instr(addr, found.group(3), found.group(4),
                            (found.group(2) or "").strip()))
    return instrs, labels


def find_loops(instrs: list[Instr], labels: dict[str, int]) -> list[Loop]:
    """Every loop: a branch to a label at or before it (back-edges to one target merged,
    the last one ending the loop), with its body; ``inner`` for those containing no
    other loop.  Sorted by start address."""
    ends: dict[int, int] = {}
    for ins in instrs:
        if ins.base not in BRANCHES:
            continue
        target = _TARGET.search(ins.operands)
        if target and target.group(1) in labels and labels[target.group(1)] <= ins.addr:
            start = labels[target.group(1)]
            ends[start] = max(ends.get(start, ins.addr), ins.addr)
    loops = [Loop(s, e, [i for i in instrs if s <= i.addr <= e and i.base != "NOP"])
             for s, e in sorted(ends.items())]
    for loop in loops:
        loop.inner = not any(o is not loop and loop.start <= o.start and o.end <= loop.end
                             for o in loops)
    return loops


FP32_ALU = ("FADD", "FMUL", "FFMA", "FMNMX")


def loop_shares(loop: Loop) -> dict:
    """Instruction count and opcode shares of a loop body."""
    c = loop.counts()
    n = len(loop.body)
    mem = sum(v for k, v in c.items() if k.startswith(("LD", "ST")) or k in ("LDGSTS",))
    return dict(instructions=n, hmma=c["HMMA"], ffma=c["FFMA"], fmnmx=c["FMNMX"],
                fadd=c["FADD"], fp32=sum(c[k] for k in FP32_ALU), memory=mem,
                stg=c["STG"], ldg=c["LDG"], bar=c["BAR"], fsel=c["FSEL"],
                hmma_share=c["HMMA"] / n if n else 0.0,
                ffma_share=c["FFMA"] / n if n else 0.0,
                fp32_share=sum(c[k] for k in FP32_ALU) / n if n else 0.0)


def nvdisasm_path() -> str | None:
    """Triton's bundled nvdisasm, else one on PATH."""
    try:
        from triton import knobs
        path = knobs.nvidia.nvdisasm.path
        if path and os.path.exists(path):
            return path
    except (ImportError, AttributeError, RuntimeError):
        pass
    return shutil.which("nvdisasm")


def disassemble(cubin: bytes) -> str:
    """``nvdisasm -c`` listing of a cubin."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        out = subprocess.run([nvdisasm_path(), "-c", str(path)], capture_output=True,
                             text=True, check=True)
    return out.stdout


# ============================================================================= launches
@dataclasses.dataclass
class Workload:
    name: str
    kind: str            # estimator, or "gp"
    negatives: object    # "shuffle", "all", or None for the penalty
    m: int
    B: int
    d: int = 64
    H: int = 128
    act: str = "relu"


def headline_workloads(batches=BATCHES) -> list[Workload]:
    """MINE (dv, one shuffle; the router's path), ``"all"`` DV with m = 3 and m = 2 (outer
    sums) and the gradient penalty (B rows), at paper scale for each B."""
    out = []
    for b in batches:
        out += [Workload(f"MINE shuffle m=3 B={b}", "dv", "shuffle", 3, b),
                Workload(f"DV all m=3 B={b}", "dv", "all", 3, b),
                Workload(f"DV all m=2 B={b}", "dv", "all", 2, b),
                Workload(f"GP m=3 N={b}", "gp", None, 3, b)]
    return out


_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg", "enable_fp_fusion")


def _arg_record(value):
    import torch
    if isinstance(value, torch.Tensor):
        return dict(type="ptr", dtype=str(value.dtype).replace("torch.", ""),
                    aligned=value.data_ptr() % 16 == 0)
    if value is None:
        return dict(type="none")
    if isinstance(value, bool):
        return dict(type="bool", value=value)
    if isinstance(value, int):
        return dict(type="int", value=value)
    if isinstance(value, float):
        return dict(type="float", value=value)
    return dict(type=type(value).__name__)


def _launch_record(fn, args, kwargs, grid) -> dict:
    params = list(inspect.signature(fn).parameters.values())
    kwargs = dict(kwargs)
    options = {k: kwargs.pop(k) for k in _OPTIONS if k in kwargs}
    bound = dict(zip([p.name for p in params], args))
    bound.update({k: v for k, v in kwargs.items() if k in {p.name for p in params}})
    consts, arguments = {}, []
    for p in params:
        value = bound.get(p.name, p.default)
        value = getattr(value, "value", value)
        if "constexpr" in str(p.annotation):
            consts[p.name] = value if isinstance(value, (bool, int, float, str)) or \
                value is None else repr(value)
        else:
            arguments.append(dict(name=p.name, **_arg_record(value)))
    if callable(grid):
        grid = grid({**bound, **options})
    grid = [int(g) for g in grid] + [1] * (3 - len(grid))
    return dict(module=fn.__module__, kernel=fn.__name__, constexprs=consts, args=arguments,
                num_warps=options.get("num_warps", 4), num_stages=options.get("num_stages", 3),
                grid=grid)


@contextlib.contextmanager
def _recording(sink: list):
    """Inside: every interpreter launch is appended to ``sink`` and not executed."""
    from triton.runtime.interpreter import InterpretedFunction
    original = InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        if not warmup:
            sink.append(_launch_record(self.fn, args, kwargs, grid))

    InterpretedFunction.run = run
    try:
        yield
    finally:
        InterpretedFunction.run = original


def _run_workload(w: Workload):
    """The fused forward and backward of ``w`` (inputs random; values never used)."""
    import torch
    from mdm_kernels.critic import MLPCritic
    from mdm_kernels.ops.router import fused_dependency_terms
    from mdm_kernels.ops.triton_ops import fused_gradient_penalty
    from mdm_kernels.reference.estimators import resolve_samples
    torch.manual_seed(0)
    dims = (w.d,) * w.m
    critic = MLPCritic(dims, (w.H,), w.act)
    zs = [torch.randn(w.B, w.d, requires_grad=True) for _ in dims]
    if w.kind == "gp":
        marg = [z[torch.randperm(w.B)] for z in zs]
        total = fused_gradient_penalty(critic, zs, marg, torch.rand(w.B), False)
    else:
        samples = resolve_samples(w.kind, zs, w.negatives, None, None)
        joint, marginal = fused_dependency_terms(w.kind, critic, zs, samples)
        total = joint + marginal
    total.backward()


def capture_in_process(workloads: list[Workload], sms: int = SMS, configs: int = 2) -> list:
    """Launch records of every workload (each autotune candidate index < ``configs``, taken
    modulo a launch's own count), deduplicated per workload.  Needs ``TRITON_INTERPRET=1``
    set before Triton was imported."""
    from mdm_kernels.ops.runtime_flags import emulate_gpu, interpreter_enabled
    if not interpreter_enabled():
        raise RuntimeError("capture needs TRITON_INTERPRET=1 (use capture())")
    out = []
    for w in workloads:
        seen = {}
        for config in range(configs):
            sink: list = []
            with emulate_gpu("sm_90", sms=sms, config=config, poison=False), \
                    _recording(sink):
                _run_workload(w)
            for rec in sink:
                key = json.dumps([rec["kernel"], rec["constexprs"], rec["args"],
                                  rec["num_warps"], rec["num_stages"], rec["grid"]],
                                 sort_keys=True, default=str)
                first = seen.setdefault(key, dict(rec, workload=w.name, config=config,
                                                  count=0))
                first["count"] += config == first["config"]   # launches per step
        out += list(seen.values())
    return out


def capture(workloads: list[Workload], sms: int = SMS, configs: int = 2) -> list:
    """:func:`capture_in_process` in a fresh interpreter process."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    payload = json.dumps(dict(workloads=[dataclasses.asdict(w) for w in workloads], sms=sms,
                              configs=configs))
    proc = subprocess.run([sys.executable, __file__, "--capture", payload], env=env,
                          capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError("launch capture failed:\n" + proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ============================================================================= compiling
_TRITON_TYPES = {"float32": "*fp32", "float16": "*fp16", "bfloat16": "*bf16",
                 "int64": "*i64", "int32": "*i32", "int8": "*i8", "uint8": "*u8",
                 "bool": "*i1"}


def _jit_function(module: str, name: str):
    from triton.runtime.jit import JITFunction
    obj = getattr(importlib.import_module(module), name)
    while not isinstance(obj, JITFunction):
        obj = obj.fn
    return obj


def launch_source(rec: dict):
    """``ASTSource`` of a launch record, specialised as Triton's JIT specialises that launch:
    an integer 1 and ``None`` are constants, integers beyond 32 bits are i64, multiples of 16
    and 16-byte-aligned pointers carry ``tt.divisibility = 16``."""
    from triton.compiler import ASTSource
    fn = _jit_function(rec["module"], rec["kernel"])
    params = inspect.signature(fn.fn).parameters
    names = list(params)
    consts = dict(rec["constexprs"])
    for name, p in params.items():   # constexprs left at their defaults
        if "constexpr" in str(p.annotation) and name not in consts:
            consts[name] = p.default
    sig, attrs = {}, {}
    by_name = {a["name"]: a for a in rec["args"]}
    for i, name in enumerate(names):
        if name in consts:
            sig[name] = "constexpr"
            continue
        a = by_name[name]
        if a["type"] == "ptr":
            sig[name] = _TRITON_TYPES[a["dtype"]]
            if a["aligned"]:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif a["type"] == "int":
            v = a["value"]
            if v == 1:
                sig[name], consts[name] = "constexpr", 1
            else:
                sig[name] = "i32" if -2 ** 31 <= v < 2 ** 31 else "i64"
                if v % 16 == 0:
                    attrs[(i,)] = [["tt.divisibility", 16]]
        elif a["type"] == "bool":
            sig[name] = "i1"
        elif a["type"] == "float":
            sig[name] = "fp32"
        elif a["type"] == "none":
            sig[name], consts[name] = "constexpr", None
        else:
            raise ValueError(f"{rec['kernel']}: argument {name} of type {a['type']}")
    return ASTSource(fn, sig, constexprs=consts, attrs=attrs)


def compile_launch(rec: dict, arch: int = 90) -> dict:
    """Compile a launch record for ``sm_<arch>``: dict(shared, registers, spill_stores, …,
    sass) (``error`` when it fails)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from mdm_kernels import gpu_resources as gr
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        kernel = triton.compile(launch_source(rec), target=GPUTarget("cuda", arch, 32),
                                options=dict(num_warps=rec["num_warps"],
                                             num_stages=rec["num_stages"]))
    usage = gr.measure_binary(kernel, arch, log.getvalue())
    return dict(shared=int(kernel.metadata.shared), **usage,
                sass=disassemble(kernel.asm["cubin"]))


# ============================================================================= work models
def _ints(rec) -> dict:
    return {a["name"]: a["value"] for a in rec["args"] if a["type"] == "int"}


def _cdiv(a, b):
    return -(-a // b)


def loop_roles(rec: dict, loops: list[Loop]) -> list[dict]:
    """Per innermost loop: its shares, its role and — where the kernel has a per-element
    model (module docstring, item 4) — pair·units per thread and iteration, instructions
    per pair·unit, the pair·units the launch's tiles cover, and the self-checks."""
    c, ints, name = rec["constexprs"], _ints(rec), rec["kernel"]
    threads = 32 * rec["num_warps"]
    rows = []
    for loop in loops:
        if not loop.inner:
            continue
        s = loop_shares(loop)
        row = dict(start=loop.start, end=loop.end, **s, role="loop", per_iter=None)
        if name == "_outer_fwd_kernel" and s["fmnmx"]:
            tile = c["BLOCK_R"] * c["BLOCK_C"] // threads
            n_rb = _cdiv(ints["B"], c["BLOCK_R"]) * (ints["B"] if c["NF"] == 3 else 1)
            row.update(role="scores", per_iter=s["fmnmx"], tile_per_thread=tile,
                       consistent=s["fmnmx"] % tile == 0 and s["ffma"] == s["fmnmx"],
                       launch_pair_units=n_rb * c["BLOCK_R"] * _cdiv(ints["B"], c["BLOCK_C"])
                       * c["BLOCK_C"] * ints["H"])
        elif name == "_outer_bwd_kernel" and (s["fmnmx"] or s["stg"]):
            bs, bo = c["BLOCK_S"], c["BLOCK_O"]
            n_sb = _cdiv(ints["B"], bs) * (ints["B"] if c["NF"] == 3 else 1)
            pu = _cdiv(ints["B"], bo) * bo * n_sb * bs * ints["H"]
            if s["stg"] and s["fp32"]:
                per_unit = 1 + bool(c["PARAM_GRADS"])
                row.update(role="gradients", per_iter=bs * s["stg"] // per_unit,
                           consistent=s["stg"] % per_unit == 0 and bo == threads,
                           launch_pair_units=pu)
            elif s["stg"]:
                row.update(role="zero fill")
            else:
                tile = bs * bo // threads
                row.update(role="scores", per_iter=s["fmnmx"], tile_per_thread=tile,
                           consistent=s["fmnmx"] % tile == 0 and s["ffma"] == s["fmnmx"],
                           launch_pair_units=pu)
        elif name == "_outer_bwd_fused_kernel" and s["fp32"]:
            tile = c["BLOCK_R"] * c["BLOCK_O"] // threads
            row.update(launch_pair_units=_fused_pair_units(c, ints))
            if s["fmnmx"]:
                row.update(role="scores", per_iter=s["fmnmx"], tile_per_thread=tile,
                           consistent=s["fmnmx"] % tile == 0 and s["ffma"] == s["fmnmx"])
            elif s["fsel"] and c["ACT"] == 0:  # relu: one σ' select per (pair, unit)
                row.update(role="gradients", per_iter=s["fsel"], tile_per_thread=tile,
                           consistent=s["fsel"] % tile == 0)
        elif name == "_sum_splits_kernel" and s["fadd"]:
            n, nsplit = ints["n"], ints.get("NSPLIT", c.get("NSPLIT"))
            row.update(role="split sums", per_iter=s["fadd"],
                       consistent=s["ldg"] == s["fadd"] or s["ldg"] * 4 >= s["fadd"],
                       launch_pair_units=_cdiv(n, c["BLOCK"]) * c["BLOCK"] * (nsplit - 1))
        elif s["hmma"]:
            row["role"] = "mma"
        if row["per_iter"]:
            row["per_pair_unit"] = s["instructions"] / row["per_iter"]
        rows.append(row)
    if name == "_outer_bwd_fused_kernel":
        for extra in _fused_unit_overhead(rec, loops, rows, threads):
            extra["per_pair_unit"] = extra["instructions"] / extra["per_iter"]
            rows.append(extra)
    # ptxas unrolls some loops and keeps a remainder loop: per role, the loop doing the
    # most pair·units per iteration is the steady state ("main"); the others run at most
    # unroll − 1 iterations and are left out of the per-pair·unit figures
    for role in {r["role"] for r in rows if r["per_iter"]}:
        same = [r for r in rows if r["role"] == role and r["per_iter"]]
        best = max(same, key=lambda r: r["per_iter"])
        for r in same:
            r["main"] = r is best
    return rows


def _fused_pair_units(c, ints) -> int:
    """Pair·units the fused backward's tiles cover (padded rows and columns included)."""
    B = ints["B"]
    return (_cdiv(B, c["BLOCK_R"]) * c["BLOCK_R"] * _cdiv(B, c["BLOCK_O"]) * c["BLOCK_O"]
            * (B if c["NF"] == 3 else 1) * ints["H"])


def _fused_unit_overhead(rec, loops, rows, threads) -> list[dict]:
    """The fused backward's per-(hidden unit, chunk) work outside its gradient loop — the
    cross-thread row sums, the slot updates, ∂w_out — as a pseudo-loop: the instructions of
    the loop enclosing the gradient loop, less the gradient loop's, over the CHUNK tiles
    that one iteration serves (full chunks)."""
    c, ints = rec["constexprs"], _ints(rec)
    grads = [r for r in rows if r["role"] == "gradients"]
    if not grads:
        return []
    g = max(grads, key=lambda r: r["per_iter"])
    inner = next(l for l in loops if l.start == g["start"])
    around = [l for l in loops if l is not inner and l.start <= inner.start
              and inner.end <= l.end]
    if not around:
        return []
    outer = min(around, key=lambda l: l.end - l.start)
    own = [i for i in outer.body
           if not any(o is not outer and o.start <= i.addr <= o.end for o in loops
                      if outer.start <= o.start and o.end <= outer.end)]
    tile = c["BLOCK_R"] * c["BLOCK_O"] // threads
    n = len(own)
    return [dict(start=outer.start, end=outer.end, instructions=n, hmma=0, ffma=0, fmnmx=0,
                 fadd=sum(i.base == "FADD" for i in own), fp32=0, memory=0, stg=0, ldg=0,
                 bar=0, fsel=0, hmma_share=0.0, ffma_share=0.0, fp32_share=0.0,
                 role="per-unit sums", per_iter=c["CHUNK"] * tile, tile_per_thread=tile,
                 consistent=True, launch_pair_units=_fused_pair_units(c, ints))]


def issue_bound_us(warp_instructions: float, programs: int, warps: int, sms: int = SMS,
                   ghz: float = CLOCK_GHZ["H200 SXM"]) -> float:
    """T ≥ n·(W/P) / (min(4, n·w)·f) with n = ⌈P / SMs⌉ (module docstring, item 5), in µs."""
    n = _cdiv(programs, sms)
    return n * (warp_instructions / programs) / (min(SCHEDULERS, n * warps) * ghz * 1e3)


def analyse(rec: dict, compiled: dict, sms: int = SMS) -> dict:
    """Figures of one launch: resources, programs, its loops and (modelled kernels) warp
    instructions and the issue-bound lower time."""
    instrs, labels = parse_sass(compiled["sass"])
    loops = loop_roles(rec, find_loops(instrs, labels))
    programs = rec["grid"][0] * rec["grid"][1] * rec["grid"][2]
    out = dict(workload=rec["workload"], kernel=rec["kernel"], config=rec["config"],
               count=rec.get("count", 1),
               tile=_tile(rec), num_warps=rec["num_warps"], num_stages=rec["num_stages"],
               grid=rec["grid"], programs=programs, programs_per_sm=programs / sms,
               registers=compiled.get("registers"), spill_stores=compiled.get("spill_stores"),
               shared=compiled.get("shared"), instructions=len(instrs), loops=loops)
    modelled = [l for l in loops if l.get("main")]
    if modelled:
        warp = sum(l["per_pair_unit"] * l["launch_pair_units"] for l in modelled) / 32
        out.update(warp_instructions=warp,
                   issue_us=issue_bound_us(warp, programs, rec["num_warps"], sms))
    return out


def _tile(rec) -> str:
    c = rec["constexprs"]
    if "CHUNK" in c:
        return f"{c['BLOCK_R']}×{c['BLOCK_O']} chunk {c['CHUNK']}"
    for a, b in (("BLOCK_R", "BLOCK_C"), ("BLOCK_S", "BLOCK_O")):
        if a in c and b in c:
            return f"{c[a]}×{c[b]}" + (f" owned {c['OWNED']}" if a == "BLOCK_S" else "")
    if "BLOCK_N" in c:
        return f"BN={c['BLOCK_N']}"
    return f"BLOCK={c['BLOCK']}" if "BLOCK" in c else ""


# ============================================================================= report
def measure(workloads: list[Workload], sms: int = SMS, log=None) -> list[dict]:
    """Capture, compile (each distinct launch once) and analyse every workload's launches."""
    records = capture(workloads, sms)
    compiled: dict[str, dict] = {}
    out = []
    for rec in records:
        # one binary per specialisation (argument values matter only through it)
        key = hashlib.sha256(json.dumps([launch_source(rec).hash(), rec["num_warps"],
                                         rec["num_stages"]]).encode()).hexdigest()
        if key not in compiled:
            if log:
                log(f"compiling {rec['kernel']} {_tile(rec)} ({rec['workload']})")
            compiled[key] = compile_launch(rec)
        out.append(analyse(rec, compiled[key], sms))
    return out


def summary(rows: list[dict]) -> list[dict]:
    """Per workload: outer forward / backward instructions per pair·unit (score and
    gradient loops of the three backward launches summed), (fwd + bwd) / fwd, launches,
    smallest fill, total issue-bound time of the modelled launches."""
    out = []
    for name in dict.fromkeys(r["workload"] for r in rows):
        rs = [r for r in rows if r["workload"] == name and r["config"] == 0]
        fwd = sum(l["per_pair_unit"] for r in rs if r["kernel"] == "_outer_fwd_kernel"
                  for l in r["loops"] if l.get("main"))
        bwd = sum(l["per_pair_unit"] for r in rs
                  if r["kernel"] in ("_outer_bwd_kernel", "_outer_bwd_fused_kernel")
                  for l in r["loops"] if l.get("main"))
        mma = [l["hmma_share"] for r in rs for l in r["loops"] if l["role"] == "mma"]
        out.append(dict(workload=name, launches=sum(r["count"] for r in rs),
                    hmma=(min(mma), max(mma)) if mma else None,
                        min_programs_per_sm=min(r["programs_per_sm"] for r in rs),
                        fwd_per_pair_unit=fwd or None, bwd_per_pair_unit=bwd or None,
                        ratio=(fwd + bwd) / fwd if fwd else None,
                        issue_us=sum(r["count"] * r.get("issue_us", 0) for r in rs) or None))
    return out


def _f(x, fmt="{:.2f}"):
    return "—" if x is None else fmt.format(x)


def markdown(rows: list[dict]) -> str:
    """The tables of docs/performance_counts.md."""
    lines = ["| workload | launches | fewest programs per SM | outer fwd instr / pair·unit | "
             "outer bwd instr / pair·unit (every launch) | (fwd + bwd) / fwd | "
             "HMMA % of the mma loops | issue-bound µs (modelled launches) |",
             "|---|---|---|---|---|---|---|---|"]
    for s in summary(rows):
        lines.append(f"| {s['workload']} | {s['launches']} | {s['min_programs_per_sm']:.2f} | "
                     f"{_f(s['fwd_per_pair_unit'])} | {_f(s['bwd_per_pair_unit'])} | "
                     f"{_f(s['ratio'])} | "
                     f"{'—' if not s['hmma'] else '%.0f–%.0f' % tuple(100 * x for x in s['hmma'])}"
                     f" | {_f(s['issue_us'], '{:.1f}')} |")
    lines += ["", "| workload | kernel ×launches | cfg | tile | warps | stages | programs (per SM) | "
              "regs | spills B | smem B | innermost loops: instr [HMMA/FFMA/FP32 %] role → "
              "instr per pair·unit | issue-bound µs |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        loops = "; ".join(
            f"{l['instructions']} [{100 * l['hmma_share']:.0f}/{100 * l['ffma_share']:.0f}/"
            f"{100 * l['fp32_share']:.0f}] {l['role']}"
            + (f" → {l['per_pair_unit']:.2f} ({l['per_iter']}/iter"
               f"{'' if l.get('main') else ', remainder'}"
               f"{'' if l.get('consistent', True) else ', INCONSISTENT'})"
               if l.get("per_pair_unit") else "")
            for l in r["loops"] if l["instructions"] >= 8)
        lines.append(f"| {r['workload']} | {r['kernel']} ×{r['count']} | {r['config']} | {r['tile']} | "
                     f"{r['num_warps']} | {r['num_stages']} | {r['programs']} "
                     f"({r['programs_per_sm']:.2f}) | {r['registers']} | {r['spill_stores']} | "
                     f"{r['shared']} | {loops or '—'} | {_f(r.get('issue_us'), '{:.1f}')} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="sass_report.py", description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, action="append",
                    help=f"batch sizes (repeatable; default {', '.join(map(str, BATCHES))})")
    ap.add_argument("--only", action="append", default=[],
                    help="only workloads whose name contains this (repeatable)")
    ap.add_argument("--sms", type=int, default=SMS, help="SMs of the target (default 132)")
    ap.add_argument("--markdown", type=Path, help="write the tables to this file")
    ap.add_argument("--json", type=Path, help="write every launch's figures to this file")
    ap.add_argument("--capture", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.capture:
        spec = json.loads(args.capture)
        recs = capture_in_process([Workload(**w) for w in spec["workloads"]], spec["sms"],
                                  spec["configs"])
        print(json.dumps(recs))
        return 0
    os.environ.pop("TRITON_INTERPRET", None)
    from mdm_kernels import gpu_resources as gr
    if gr.ptxas_available() is None or nvdisasm_path() is None:
        print("sass_report.py: error: needs ptxas and nvdisasm (Triton's bundled ones)",
              file=sys.stderr)
        return 2
    workloads = [w for w in headline_workloads(tuple(args.batch or BATCHES))
                 if not args.only or any(o in w.name for o in args.only)]
    rows = measure(workloads, args.sms, log=lambda s: print(s, file=sys.stderr, flush=True))
    text = markdown(rows)
    print(text)
    if args.markdown:
        args.markdown.write_text(text)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

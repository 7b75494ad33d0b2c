"""Benchmark runner: ``python -m mdm_kernels.bench [--out DIR] [--quick] [--filter EXPR]``.

Runs the pytest-benchmark suite in ``benchmarks/`` (``--benchmark-only``, JSON and JUnit
reports) — or just the rows named in ``--ids FILE`` — then writes, for this machine and today,

* ``DIR/<stem>.rows.jsonl`` (or ``--rows FILE``) — *while the suite runs*: one JSON line per
  row as soon as it is measured or skipped (this module is loaded into pytest as a plugin,
  :func:`pytest_runtest_makereport`), so a run stopped by ``--timeout`` or killed keeps
  every finished row; the files below are then written from these lines;

* ``DIR/<stem>.json`` (stem ``<device-slug>-<date>`` unless ``--stem``) — environment (device, driver, torch / triton / CUDA
  versions, commit) and one flat record per measured row (``extra_info`` + stats), plus the
  reasons of the skipped rows;
* ``DIR/<stem>.md`` — the same as markdown tables, one per section, with the
  speed-up and memory ratios against eager and ``torch.compile`` from the same run;
* ``DIR/<stem>/*.png`` — time and peak memory against the batch size B, one
  figure per workload family (matplotlib, Agg backend).

pytest's own output ends with the compact summary of ``benchmarks/conftest.py``
(:func:`summary_lines`: ratios against eager and ``torch.compile``, memory, skipped rows
grouped by reason).  CPU memory is torch's CPU allocator peak (:func:`torch_cpu_peak_bytes`).
User errors are one line and exit status 2 (``--debug``: the traceback).

It works unchanged on a CPU-only machine (CPU rows, small sizes, GPU rows skipped with the
reason) and on a GPU.  The writers (:func:`write_results`) take a pytest-benchmark JSON and
do not run anything, so they are testable offline.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from collections import Counter, OrderedDict
from pathlib import Path

from ._cli import OneLineParser, ensure_out_dir, one_line, one_line_user_errors

#: Sections of the suite, in table order, with their titles.
SECTIONS = OrderedDict([
    ("paper", "Paper scale, m = 3 (estimator loss or gradient penalty, fwd + bwd)"),
    ("paper-m2", "Paper scale, m = 2 (next to the peer library)"),
    ("sweep-m2", "Scale sweep: \"all\" and \"distinct\" negatives, m = 2"),
    ("sweep-m3", "Scale sweep: \"all\" and \"distinct\" negatives, m = 3"),
    ("sweep-gp", "Scale sweep: gradient penalty alone"),
    ("train", "End-to-end training step (model + penalty, two-stage update)"),
])

BACKEND_ORDER = ("none", "eager", "compile", "triton", "cuda", "torch-mist")


# --------------------------------------------------------------------------- environment

def device_name() -> str:
    try:
        import torch
        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except Exception:
        pass
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return "CPU " + line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "CPU " + (platform.processor() or platform.machine())


def device_slug(name: str) -> str:
    """'NVIDIA H200' -> 'nvidia-h200'; CPU names are shortened to 'cpu-<model>'."""
    slug = re.sub(r"\((r|tm)\)", "", name.lower())
    slug = re.sub(r"\b(cpu|processor)\b", "", slug) if slug.startswith("cpu ") else slug
    slug = re.sub(r"[^a-z0-9]+", "-", slug).strip("-")
    if name.lower().startswith("cpu"):
        slug = "cpu-" + slug
    return slug[:60].strip("-") or "unknown-device"


def _run(cmd) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def collect_meta(sizes: str | None = None, filter_expr: str | None = None) -> dict:
    """Device, driver and library versions of this machine."""
    meta = {"date": _dt.date.today().isoformat(),
            "timestamp": _dt.datetime.now().isoformat(timespec="seconds"),
            "device": device_name(), "python": platform.python_version(),
            "platform": platform.platform(), "sizes": sizes, "filter": filter_expr}
    try:
        import torch
        meta["torch"] = torch.__version__
        meta["cuda"] = torch.version.cuda
        meta["gpu"] = torch.cuda.is_available()
        if meta["gpu"]:
            p = torch.cuda.get_device_properties(0)
            meta["gpu_memory_gib"] = round(p.total_memory / 2**30, 1)
            meta["sm_count"] = p.multi_processor_count
            meta["cudnn"] = torch.backends.cudnn.version()
        else:
            meta["cpu_count"] = os.cpu_count()
    except Exception as exc:  # pragma: no cover
        meta["torch"] = f"unavailable ({exc})"
    try:
        import triton
        meta["triton"] = triton.__version__
    except Exception:
        meta["triton"] = None
    drv = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    meta["driver"] = drv.splitlines()[0] if drv else None
    try:
        from . import __version__
        meta["mdm_kernels"] = __version__
    except Exception:
        meta["mdm_kernels"] = None
    meta["commit"] = _run(["git", "-C", str(Path(__file__).resolve().parents[1]),
                           "rev-parse", "--short", "HEAD"])
    return meta


# --------------------------------------------------------------------------- rows

def load_rows(pb: dict) -> list[dict]:
    """One flat record per benchmark of a pytest-benchmark JSON (``extra_info`` + stats)."""
    rows = []
    for b in pb.get("benchmarks", []):
        ex = dict(b.get("extra_info") or {})
        stats = b.get("stats") or {}
        row = {"name": b.get("name"), "group": b.get("group")}
        row.update(ex)
        if row.get("median_s") is None and stats.get("median") is not None:
            row["median_s"] = stats["median"]
        row.setdefault("key", b.get("group") or b.get("name"))
        row.setdefault("backend", (b.get("params") or {}).get("backend", "?"))
        row.setdefault("section", "other")
        row["wall_median_s"] = stats.get("median")
        row["wall_rounds"] = stats.get("rounds")
        rows.append(row)
    add_ratios(rows)
    return rows


def add_ratios(rows: list[dict]) -> None:
    """Fill ``speedup_vs_eager|compile`` and ``mem_ratio_vs_*`` from rows of the same key
    (the suite fills them during the run; this covers filtered or reordered runs)."""
    by_key: dict = {}
    for r in rows:
        by_key.setdefault(r["key"], {})[r["backend"]] = r
    for r in rows:
        for base in ("eager", "compile"):
            other = by_key[r["key"]].get(base)
            if other is None or other is r:
                continue
            if r.get(f"speedup_vs_{base}") is None and r.get("median_s") and other.get("median_s"):
                r[f"speedup_vs_{base}"] = other["median_s"] / r["median_s"]
            if r.get(f"mem_ratio_vs_{base}") is None and r.get("peak_mem_bytes") \
                    and other.get("peak_mem_bytes"):
                r[f"mem_ratio_vs_{base}"] = other["peak_mem_bytes"] / r["peak_mem_bytes"]


def parse_junit_skips(path) -> list[dict]:
    """Skipped test cases of a JUnit XML report: [{"test", "reason"}]."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return []
    out = []
    for case in root.iter("testcase"):
        for sk in case.findall("skipped"):
            reason = sk.get("message") or (sk.text or "").strip()
            reason = re.sub(r"^Skipped:\s*", "", reason)
            out.append({"test": case.get("name"), "reason": reason})
    return out


# --------------------------------------------------------------------------- CPU memory

def torch_cpu_peak_bytes(fn) -> int | None:
    """Peak bytes held by torch's CPU allocator while ``fn()`` runs, above what was held when
    it started (the step's working memory), or None where the profiler cannot tell.

    Every allocation and free of torch's CPU allocator is recorded by ``torch.profiler`` with
    ``profile_memory=True`` (a ``[memory]`` event with its signed size); the running sum of the
    sizes in time order peaks at the working memory.  Neither ``tracemalloc`` (Python's own
    allocator only) nor sampled RSS (pages that glibc reuses are never returned) sees it.
    Runs ``fn`` once under the profiler (slower than a timed call: memory only)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    results = getattr(getattr(prof, "profiler", None), "kineto_results", None)
    if results is None:
        return None
    sizes = sorted((e.start_ns(), e.nbytes()) for e in results.events()
                   if e.name() == "[memory]" and e.device_type() == DeviceType.CPU)
    running = peak = 0
    for _, nbytes in sizes:
        running += nbytes
        peak = max(peak, running)
    return peak


# --------------------------------------------------------------------------- formatting

def fmt_time(s) -> str:
    if s is None or (isinstance(s, float) and math.isnan(s)):
        return "—"
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.3g} ms"
    return f"{s * 1e6:.3g} µs"


def fmt_bytes(n) -> str:
    if n is None:
        return "—"
    n = float(n)
    for unit, div in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.3g} {unit}"
    return f"{n:.0f} B"


def fmt_flops(f) -> str:
    if not f:
        return "—"
    for unit, div in (("TFLOP/s", 1e12), ("GFLOP/s", 1e9), ("MFLOP/s", 1e6)):
        if f >= div:
            return f"{f / div:.3g} {unit}"
    return f"{f:.3g} FLOP/s"


def fmt_ratio(x) -> str:
    return "—" if x is None else f"{x:.2f}×"


def fmt_pct(x) -> str:
    return "—" if x is None else f"{100 * x:.2g}%"


def workload_label(r: dict) -> str:
    if r.get("section") == "train":
        return f"{r.get('model')} + {r.get('penalty')}"
    dims = "x".join(map(str, r.get("dims") or []))
    hidden = "x".join(map(str, r.get("hidden") or []))
    neg = r.get("negatives")
    neg = "K=%s" % neg if isinstance(neg, int) else neg
    return f"{r.get('op')} d={dims} H={hidden} {neg}"


def _sort_key(r):
    b = r.get("backend")
    return (workload_label(r), r.get("batch") or 0,
            BACKEND_ORDER.index(b) if b in BACKEND_ORDER else len(BACKEND_ORDER))


#: Issue 7's GPU targets: which rows they read and the ratios they ask for.  ``match``
#: selects rows (section, op, m, hidden, negatives, batch); ``eager`` / ``compile`` are the
#: minimum speed-ups, ``mem_gb`` the largest peak memory, ``mem_ratio`` the minimum memory
#: ratio against eager.
TARGETS = [
    dict(label="penalty step, paper scale (MINE, m = 3, H = 128, shuffle)",
         match=dict(section="paper", op="mine", m=3, hidden=[128], negatives="shuffle",
                    batch=256), eager=5.0, compile=4.0),
    dict(label="same, K = 8 shuffles",
         match=dict(section="paper", op="mine", m=3, hidden=[128], negatives=8, batch=256),
         eager=5.0, compile=4.0),
    dict(label="same, 2 hidden layers",
         match=dict(section="paper", op="mine", m=3, hidden=[128, 128], negatives="shuffle",
                    batch=256), eager=5.0, compile=4.0),
    dict(label="gradient penalty alone, B = 256",
         match=dict(section="sweep-gp", op="gp", batch=256), eager=4.0, mem_ratio=3.0),
    dict(label="gradient penalty alone, B = 4,096",
         match=dict(section="sweep-gp", op="gp", batch=4096), eager=4.0, mem_ratio=3.0),
    dict(label="\"all\", m = 2, d = H = 128, B = 16,384",
         match=dict(section="sweep-m2", op="mine", hidden=[128], batch=16384), compile=5.0,
         mem_gb=1.0),
    dict(label="\"all\", m = 2, d = H = 128, B = 65,536",
         match=dict(section="sweep-m2", op="mine", hidden=[128], batch=65536), mem_gb=1.0),
]


def _matches(row: dict, match: dict) -> bool:
    return all(row.get(k) == v for k, v in match.items())


def target_table(rows: list[dict]) -> list[str]:
    """Markdown lines: every fused row of a target workload against the target (issue 7),
    with a verdict; an empty list when the run has no fused rows for any target."""
    lines = []
    for t in TARGETS:
        for r in sorted((r for r in rows if _matches(r, t["match"])
                         and r.get("backend") in ("triton", "cuda")), key=_sort_key):
            checks, cells = [], []
            for base in ("eager", "compile"):
                got = r.get(f"speedup_vs_{base}")
                want = t.get(base)
                cells.append(fmt_ratio(got) + (f" (≥ {want:g}×)" if want else ""))
                if want:
                    checks.append(got is not None and got >= want)
            mem = r.get("peak_mem_bytes")
            cell = fmt_bytes(mem)
            if t.get("mem_gb"):
                cell += f" (< {t['mem_gb']:g} GB)"
                checks.append(mem is not None and mem < t["mem_gb"] * 1e9)
            if t.get("mem_ratio"):
                got = r.get("mem_ratio_vs_eager")
                cell += f", {fmt_ratio(got)} less than eager (≥ {t['mem_ratio']:g}×)"
                checks.append(got is not None and got >= t["mem_ratio"])
            verdict = "met" if checks and all(checks) else "missed"
            k = r.get("kernels_per_step")
            backend = r["backend"] + (f" ({r['triton_path']})" if r.get("triton_path") else "")
            lines.append(f"| {t['label']} | {backend} | {fmt_time(r.get('median_s'))} | "
                         f"{cells[0]} | {cells[1]} | {cell} | {'—' if k is None else k} | "
                         f"{verdict} |")
    if not lines:
        return []
    head = ["## Issue 7 targets", "",
            "Fused rows of the target workloads against the targets (in parentheses); "
            "ratios from this run.", "",
            "| target | backend | median | ×eager | ×compile | peak memory | kernels | verdict |",
            "|---|---|---|---|---|---|---|---|"]
    return head + lines + [""]


def markdown(rows: list[dict], meta: dict, skipped: list[dict] | None = None,
             plots: list[str] | None = None) -> str:
    gpu = bool(meta.get("gpu"))
    lines = [f"# mdm_kernels benchmarks — {meta.get('device')} — {meta.get('date')}", ""]
    if not gpu:
        lines += ["> **CPU figures.** Measured on a CPU without a GPU: eager reference, "
                  "`torch.compile` and the peer library only, small sizes.  The fused Triton/"
                  "CUDA rows are GPU-only and were skipped; these numbers say nothing about "
                  "the GPU kernels.", ""]
    env = [("device", meta.get("device")), ("driver", meta.get("driver") or "—"),
           ("torch", meta.get("torch")), ("triton", meta.get("triton") or "—"),
           ("CUDA", meta.get("cuda") or "—"), ("python", meta.get("python")),
           ("mdm_kernels", f"{meta.get('mdm_kernels')} ({meta.get('commit') or '?'})"),
           ("sizes", meta.get("sizes") or "default"), ("date", meta.get("timestamp") or meta.get("date"))]
    threads = {r.get("torch_threads") for r in rows if r.get("torch_threads")}
    if not gpu and threads:
        env.append(("torch CPU threads", ", ".join(map(str, sorted(threads)))))
    if meta.get("filter"):
        env.append(("filter", f"`{meta['filter']}`"))
    lines += ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in env] + [""]
    lines += ["Median time of one fwd + bwd step (random negatives drawn inside), first call "
              "(compilation) excluded and shown as *first call*.  Peak memory: "
              + ("`torch.cuda.max_memory_allocated` growth during one step" if gpu else
                 "torch CPU allocator peak during one step (`torch.profiler`, profile_memory)")
              + ".  FLOP/s: nominal critic matmul FLOPs (same count for every backend).  "
              "×eager / ×compile: speed-up against the eager reference / `torch.compile` "
              "of the same workload in this run (> 1 is faster); mem÷: their peak memory "
              "divided by this row's.", ""]
    lines += target_table(rows)
    sections = [s for s in SECTIONS if any(r.get("section") == s for r in rows)]
    sections += sorted({r.get("section") for r in rows} - set(SECTIONS) - {None})
    for sec in sections:
        sel = sorted((r for r in rows if r.get("section") == sec), key=_sort_key)
        lines += [f"## {SECTIONS.get(sec, sec)}", ""]
        head = ["workload", "B", "backend", "median", "peak mem", "FLOP/s"]
        if gpu:
            head += ["% FP32 peak", "kernels"]
        head += ["×eager", "×compile", "mem÷eager", "first call"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in sel:
            backend = str(r.get("backend"))
            if r.get("triton_path"):  # which Triton kernel family ran the estimator
                backend += f" ({r['triton_path']})"
            if r.get("peer_estimator"):  # a peer row computing a different estimator
                backend += f" ({r['peer_estimator']})"
            cells = [workload_label(r), str(r.get("batch", "")), backend,
                     fmt_time(r.get("median_s")), fmt_bytes(r.get("peak_mem_bytes")),
                     fmt_flops(r.get("flops_per_s"))]
            if gpu:
                k = r.get("kernels_per_step")
                cells += [fmt_pct(r.get("peak_share_fp32")), "—" if k is None else str(k)]
            cells += [fmt_ratio(r.get("speedup_vs_eager")), fmt_ratio(r.get("speedup_vs_compile")),
                      fmt_ratio(r.get("mem_ratio_vs_eager")), fmt_time(r.get("compile_s"))]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    if skipped:
        counts = Counter(s["reason"] for s in skipped)
        lines += ["## Skipped rows", "", "| rows | reason |", "|---|---|"]
        for reason, n in counts.most_common():
            lines.append(f"| {n} | {reason.replace('|', '/')} |")
        lines.append("")
    if plots:
        lines += ["## Plots", ""] + [f"- [{Path(p).stem}]({p})" for p in plots] + [""]
    return "\n".join(lines)


# --------------------------------------------------------------------------- pytest summary

def _backend_cell(r: dict) -> str:
    """``compile 1.61 ms, 10 MB (2.92× eager, mem ÷1.2 eager)``: one backend of a workload."""
    backend = str(r.get("backend")) + (f" ({r['triton_path']})" if r.get("triton_path") else "")
    cell = f"{backend} {fmt_time(r.get('median_s'))}"
    if r.get("peak_mem_bytes") is not None:
        cell += f", {fmt_bytes(r.get('peak_mem_bytes'))}"
    ratios = [f"{r[f'speedup_vs_{b}']:.2f}× {b}" for b in ("eager", "compile")
              if r.get(f"speedup_vs_{b}") is not None]
    ratios += [f"mem ÷{r[f'mem_ratio_vs_{b}']:.2f} {b}" for b in ("eager", "compile")
               if r.get(f"mem_ratio_vs_{b}") is not None]
    return cell + (f" ({', '.join(ratios)})" if ratios else "")


def summary_lines(rows: list[dict], skipped: list[dict] | None = None, gpu: bool = False) -> list[str]:
    """The compact end-of-run summary that ``pytest benchmarks/`` prints: per section and
    workload, one line per batch size with every backend's median time, peak memory and
    ratios against eager and ``torch.compile`` (> 1: faster / less memory); then the skipped
    rows grouped by reason, most frequent first.  ``rows``: ``extra_info`` records of the
    measured rows (ratios missing from them are derived here)."""
    rows = [dict(r) for r in rows if r.get("median_s") is not None]
    for r in rows:
        r.setdefault("section", "other")
    if rows:
        add_ratios(rows)
    mem = ("peak memory: torch.cuda.max_memory_allocated growth" if gpu else
           "peak memory: torch's CPU allocator during one step (profiler)")
    lines = [f"{len(rows)} measured rows; time: median of one fwd + bwd step; {mem}; "
             "N× eager / compile: speed-up against that backend (> 1 is faster); mem ÷: its "
             "peak memory divided by this row's"] if rows else ["no measured rows"]
    sections = [s for s in SECTIONS if any(r["section"] == s for r in rows)]
    sections += sorted({r["section"] for r in rows} - set(SECTIONS))
    for sec in sections:
        lines.append(f"{SECTIONS.get(sec, sec)}:")
        by_workload: dict = {}
        for r in sorted((r for r in rows if r["section"] == sec), key=_sort_key):
            by_workload.setdefault(workload_label(r), {}).setdefault(r.get("batch"), []).append(r)
        for label, batches in by_workload.items():
            lines.append(f"  {label}")
            for batch, sel in batches.items():
                lines.append(f"    B={batch}: " + " | ".join(_backend_cell(r) for r in sel))
    if skipped:
        lines.append(f"{len(skipped)} skipped rows, by reason:")
        for reason, n in Counter(one_line(s["reason"]) for s in skipped).most_common():
            lines.append(f"  {n:5d}  {reason}")
    return lines


# --------------------------------------------------------------------------- plots

def write_plots(rows: list[dict], plot_dir: Path, rel_to: Path | None = None) -> list[str]:
    """One PNG per workload family with ≥ 2 batch sizes: time and peak memory against B."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families: dict = {}
    for r in rows:
        if r.get("batch") is None or r.get("median_s") is None:
            continue
        families.setdefault(r.get("family") or r["key"], []).append(r)
    written = []
    for fam, sel in sorted(families.items()):
        if len({r["batch"] for r in sel}) < 2:
            continue
        plot_dir.mkdir(parents=True, exist_ok=True)
        fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(10, 4))
        backends = sorted({r["backend"] for r in sel},
                          key=lambda b: BACKEND_ORDER.index(b) if b in BACKEND_ORDER else 99)
        for b in backends:
            pts = sorted((r["batch"], r["median_s"], r.get("peak_mem_bytes")) for r in sel
                         if r["backend"] == b)
            ax_t.plot([p[0] for p in pts], [p[1] * 1e3 for p in pts], "o-", label=b)
            mem = [(p[0], p[2] / 2**20) for p in pts if p[2]]
            if mem:
                ax_m.plot([p[0] for p in mem], [p[1] for p in mem], "o-", label=b)
        for ax, ylabel in ((ax_t, "median time per step (ms)"), (ax_m, "peak memory (MiB)")):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("batch size B")
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
            if ax.get_lines():
                ax.legend(fontsize=8)
        fig.suptitle(f"{fam} — {sel[0].get('device', '')}", fontsize=9)
        fig.tight_layout()
        path = plot_dir / (re.sub(r"[^A-Za-z0-9._-]+", "_", fam).strip("_") + ".png")
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(str(path.relative_to(rel_to)) if rel_to else str(path))
    return written


# --------------------------------------------------------------------------- results

def write_results(pb_json, out_dir, meta: dict, skipped: list[dict] | None = None,
                  stem: str | None = None) -> dict:
    """Write ``<stem>.json``, ``<stem>.md`` and ``<stem>/*.png`` into ``out_dir`` from a
    pytest-benchmark JSON (a path or the loaded dict); returns their paths."""
    pb = json.loads(Path(pb_json).read_text()) if not isinstance(pb_json, dict) else pb_json
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = stem or f"{device_slug(meta.get('device') or 'unknown')}-{meta.get('date')}"
    rows = load_rows(pb)
    plots = write_plots(rows, out_dir / stem, rel_to=out_dir)
    record = {"meta": meta, "rows": rows, "skipped": skipped or [],
              "machine_info": pb.get("machine_info"), "commit_info": pb.get("commit_info")}
    json_path = out_dir / f"{stem}.json"
    json_path.write_text(json.dumps(record, indent=1, default=str) + "\n")
    md_path = out_dir / f"{stem}.md"
    md_path.write_text(markdown(rows, meta, skipped, plots))
    return {"json": json_path, "markdown": md_path, "plots": [out_dir / p for p in plots]}


# --------------------------------------------------------------------------- incremental rows

#: Environment variable naming the JSON-lines file the plugin appends rows to.
ROWS_ENV = "MDM_BENCH_ROWS"


def _append_row(path: str, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record, default=str) + "\n")
        f.flush()


def _row_record(item, report) -> dict | None:
    """The JSON line of one finished row: its ``extra_info`` and timing statistics when it
    was measured, its reason when it was skipped, the error's last line when it failed."""
    rec = {"test": report.nodeid, "outcome": report.outcome, "when": report.when}
    if report.skipped:
        longrepr = report.longrepr
        text = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
        rec["reason"] = re.sub(r"^Skipped:\s*", "", text)
        return rec
    if report.failed:
        text = str(report.longrepr).strip().splitlines()
        rec["error"] = text[-1][:500] if text else "failed"
        return rec
    if report.when != "call":
        return None
    bench = getattr(item, "funcargs", {}).get("benchmark")
    info = dict(getattr(bench, "extra_info", None) or {})
    rec["extra_info"] = info
    rec["group"] = getattr(bench, "group", None)
    try:
        stats = bench.stats.stats
        rec["stats"] = {"median": stats.median, "rounds": stats.rounds}
    except AttributeError:
        rec["stats"] = {"median": info.get("median_s"), "rounds": info.get("rounds")}
    return rec


def _hookwrapper(fn):
    """``pytest.hookimpl(hookwrapper=True)``; the plain function where pytest is absent
    (the writers work without it)."""
    try:
        import pytest
    except ImportError:  # pragma: no cover
        return fn
    return pytest.hookimpl(hookwrapper=True)(fn)


@_hookwrapper
def pytest_runtest_makereport(item, call):
    """pytest hook, active with ``-p mdm_kernels.bench`` and ``$MDM_BENCH_ROWS`` set:
    append each finished row (measured, skipped or failed) to the rows file at once."""
    outcome = yield
    path = os.environ.get(ROWS_ENV)
    if not path:
        return
    report = outcome.get_result()
    if report.when == "call" or report.skipped or report.failed:
        rec = _row_record(item, report)
        if rec is not None:
            _append_row(path, rec)


def read_rows(path) -> tuple[dict, list[dict]]:
    """(pytest-benchmark-like JSON, skipped rows) from a rows file: what
    :func:`write_results` takes, for a run that ended before pytest wrote its JSON."""
    benches, skipped = [], []
    p = Path(path)
    lines = p.read_text().splitlines() if p.exists() else []
    for line in lines:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:   # a line cut by a kill
            continue
        if rec.get("outcome") == "skipped":
            skipped.append({"test": rec["test"].split("::")[-1], "reason": rec.get("reason")})
        elif rec.get("outcome") == "passed" and "extra_info" in rec:
            info = rec["extra_info"]
            name = rec["test"].split("::")[-1]
            benches.append({"name": name, "group": rec.get("group") or info.get("key"),
                            "params": {"backend": info.get("backend")},
                            "stats": rec.get("stats") or {}, "extra_info": info})
    return {"benchmarks": benches}, skipped


PROG = "python -m mdm_kernels.bench"


def _run_suite(cmd: list[str], cwd: Path, env: dict, timeout: float | None) -> int | str:
    """Run pytest; on ``timeout`` (seconds) stop its whole process group and return
    ``"timeout"`` (the rows written so far stay)."""
    proc = subprocess.Popen(cmd, cwd=str(cwd), env=env, start_new_session=timeout is not None)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        import signal
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        return "timeout"
    except KeyboardInterrupt:
        proc.kill()
        raise


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = OneLineParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results",
                    help="output directory (default: benchmarks/results)")
    ap.add_argument("--quick", action="store_true",
                    help="reduced size grid (--bench-sizes quick; same as --sizes quick)")
    ap.add_argument("--sizes", choices=("full", "quick", "smoke"), default=None,
                    help="size grid (--bench-sizes; default full, or quick with --quick)")
    ap.add_argument("--filter", default=None, metavar="EXPR",
                    help="pytest -k expression selecting rows, e.g. 'mine and not compile'")
    ap.add_argument("--ids", default=None, metavar="FILE",
                    help="run only the rows whose pytest node ids are listed in FILE, one per "
                         "line, in that order (instead of the whole suite)")
    ap.add_argument("--rows", default=None, metavar="FILE",
                    help="JSON-lines file each finished row is appended to while the suite "
                         "runs (default: OUT/<stem>.rows.jsonl)")
    ap.add_argument("--timeout", type=float, default=None, metavar="S",
                    help="stop the suite after S seconds and write the results from the rows "
                         "finished so far")
    ap.add_argument("--stem", default=None,
                    help="name of the result files (default: <device>-<date>)")
    ap.add_argument("--suite", default=None,
                    help="benchmark directory (default: benchmarks/ next to the package)")
    ap.add_argument("--debug", action="store_true",
                    help="show the traceback of an error instead of the one-line message")
    ap.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    args = ap.parse_args(argv)
    if args.timeout is not None and not (args.timeout > 0 and math.isfinite(args.timeout)):
        ap.error(f"--timeout must be a positive number of seconds, got {args.timeout:g}")
    if args.quick and args.sizes not in (None, "quick"):
        ap.error(f"--quick contradicts --sizes {args.sizes}")
    if args.stem is not None and not re.fullmatch(r"[A-Za-z0-9._-]+", args.stem):
        ap.error(f"--stem {args.stem!r}: letters, digits, '.', '_' and '-' only")
    ids = None
    if args.ids is not None:
        try:
            ids = [line.strip() for line in Path(args.ids).read_text().splitlines()
                   if line.strip() and not line.lstrip().startswith("#")]
        except OSError as exc:
            ap.error(f"--ids {args.ids}: {exc.strerror or exc}")
        if not ids:
            ap.error(f"--ids {args.ids}: no node ids in the file")
    with one_line_user_errors(PROG, argv):  # one line naming the option, exit status 2
        ensure_out_dir(args.out)  # before the (long) run, not after it

    root = Path(__file__).resolve().parents[1]
    suite = Path(args.suite) if args.suite else root / "benchmarks"
    if not (suite / "conftest.py").is_file():
        ap.error(f"--suite {suite}: no benchmark suite there (benchmarks/conftest.py of a source "
                 "checkout; pass --suite DIR)")
    sizes = args.sizes or ("quick" if args.quick else "full")
    meta = collect_meta(sizes, args.filter)
    stem = args.stem or f"{device_slug(meta.get('device') or 'unknown')}-{meta.get('date')}"
    rows_path = Path(args.rows) if args.rows else Path(args.out) / f"{stem}.rows.jsonl"
    rows_path.parent.mkdir(parents=True, exist_ok=True)
    rows_path.write_text("")   # this run's rows only
    with tempfile.TemporaryDirectory(prefix="mdm-bench-") as tmp:
        pb_path, xml_path = Path(tmp) / "pytest-benchmark.json", Path(tmp) / "junit.xml"
        cmd = [sys.executable, "-m", "pytest", *(ids or [str(suite)]), "--benchmark-only",
               f"--benchmark-json={pb_path}", f"--junitxml={xml_path}", "--bench-sizes", sizes,
               "-q", "-p", "no:cacheprovider", "-p", "mdm_kernels.bench",
               "--benchmark-columns=median,iqr,rounds", "--benchmark-sort=name"]
        if args.filter:
            cmd += ["-k", args.filter]
        cmd += list(args.pytest_args)
        print("+", " ".join(cmd), flush=True)
        print(f"rows: {rows_path} (one line per finished row)", flush=True)
        env = {**os.environ, ROWS_ENV: str(rows_path.resolve())}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root),
                                                          env.get("PYTHONPATH", "")]))
        rc = _run_suite(cmd, root, env, args.timeout)
        meta["pytest_exit_status"] = rc
        if pb_path.is_file():
            paths = write_results(pb_path, args.out, meta, parse_junit_skips(xml_path), stem)
        elif rows_path.is_file():
            print(f"pytest wrote no benchmark JSON (exit status {rc}): results from the "
                  f"finished rows in {rows_path}", file=sys.stderr)
            pb, skipped = read_rows(rows_path)
            paths = write_results(pb, args.out, meta, skipped, stem)
        else:
            print(f"pytest wrote no benchmark JSON and no row (exit status {rc})",
                  file=sys.stderr)
            return rc if isinstance(rc, int) and rc else 1
    print(f"wrote {paths['json']}\nwrote {paths['markdown']}\nwrote {len(paths['plots'])} plots "
          f"under {Path(args.out) / paths['json'].stem}")
    if rc == "timeout":
        print(f"{PROG}: stopped after --timeout {args.timeout:g} s", file=sys.stderr)
        return 3
    return 0 if rc in (0, 5) else rc


if __name__ == "__main__":
    sys.exit(main())

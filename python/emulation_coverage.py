"""How many of the GPU's launch configurations the emulated tests execute (issue 22).

    python python/emulation_coverage.py                 # runs tests/test_gpu_emulation.py
    python python/emulation_coverage.py --records FILE  # counts an earlier recording
    python python/emulation_coverage.py --tests "tests/test_gpu_emulation.py -k outer"

A *launch configuration* is a kernel with its warps, stages and every constexpr except those
that only size tiles to the layer widths or pick the activation
(``tests/launch_recorder.py``: ``WIDTH_CONSTEXPRS``) — the tile table's choice and every
structural switch (index mode, reduction, factors, owner, distinct mask, depth, Gram path,
gathered rows, ...).  The configurations that exist are those of every launch the router can
make, as the GPU-resource gate enumerates them (:func:`mdm_kernels.gpu_resources.all_variants`,
which compiles each at its widest width); the executed ones are recorded under the emulation
(``MDM_RECORD_LAUNCHES``).  Prints both counts, the executed share per kernel, and the
configurations never executed.
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import shlex
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))


def existing_configurations() -> set[str]:
    """Launch identities of every variant the GPU-resource gate enumerates."""
    from launch_recorder import launch_identity

    from mdm_kernels.gpu_resources import all_variants
    out = set()
    for v in all_variants():
        consts = dict(v.constexprs)
        for name, p in inspect.signature(v.kernel.fn).parameters.items():
            if "constexpr" in str(p.annotation) and name not in consts:
                consts[name] = p.default
        out.add(launch_identity(v.kernel.fn.__name__, consts, v.num_warps, v.stages()))
    return out


def record(tests: str) -> set[str]:
    """Run ``tests`` (pytest arguments) with the launch recorder on; the identities seen."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "launches.json")
        env = dict(os.environ, MDM_RECORD_LAUNCHES=path, TRITON_INTERPRET="1")
        subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        *shlex.split(tests)], cwd=ROOT, env=env, check=False)
        with open(path) as f:
            return set(json.load(f))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", help="a JSON list written by MDM_RECORD_LAUNCHES")
    ap.add_argument("--tests", default="tests/test_gpu_emulation.py",
                    help="pytest arguments of the recorded run")
    args = ap.parse_args(argv)
    os.environ.setdefault("TRITON_INTERPRET", "1")
    if args.records:
        with open(args.records) as f:
            executed = set(json.load(f))
    else:
        executed = record(args.tests)
    exist = existing_configurations()
    hit = executed & exist
    per_kernel = Counter(json.loads(k)[0] for k in exist)
    hit_kernel = Counter(json.loads(k)[0] for k in hit)
    for kernel, n in sorted(per_kernel.items()):
        print(f"{kernel:32s} {hit_kernel[kernel]:4d} of {n:4d} executed")
    extra = executed - exist
    if extra:
        print(f"{len(extra)} executed configuration(s) the gate does not enumerate:")
        for k in sorted(extra):
            print("  ", k)
    print(f"executed: {len(hit)} of {len(exist)} GPU launch configurations "
          f"({len(executed)} distinct emulated launches recorded)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

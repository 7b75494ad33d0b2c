"""Build csrc/ as a host-emulated Python module (see emulation.h): the real kernel sources,
compiled by g++ with emulation.h force-included, linked with runtime.cpp instead of libcudart.
Needs g++ (C++20), the CUDA toolkit's headers and pybind11; no GPU."""
from __future__ import annotations

import glob
import importlib.machinery
import importlib.util
import os
import shutil
import subprocess
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CSRC = ROOT / "csrc"


def cuda_include_dir() -> Path | None:
    """The CUDA toolkit's include directory (cuda_runtime.h), or None."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(os.path.realpath(nvcc)).parent.parent))
    candidates += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for home in filter(None, candidates):
        inc = Path(home) / "include"
        if (inc / "cuda_runtime.h").is_file():
            return inc
    return None


def missing_tools() -> str | None:
    """Why the emulated module cannot be built here, or None."""
    if shutil.which("g++") is None:
        return "g++ not found"
    if cuda_include_dir() is None:
        return "CUDA toolkit headers (cuda_runtime.h) not found"
    try:
        import pybind11  # noqa: F401
    except ImportError:
        return "pybind11 not installed"
    return None


#: Small backward chunks and GP partial rows, so small test grids take the multi-chunk and
#: multi-row paths (the GPU build uses 2^24 ids and 1024 rows).
SCORE_CHUNK_SAMPLES = 16
GP_MAX_PARTIAL_ROWS = 3


def build(out_dir: Path):
    """Compile and load the emulated module; returns it (named mdm_emulated._cuda)."""
    import pybind11
    out_dir.mkdir(parents=True, exist_ok=True)
    includes = ["-I", str(CSRC), "-I", str(cuda_include_dir()),
                "-I", sysconfig.get_paths()["include"], "-I", pybind11.get_include()]
    common = ["g++", "-std=c++20", "-O1", "-fPIC", "-w", *includes,
              f"-DMDM_SCORE_CHUNK_SAMPLES={SCORE_CHUNK_SAMPLES}",
              f"-DMDM_GP_MAX_PARTIAL_ROWS={GP_MAX_PARTIAL_ROWS}"]
    kernels = [["-x", "c++", "-include", str(HERE / "emulation.h"), str(src)]
               for src in sorted(CSRC.glob("*.cu"))]
    units = kernels + [[str(CSRC / "bindings.cpp")], [str(HERE / "runtime.cpp")]]
    jobs = [(common + unit + ["-c", "-o", str(out_dir / f"{i}.o")]) for i, unit in
            enumerate(units)]

    def run(cmd):
        proc = subprocess.run(cmd, capture_output=True, text=True)
        return None if proc.returncode == 0 else f"$ {' '.join(cmd)}\n{proc.stderr[-4000:]}"

    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        errors = [e for e in pool.map(run, jobs) if e]
    if errors:
        raise RuntimeError("building the emulated CUDA module failed:\n" + "\n".join(errors))
    so = out_dir / "_cuda.so"
    err = run(["g++", "-shared", "-o", str(so), *[j[-1] for j in jobs], "-lpthread"])
    if err:
        raise RuntimeError(err)
    loader = importlib.machinery.ExtensionFileLoader("mdm_emulated._cuda", str(so))
    spec = importlib.util.spec_from_file_location("mdm_emulated._cuda", str(so), loader=loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    module.HOST_MEMORY = True  # cuda_ops.check_tensor then accepts host tensors
    return module

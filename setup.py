"""Build script: the pure-Python package, plus the optional CUDA extension from csrc/.

The CUDA extension ``mdm_kernels._cuda`` (CUDA C++ kernels + pybind11 bindings, raw device
pointers, linked against the static CUDA runtime only — no torch headers) is built when a
CUDA toolkit is found (``nvcc`` via ``$CUDA_HOME/bin``, ``$CUDA_PATH/bin``, ``PATH`` or
``/usr/local/cuda/bin``) or when ``MDM_BUILD_CUDA=1``; ``MDM_BUILD_CUDA=0`` disables it.
Without a toolkit the package installs as pure Python (a message says so) and
``backend="cuda"`` raises a clear error.  When the build is attempted, any compile or link
error fails the install loudly.

pip hides a build's output unless ``-v``: the start of a compilation (minutes) and its end are
therefore also written to the terminal (``/dev/tty``) when there is one.  An unchanged build
is skipped: every successful build is kept in ``build/mdm_cuda/`` under a digest of what
goes into it (the sources and headers in csrc/, nvcc and its version, the flags and targets,
Python's headers and extension suffix, pybind11's version), and a later build with the same
digest -- ``pip install -e ".[dev]"`` after ``pip install -e .``, a reinstall -- copies that
file instead of compiling (``MDM_CUDA_REBUILD=1`` or ``build_ext --force`` compiles anyway).

Environment:
    MDM_BUILD_CUDA   "0": never build; "1": build or fail; unset: build when nvcc is found.
    MDM_CUDA_ARCHS   SASS targets, default "80;90" (PTX of the last one is embedded too).
    MDM_NVCC         explicit nvcc path.
    MDM_CUDA_REBUILD "1": compile even when an identical build is cached in build/mdm_cuda/.

See docs/cuda_backend.md.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"
EXT_NAME = "mdm_kernels._cuda"
#: finished builds, one file per digest (build/ is ignored by git)
BUILD_CACHE = ROOT / "build" / "mdm_cuda"


def announce(message: str) -> None:
    """Print ``message`` and, when pip captures the output (stdout not a terminal), also write
    it to the controlling terminal, so that a long compilation is never silent."""
    print(message, flush=True)
    if sys.stdout.isatty():
        return
    try:
        with open("/dev/tty", "w") as tty:
            tty.write(message + "\n")
    except OSError:  # no terminal (CI, a pipe): the pip log (-v) has the line
        pass


def build_digest(nvcc: str, flags: list[str], files: list[Path], extra: list[str] = ()) -> str:
    """SHA-256 over everything a build of the extension depends on: each file's name and bytes,
    nvcc's path and ``--version``, the flags, and ``extra`` (include paths, suffixes...)."""
    h = hashlib.sha256()
    try:
        version = subprocess.run([nvcc, "--version"], stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True).stdout
    except OSError:
        version = "?"
    for part in [nvcc, version, *flags, *extra]:
        h.update(part.encode() + b"\0")
    for f in sorted(files, key=lambda f: f.name):
        h.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:24]


def find_nvcc() -> str | None:
    """nvcc from MDM_NVCC, CUDA_HOME/CUDA_PATH, PATH, or /usr/local/cuda (None if absent)."""
    explicit = os.environ.get("MDM_NVCC")
    if explicit:
        return explicit if Path(explicit).is_file() else None
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    found = shutil.which("nvcc")
    if found:
        return found
    default = Path("/usr/local/cuda/bin/nvcc")
    return str(default) if default.is_file() else None


def cuda_archs() -> list[str]:
    archs = [a.strip() for a in os.environ.get("MDM_CUDA_ARCHS", "80;90").replace(",", ";")
             .split(";") if a.strip()]
    if not archs or not all(a.isdigit() for a in archs):
        raise RuntimeError(f"MDM_CUDA_ARCHS must list compute capabilities like '80;90', "
                           f"got {os.environ.get('MDM_CUDA_ARCHS')!r}")
    return archs


def nvcc_flags() -> list[str]:
    archs = cuda_archs()
    flags = ["-O3", "-std=c++17", "-Xcompiler", "-fPIC", "-Xcompiler", "-fvisibility=hidden",
             "-lineinfo"]
    for a in archs:
        flags += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    flags += ["-gencode", f"arch=compute_{archs[-1]},code=compute_{archs[-1]}"]  # PTX: forward compat
    names = " ".join([f"sm_{a}" for a in archs] + [f"compute_{archs[-1]}"])
    flags.append(f'-DMDM_CUDA_ARCHS="{names}"')
    return flags


class NvccExtension(Extension):
    """An extension whose sources are compiled by nvcc and linked by nvcc (static cudart)."""


class CudaBuildExt(build_ext):
    """build_ext that compiles NvccExtension sources with nvcc (in parallel) and links them
    into a Python module against the static CUDA runtime (no libcudart.so at import)."""

    def build_extension(self, ext):
        if not isinstance(ext, NvccExtension):
            return super().build_extension(ext)
        nvcc = find_nvcc()
        if nvcc is None:
            raise RuntimeError("nvcc not found: set CUDA_HOME (or MDM_NVCC), or build without "
                               "the CUDA extension with MDM_BUILD_CUDA=0")
        try:
            import pybind11
        except ImportError as exc:
            raise RuntimeError("building mdm_kernels._cuda needs pybind11 (pip install pybind11; "
                               "with --no-build-isolation it must be in the environment)") from exc
        target = Path(self.get_ext_fullpath(ext.name))
        deps = [_abs(s) for s in ext.sources] + [_abs(d) for d in ext.depends]
        includes = ["-I", str(CSRC), "-I", sysconfig.get_paths()["include"],
                    "-I", pybind11.get_include()]
        flags = nvcc_flags()
        digest = build_digest(nvcc, flags, deps, [*includes, sysconfig.get_config_var("EXT_SUFFIX") or "",
                                                  getattr(pybind11, "__version__", "")])
        cached = BUILD_CACHE / f"{digest}{Path(target).suffix}"
        target.parent.mkdir(parents=True, exist_ok=True)
        rebuild = self.force or os.environ.get("MDM_CUDA_REBUILD", "").strip() == "1"
        if not rebuild and cached.is_file():
            if not (target.exists() and target.read_bytes() == cached.read_bytes()):
                shutil.copy2(cached, target)
            announce(f"mdm_kernels: the CUDA extension is unchanged since its last build "
                     f"({cached.relative_to(ROOT)}): not compiling it again "
                     f"(MDM_CUDA_REBUILD=1 forces a build)")
            return
        temp = Path(self.build_temp) / "mdm_cuda"
        temp.mkdir(parents=True, exist_ok=True)
        jobs = []
        for src in ext.sources:
            obj = temp / (Path(src).name + ".o")
            cmd = [nvcc, *flags, *includes, "-c", str(src), "-o", str(obj)]
            jobs.append((cmd, obj))
        start = time.time()
        announce(f"mdm_kernels: compiling the CUDA extension {ext.name} with {nvcc} for "
                 f"{', '.join('sm_' + a for a in cuda_archs())} ({len(jobs)} files; this takes "
                 f"minutes; MDM_BUILD_CUDA=0 installs without it)...")
        print(f"mdm_kernels: nvcc flags: {' '.join(flags)}", flush=True)
        workers = max(1, min(len(jobs), os.cpu_count() or 1))
        with ThreadPoolExecutor(workers) as pool:
            results = list(pool.map(lambda job: _run(job[0]), jobs))
        failed = [r for r in results if r is not None]
        if failed:
            raise RuntimeError("mdm_kernels: nvcc failed to compile the CUDA extension:\n"
                               + "\n".join(failed))
        link = [nvcc, "-shared", "--cudart=static", "-Xcompiler", "-fPIC",
                *[str(obj) for _, obj in jobs], "-o", str(target)]
        err = _run(link)
        if err is not None:
            raise RuntimeError("mdm_kernels: linking the CUDA extension failed:\n" + err)
        try:  # kept for the next build with the same digest
            BUILD_CACHE.mkdir(parents=True, exist_ok=True)
            tmp = cached.with_name(cached.name + ".tmp")
            shutil.copy2(target, tmp)
            os.replace(tmp, cached)
        except OSError as exc:
            print(f"mdm_kernels: could not keep the build in {BUILD_CACHE} ({exc})", flush=True)
        announce(f"mdm_kernels: built the CUDA extension in {time.time() - start:.1f} s ({target})")


def _abs(path) -> Path:
    p = Path(path)
    return p if p.is_absolute() else ROOT / p


def _run(cmd: list[str]) -> str | None:
    """Run cmd; None on success, else the command and its output."""
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode == 0:
        if proc.stdout.strip():
            print(proc.stdout, flush=True)
        return None
    return f"$ {' '.join(cmd)}\n{proc.stdout}"


def cuda_extensions() -> list[Extension]:
    mode = os.environ.get("MDM_BUILD_CUDA", "").strip()
    if mode == "0":
        print("mdm_kernels: MDM_BUILD_CUDA=0, installing without the CUDA extension "
              "(backend='cuda' unavailable)", file=sys.stderr)
        return []
    if find_nvcc() is None:
        if mode == "1":
            raise RuntimeError("MDM_BUILD_CUDA=1 but nvcc was not found (set CUDA_HOME or "
                               "MDM_NVCC)")
        print("mdm_kernels: nvcc not found (PATH, CUDA_HOME, /usr/local/cuda): installing the "
              "pure-Python package without the CUDA extension; backend='cuda' will be "
              "unavailable (Triton and reference backends are unaffected)", file=sys.stderr)
        return []
    if not CSRC.is_dir():  # e.g. building from an sdist without csrc/
        print("mdm_kernels: csrc/ not found, skipping the CUDA extension", file=sys.stderr)
        return []
    sources = sorted(str(p.relative_to(ROOT)) for p in CSRC.glob("*.cu")) + \
        ["csrc/bindings.cpp"]
    depends = sorted(str(p.relative_to(ROOT)) for p in CSRC.glob("*.h*")) + \
        sorted(str(p.relative_to(ROOT)) for p in CSRC.glob("*.cuh"))
    return [NvccExtension(EXT_NAME, sources=sources, depends=depends)]


if __name__ == "__main__":  # setuptools' build backend runs this file as __main__; tests import it
    setup(ext_modules=cuda_extensions(), cmdclass={"build_ext": CudaBuildExt})

"""Which GPU launch configurations the emulated tests execute (issue 22's count).

With ``MDM_RECORD_LAUNCHES=FILE`` (tests/conftest.py installs this), every interpreter launch
made under GPU-launch emulation is recorded — kernel, constexprs, warps, stages — and the
distinct ones are written to FILE (JSON) when the test session ends.  ``python
python/emulation_coverage.py`` compares them with every launch configuration the router can
make, as the GPU-resource gate enumerates them (:func:`mdm_kernels.gpu_resources.all_variants`).
"""
from __future__ import annotations

import atexit
import json
import os

#: constexprs that only size a tile to the layer widths, count the modalities or the
#: backward's row/column blocks, or select the activation: two launches differing only in
#: these make the same launch decisions (tile table, warps, stages, structural switches).
WIDTH_CONSTEXPRS = frozenset({"ACT", "BLOCK_H1", "BLOCK_H2", "BH1", "BH2", "BK", "BHO", "BC",
                              "BJ", "BLOCK_D", "DOT_PREC", "M", "M_TERMS", "NRB", "NHB"})


def launch_identity(kernel: str, constexprs: dict, num_warps: int, num_stages: int) -> str:
    """A launch configuration: kernel, warps, stages and its constexprs other than
    :data:`WIDTH_CONSTEXPRS` (tile sizes and every structural switch)."""
    kept = {k: v for k, v in sorted(constexprs.items()) if k not in WIDTH_CONSTEXPRS}
    return json.dumps([kernel, num_warps, num_stages, kept], sort_keys=True, default=str)


def install(path: str) -> None:
    """Record the emulated launches of this process into ``path`` at exit."""
    import inspect

    from triton.runtime.interpreter import InterpretedFunction

    from mdm_kernels.ops.runtime_flags import emulated_gpu

    seen: set[str] = set()
    original = InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        if not warmup and emulated_gpu() is not None:
            params = inspect.signature(self.fn).parameters
            consts = {}
            for name, p in params.items():
                if "constexpr" in str(p.annotation):
                    value = kwargs.get(name, p.default)
                    consts[name] = getattr(value, "value", value)
            seen.add(launch_identity(self.fn.__name__, consts, kwargs.get("num_warps", 4),
                                     kwargs.get("num_stages", 3)))
        return original(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = run

    def write():
        old = []
        if os.path.exists(path):
            with open(path) as f:
                old = json.load(f)
        with open(path, "w") as f:
            json.dump(sorted(set(old) | seen), f, indent=0)

    atexit.register(write)

"""Static GPU-resource check of the fused Triton kernels, no GPU needed: compile every
kernel variant and tile config the router can launch, at the edges of what it accepts, for
sm_90 (H100/H200) and sm_80 (A100), with a launch's specialisation (``tt.divisibility`` on
integers that are multiples of 16, aligned pointers) and options (its ``num_warps`` and
``num_stages``), and report shared memory per block and the registers and spills per thread
of the binary Triton builds (its own ptxas run and flags) against the targets' limits.  The
command line of :mod:`mdm_kernels.gpu_resources` (the variants, limits and cache are
documented there; ``tests/test_gpu_resources.py`` runs it in CI)::

    python python/compile_sm90.py [--family gradient_penalty] [--arch 90] [--jobs N]
                                  [--json out.json] [--write-table [--partial]] [--quiet]
                                  [--max-compiles N]

Exit status 0 when everything fits, 1 when some variant does not (listed as FAIL lines),
2 on a usage error or without ptxas.  Results are cached on disk
(``$MDM_RESOURCE_CACHE`` or ``~/.cache/mdm_kernels/gpu_resources``), keyed by the kernel
source, the compile options and the Triton and ptxas versions; ``--write-table`` stores
them in ``tests/gpu_resources_table.json`` so that CI compiles only what changed
(``--max-compiles N --write-table --partial`` stores what is measured so far, e.g. the
on-disk cache of an interrupted run; compiles run round-robin over the kernel families).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

# compile, do not interpret: before Triton is imported
os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mdm_kernels.gpu_resources import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())

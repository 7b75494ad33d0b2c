"""``python -m mdm_kernels.analyze``: the short spelling of ``python -m mdm_kernels.train.analyze``
(``drop``, ``critic``, ``sweep``, ``reproduce``; see docs/analysis.md).  Same options, same
output, same exit statuses."""
from __future__ import annotations

import sys

from .train.analyze import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())

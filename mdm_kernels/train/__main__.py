"""``python -m mdm_kernels.train``: see ``--help`` and docs/training.md."""
from __future__ import annotations

import sys

from .config import build_parser, parse_args


def main(argv=None) -> int:
    cfg = parse_args(argv)
    from .loop import train
    try:
        train(cfg)
    except (FileNotFoundError, ValueError, ImportError) as e:
        build_parser().error(str(e))
    except KeyboardInterrupt:
        print(f"\ninterrupted; continue with --resume --out {cfg.out}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

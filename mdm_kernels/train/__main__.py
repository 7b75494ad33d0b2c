"""``python -m mdm_kernels.train``: see ``--help`` and docs/training.md.

A user error (a bad value, an ``--out`` that cannot be a directory, a refused checkpoint, a
backend that cannot run here...) is one line naming the option and exit status 2;
``--debug`` shows the traceback instead.  Ctrl-C prints the command that continues the run.
"""
from __future__ import annotations

import shlex
import sys

from .._cli import ensure_out_dir, one_line_user_errors
from .config import parse_args

PROG = "python -m mdm_kernels.train"


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    with one_line_user_errors(PROG, argv):
        cfg = parse_args(argv)  # with --resume: the run's own configuration from OUT/last.pt

    def name_the_option(exc: BaseException) -> str | None:
        from ..dispatch import BackendUnavailable
        if isinstance(exc, BackendUnavailable):
            return f"--backend {cfg.backend}: {exc}"
        return None

    try:
        with one_line_user_errors(PROG, argv, name_the_option):
            ensure_out_dir(cfg.out)
            from .loop import train
            train(cfg)
    except KeyboardInterrupt:
        print(f"\ninterrupted; continue with --resume --out {shlex.quote(cfg.out)}", file=sys.stderr)
        return 130
    except RuntimeError as exc:
        # under torchrun: a peer died or the network broke; one line naming rank and step,
        # status 1 (torchrun --max-restarts restarts the round, which continues from last.pt)
        from .ddp import DistributedFailure
        if not isinstance(exc, DistributedFailure) or "--debug" in argv:
            raise
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

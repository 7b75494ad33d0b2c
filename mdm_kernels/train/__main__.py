"""``python -m mdm_kernels.train``: see ``--help`` and docs/training.md.

A user error (a bad value, an ``--out`` that cannot be a directory, a refused checkpoint, a
backend that cannot run here...) is one line naming the option and exit status 2;
``--debug`` shows the traceback first.  A refused run leaves no ``--out`` directory behind.

The run's configuration is written to ``OUT/config.json`` before anything else (before the
data and torch are even loaded), so Ctrl-C at any point -- it prints the command that
continues the run -- can be followed by ``--resume --out OUT`` with the run's own options.
"""
from __future__ import annotations

import os
import shlex
import sys

from .._cli import one_line_user_errors, out_dir_removed_if_refused
from .checkpoint import RUN_CONFIG, write_run_config
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
        with one_line_user_errors(PROG, argv, name_the_option), \
                out_dir_removed_if_refused(cfg.out, disposable=(RUN_CONFIG,)):
            if os.environ.get("RANK", "0") == "0":  # under torchrun: written once, by rank 0
                write_run_config(cfg.to_dict(), cfg.out)  # on disk before the first epoch
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

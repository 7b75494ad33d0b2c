"""Command-line plumbing shared by ``python -m mdm_kernels.train``, ``python -m
mdm_kernels.train.analyze`` and ``python -m mdm_kernels.bench``.

* a user error is ONE line on stderr, ``<prog>: error: <message naming the option>``, and exit
  status 2 (argparse's own errors add ``(see --help)`` instead of the whole usage block);
* ``--debug`` (checked by :func:`debug_requested`) re-raises instead, showing the traceback;
* :func:`ensure_out_dir` creates an output directory or fails naming the option;
* :func:`interactive` says whether progress bars may be drawn (a terminal on both streams);
  piped or redirected output gets plain lines instead of carriage-return frames.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path
from typing import Callable, Sequence


class UsageError(Exception):
    """A user error whose message already names the option (printed as is)."""


class OneLineParser(argparse.ArgumentParser):
    """ArgumentParser whose errors are one line plus ``(see --help)``, exit status 2.
    Subparsers created by ``add_subparsers`` inherit the class."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {one_line(message)} (see --help)\n")


def one_line(text) -> str:
    """``text`` with every run of whitespace (newlines included) collapsed to one space."""
    return " ".join(str(text).split())


def user_error_types() -> tuple[type[BaseException], ...]:
    """The exceptions the CLIs report as user errors: bad values, files and directories that
    cannot be read or written, refused checkpoints, missing optional packages, a backend that
    cannot run here.  Anything else is a bug and keeps its traceback."""
    from .dispatch import BackendUnavailable
    return (UsageError, ValueError, OSError, ImportError, BackendUnavailable)


def debug_requested(argv: Sequence[str]) -> bool:
    return "--debug" in argv


def fail(prog: str, message) -> None:
    """Print ``<prog>: error: <message>`` as one line and exit with status 2."""
    print(f"{prog}: error: {one_line(message)}", file=sys.stderr)
    raise SystemExit(2)


@contextlib.contextmanager
def one_line_user_errors(prog: str, argv: Sequence[str],
                         describe: Callable[[BaseException], str | None] | None = None):
    """Run the block with user errors (:func:`user_error_types`) turned into one line and exit
    status 2, unless ``--debug`` is in ``argv``.  ``describe(exc)`` may rephrase an error so
    that it names the option (e.g. ``--backend triton: ...``); it returns None to keep the
    exception's own message."""
    try:
        yield
    except user_error_types() as exc:
        if debug_requested(argv):
            raise
        text = (describe(exc) if describe is not None else None) or str(exc) or type(exc).__name__
        fail(prog, text)


def ensure_out_dir(path, option: str = "--out") -> Path:
    """Create the output directory ``path`` (and its parents); a path that cannot be a
    writable directory raises :class:`UsageError` naming ``option`` and the reason."""
    p = Path(path)
    try:
        p.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise UsageError(f"{option} {path}: exists and is not a directory") from None
    except NotADirectoryError:
        raise UsageError(f"{option} {path}: a parent of it is a file, not a directory") from None
    except PermissionError as exc:
        raise UsageError(f"{option} {path}: cannot create it ({exc.strerror or 'permission denied'})") from None
    except OSError as exc:
        raise UsageError(f"{option} {path}: cannot create the directory "
                         f"({exc.strerror or type(exc).__name__})") from None
    if not os.access(p, os.W_OK | os.X_OK):
        raise UsageError(f"{option} {path}: the directory is not writable")
    return p


def interactive() -> bool:
    """True when stdout and stderr are both terminals (progress bars may redraw)."""
    return all(getattr(s, "isatty", lambda: False)() for s in (sys.stdout, sys.stderr))

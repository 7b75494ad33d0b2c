"""Command-line plumbing shared by ``python -m mdm_kernels.train``, ``python -m
mdm_kernels.train.analyze`` and ``python -m mdm_kernels.bench``.

* a user error is ONE line on stderr, ``<prog>: error: <message naming the option>``, and exit
  status 2 (argparse's own errors add ``(see --help)`` instead of the whole usage block);
* ``--debug`` (checked by :func:`debug_requested`) re-raises every refused input instead --
  argparse's own errors included, as :class:`UsageError` -- so Python shows its traceback;
* :func:`ensure_out_dir` creates an output directory or fails naming the option;
  :func:`out_dir_removed_if_refused` also removes it again when the run is refused (no empty
  ``--out`` left behind);
* :func:`interactive` says whether progress bars may be drawn (a terminal on both streams);
  piped or redirected output gets plain lines instead of carriage-return frames.
"""
from __future__ import annotations

import argparse
import contextlib
import contextvars
import os
import sys
from pathlib import Path
from typing import Callable, Sequence


class UsageError(Exception):
    """A user error whose message already names the option (printed as is)."""


#: True while a command line holding ``--debug`` is parsed or run (:func:`one_line_user_errors`,
#: :meth:`OneLineParser.parse_known_args`): argparse's errors then show the traceback too.
_DEBUG = contextvars.ContextVar("mdm_kernels_cli_debug", default=False)


class OneLineParser(argparse.ArgumentParser):
    """ArgumentParser whose errors are one line plus ``(see --help)``, exit status 2.
    Subparsers created by ``add_subparsers`` inherit the class.  With ``--debug`` on the
    command line the error is raised as :class:`UsageError` instead (from the refused value's
    own exception, when there is one), so that its traceback shows, as for every other
    refused input."""

    def parse_known_args(self, args=None, namespace=None):
        argv = list(sys.argv[1:] if args is None else args)
        token = _DEBUG.set(_DEBUG.get() or debug_requested(argv))
        try:
            return super().parse_known_args(argv, namespace)
        finally:
            _DEBUG.reset(token)

    def error(self, message: str):
        if _DEBUG.get():
            raise UsageError(f"{one_line(message)} (see --help)")  # chained to the refused value's
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
    status 2.  With ``--debug`` in ``argv`` they are re-raised instead, so that Python shows the
    traceback -- the same for every refused input: bad values, argparse's errors (see
    :class:`OneLineParser`), refused checkpoints, unavailable backends.  ``describe(exc)`` may rephrase an error so that it names the
    option (e.g. ``--backend triton: ...``); it returns None to keep the exception's own
    message."""
    token = _DEBUG.set(debug_requested(argv))
    try:
        yield
    except user_error_types() as exc:
        if debug_requested(argv):
            raise
        text = (describe(exc) if describe is not None else None) or str(exc) or type(exc).__name__
        fail(prog, text)
    finally:
        _DEBUG.reset(token)


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


def _missing_dirs(path: Path) -> list[Path]:
    """The directories that creating ``path`` would create, deepest first."""
    missing, q = [], Path(os.path.abspath(path))
    while not q.exists() and q != q.parent:
        missing.append(q)
        q = q.parent
    return missing


@contextlib.contextmanager
def out_dir_removed_if_refused(path, option: str = "--out", disposable: Sequence[str] = ()):
    """:func:`ensure_out_dir` for the block; when the block then fails with a user error
    (:func:`user_error_types`), the directories this created are removed again if they hold
    nothing but files named in ``disposable`` (e.g. the ``config.json`` written at the start),
    so that a refused run leaves no empty ``--out`` behind.  A directory that existed before,
    or one holding anything else, is kept; so is everything on Ctrl-C (the run can resume)."""
    created = _missing_dirs(Path(path))
    p = ensure_out_dir(path, option)
    try:
        yield p
    except user_error_types():
        for d in created:  # deepest first
            try:
                for f in d.iterdir():
                    if f.is_file() and f.name in disposable:
                        f.unlink()
                d.rmdir()  # only when empty now
            except OSError:
                break
        raise


def interactive() -> bool:
    """True when stdout and stderr are both terminals (progress bars may redraw)."""
    return all(getattr(s, "isatty", lambda: False)() for s in (sys.stdout, sys.stderr))

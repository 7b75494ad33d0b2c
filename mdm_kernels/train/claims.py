"""Claims that let several processes share one cached grid (``reproduce --share``).

A worker that is about to train ``run_dir`` first creates ``<run_dir>.claim`` atomically
(``O_CREAT | O_EXCL``) holding ``"<host> <pid>"``; a second worker that finds the file skips the
run and comes back to it later.  The claim is removed when the run ends, however it ends.  A
claim left by a process that died (same host, pid no longer running) is stale and is taken
over; a claim from another host is never judged stale (its pid means nothing here), and an
empty claim file (a writer killed between create and write) counts as stale after
:data:`EMPTY_CLAIM_GRACE_S` seconds.

Two workers that find the same stale claim at the same instant could both take it over; the
window is one unlink-and-create, and the worst outcome is one run trained twice into the same
directory by identical configurations (the cache keeps the later, equal, result).
"""
from __future__ import annotations

import os
import socket
import time
from pathlib import Path

#: an empty claim file younger than this is a claim being written, not a dead one
EMPTY_CLAIM_GRACE_S = 60.0


def claim_path(run_dir: str | Path) -> Path:
    """``<run_dir>.claim``: beside the run directory, so a claim never lands in the run's cache."""
    run_dir = Path(run_dir)
    return run_dir.with_name(run_dir.name + ".claim")


def _owner() -> str:
    return f"{socket.gethostname()} {os.getpid()}"


def _pid_running(pid: int) -> bool:
    """``pid`` is a process that has not exited (a zombie, exited but not yet reaped by its
    parent, counts as exited: Linux's /proc shows it in state Z)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        pass
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:  # no /proc (not Linux) or gone meanwhile: trust kill
        return True
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def claim_is_stale(path: Path) -> bool:
    """The claim in ``path`` belongs to a process that no longer runs on this host."""
    try:
        text = path.read_text().split()
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return True
    if len(text) != 2 or not text[1].isdigit():
        return age > EMPTY_CLAIM_GRACE_S
    host, pid = text[0], int(text[1])
    if host != socket.gethostname():
        return False
    return not _pid_running(pid)


def claim_run(run_dir: str | Path) -> bool:
    """Claim ``run_dir`` for this process: True if this process now holds it (a stale claim is
    taken over), False if another live process does."""
    path = claim_path(run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                held = path.read_text().strip()
            except FileNotFoundError:  # released meanwhile: try again
                continue
            if held == _owner():
                return True
            if not claim_is_stale(path):
                return False
            path.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(_owner())
        return True
    return False


def release_run(run_dir: str | Path) -> None:
    """Remove this process's claim on ``run_dir`` (another process's claim is left alone)."""
    path = claim_path(run_dir)
    try:
        if path.read_text().strip() == _owner():
            path.unlink()
    except FileNotFoundError:
        pass

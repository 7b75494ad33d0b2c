"""Claims that let several processes share one cached grid (``reproduce --share``).

A worker that is about to train ``run_dir`` first creates ``<run_dir>.claim`` atomically
(``O_CREAT | O_EXCL``) holding ``"<host> <pid>"``; a second worker that finds the file skips the
run and comes back to it later.  The claim is removed when the run ends, however it ends.  A
claim left by a process that died (same host, pid no longer running) is stale and is taken
over.  A claim from another host cannot be judged by its pid (it means nothing here), so while a
process holds claims a daemon thread renews their modification time every
:data:`HEARTBEAT_S` seconds, and a claim from another host is stale once its heartbeat is older
than :data:`FOREIGN_STALE_S` (a generous multiple, for clocks of hosts that share one file system
and for a machine under heavy load).  An empty claim file (a writer killed between create and
write) counts as stale after :data:`EMPTY_CLAIM_GRACE_S` seconds.

Two workers that find the same stale claim at the same instant could both take it over; the
window is one unlink-and-create, and the worst outcome is one run trained twice into the same
directory by identical configurations (the cache keeps the later, equal, result).
"""
from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

#: an empty claim file younger than this is a claim being written, not a dead one
EMPTY_CLAIM_GRACE_S = 60.0
#: how often a process renews the modification time of the claims it holds
HEARTBEAT_S = 60.0
#: a claim from another host whose heartbeat is older than this belongs to a process that died
FOREIGN_STALE_S = 900.0


class _Heartbeat:
    """The claims this process holds, and the daemon thread that touches them every
    :data:`HEARTBEAT_S` seconds (started with the first claim; it exits with the process)."""

    def __init__(self):
        self._held: set[Path] = set()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def hold(self, path: Path) -> None:
        with self._lock:
            self._held.add(path)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._beat, name="claim-heartbeat", daemon=True)
                self._thread.start()

    def drop(self, path: Path) -> None:
        with self._lock:
            self._held.discard(path)

    def held(self) -> set[Path]:
        with self._lock:
            return set(self._held)

    def _beat(self) -> None:
        while True:
            time.sleep(HEARTBEAT_S)
            for path in self.held():
                try:
                    os.utime(path)
                except FileNotFoundError:  # removed by hand: nothing left to renew
                    self.drop(path)


_HEARTBEAT = _Heartbeat()


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
    """The claim in ``path`` belongs to a process that no longer runs: on this host, its pid has
    exited; on another host, its heartbeat is older than :data:`FOREIGN_STALE_S`."""
    try:
        text = path.read_text().split()
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return True
    if len(text) != 2 or not text[1].isdigit():
        return age > EMPTY_CLAIM_GRACE_S
    host, pid = text[0], int(text[1])
    if host != socket.gethostname():
        return age > FOREIGN_STALE_S
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
                _HEARTBEAT.hold(path)
                return True
            if not claim_is_stale(path):
                return False
            path.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(_owner())
        _HEARTBEAT.hold(path)
        return True
    return False


def release_run(run_dir: str | Path) -> None:
    """Remove this process's claim on ``run_dir`` (another process's claim is left alone)."""
    path = claim_path(run_dir)
    _HEARTBEAT.drop(path)
    try:
        if path.read_text().strip() == _owner():
            path.unlink()
    except FileNotFoundError:
        pass

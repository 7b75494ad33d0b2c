"""A finishing time for a long grid (``reproduce --stop-by``): start a run only if it can end in time.

A grid worker that is stopped mid-run loses that run's work wherever its checkpoints do not
survive (a fresh clone keeps the finished runs' JSON, never the ``*.pt``; MAG's last.pt, with
MiniLM's weights and Adam state, is hundreds of MB).  With a stop time the worker starts a run
only when the longest run of the same model that has finished under this grid root
(``train_seconds`` in its metrics.json, selection runs included) would still end before it;
the rest are listed as not run, and the report is written as usual.  With nothing measured yet
for a model, its run starts (there is no estimate to refuse it on).
"""
from __future__ import annotations

import json
import re
import time
from datetime import datetime, timedelta
from pathlib import Path

_DURATION = re.compile(r"^\+(\d+(?:\.\d+)?)([smh])$")
_CLOCK = re.compile(r"^(\d{1,2}):(\d{2})$")
_UNIT_SECONDS = {"s": 1.0, "m": 60.0, "h": 3600.0}


def parse_stop_by(text: str, now: float | None = None) -> float:
    """The stop time (epoch seconds) from ``+90m`` / ``+2h`` / ``+300s`` (from now), ``HH:MM``
    (the next time this machine's clock shows it) or an ISO date-time (``2026-12-03T03:15``,
    local time unless it carries an offset).  ValueError names the accepted forms."""
    now = time.time() if now is None else now
    text = text.strip()
    m = _DURATION.match(text)
    if m:
        return now + float(m.group(1)) * _UNIT_SECONDS[m.group(2)]
    m = _CLOCK.match(text)
    if m:
        hour, minute = int(m.group(1)), int(m.group(2))
        if hour > 23 or minute > 59:
            raise ValueError(f"--stop-by: no such clock time {text!r}")
        start = datetime.fromtimestamp(now)
        at = start.replace(hour=hour, minute=minute, second=0, microsecond=0)
        if at <= start:
            at += timedelta(days=1)
        return at.timestamp()
    try:
        at = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"--stop-by: expected +DURATION (e.g. +90m, +2h, +300s), HH:MM or an ISO "
                         f"date-time, got {text!r}") from None
    stop = at.timestamp()
    if stop <= now:
        raise ValueError(f"--stop-by: {text!r} has already passed")
    return stop


def longest_run_seconds(grid_root: str | Path, model: str) -> float | None:
    """The longest ``train_seconds`` among the finished runs of ``model`` under ``grid_root``
    (``runs/<model>_*`` and ``select/<model>_*``); None when none has finished."""
    root = Path(grid_root)
    seconds = []
    for folder in ("runs", "select"):
        for path in (root / folder).glob(f"{model}_*/metrics.json"):
            try:
                value = json.loads(path.read_text()).get("train_seconds")
            except (OSError, ValueError):
                continue  # being written by another worker
            if isinstance(value, (int, float)) and value > 0:
                seconds.append(float(value))
    return max(seconds) if seconds else None


def fits_before(stop_by: float | None, need_seconds: float | None, now: float | None = None) -> bool:
    """Whether a run estimated at ``need_seconds`` (None: unknown) ends before ``stop_by``
    (None: no stop time)."""
    if stop_by is None or need_seconds is None:
        return True
    return (time.time() if now is None else now) + need_seconds <= stop_by

"""Checkpoints of ``python -m mdm_kernels.train`` (``OUT/best.pt``, ``OUT/last.pt``): read
only with ``torch.load(..., weights_only=True)``, so a file holding anything but tensors and
plain values (dicts, lists, tuples, str, int, float, bool, None) -- e.g. a pickled
``os.system`` call -- is refused before any of it runs.  Everything the training loop
stores is of those types: model/optimizer state dicts, the configuration as a dict of plain
values, and the RNG states (torch/generator states are uint8 tensors, Python's is a tuple of
ints, NumPy's is converted by :func:`numpy_state_to_plain`).

The run's configuration is also on disk from the start, before the first epoch:
``OUT/config.json`` (:func:`write_run_config`, plain JSON, never unpickled), so that a run
interrupted before its first checkpoint still resumes with its own options.
:func:`mdm_kernels.train.config.resume_values` restores a run's own configuration for
``--resume`` from ``last.pt`` (:func:`load_checkpoint`) or, before the first checkpoint, from
``config.json`` (:func:`read_run_config`).
"""
from __future__ import annotations

import json
import os
import pickle
import re
from pathlib import Path

import numpy as np
import torch


class CheckpointError(ValueError):
    """A checkpoint that cannot or must not be loaded; the message names the file."""


def load_checkpoint(path, map_location="cpu") -> dict:
    """``torch.load(path, weights_only=True)`` of a training checkpoint (a dict with
    ``"model"`` and ``"config"``); anything else raises :class:`CheckpointError`."""
    p = Path(path)
    try:
        ck = torch.load(p, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        if found is None:  # not a pickle torch can parse at all (garbage, a foreign format)
            detail = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", str(exc))
            raise CheckpointError(f"{p}: not a readable checkpoint (UnpicklingError: "
                                  f"{detail.group(1) if detail else 'unreadable pickle'})") from None
        raise CheckpointError(
            f"{p}: refusing to load this checkpoint: it references {found.group(1)}; checkpoints "
            "are read with torch.load(weights_only=True) (tensors and plain values only), and "
            "files written by mdm_kernels never need more (retrain if it came from an older "
            "version)") from None
    except (RuntimeError, EOFError, KeyError, ValueError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{p}: not a readable checkpoint ({type(exc).__name__}: "
                              f"{str(exc).strip().splitlines()[0] if str(exc).strip() else 'empty'})") from None
    if not isinstance(ck, dict) or "model" not in ck or not isinstance(ck.get("config"), dict):
        raise CheckpointError(f"{p}: not a checkpoint of python -m mdm_kernels.train "
                              "(expected a dict with 'model' and 'config')")
    return ck


def numpy_state_to_plain(state: tuple) -> dict:
    """``np.random.get_state()`` (legacy MT19937 tuple) as tensors and plain values."""
    name, keys, pos, has_gauss, cached = state
    return {"name": str(name), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}


def numpy_state_from_plain(st: dict) -> tuple:
    """Inverse of :func:`numpy_state_to_plain`, for ``np.random.set_state``."""
    keys = st["keys"].cpu().numpy().astype(np.uint32)
    return st["name"], keys, st["pos"], st["has_gauss"], st["cached_gaussian"]


#: The run's configuration, written by ``python -m mdm_kernels.train`` before training starts.
RUN_CONFIG = "config.json"


def write_run_config(config: dict, out) -> Path:
    """Write ``config`` (plain values) to ``OUT/config.json`` atomically; returns the path."""
    path = Path(out) / RUN_CONFIG
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return path


def read_run_config(out) -> dict:
    """The configuration in ``OUT/config.json`` (JSON only: nothing is unpickled); a file
    that is not a JSON object raises :class:`CheckpointError` naming it."""
    path = Path(out) / RUN_CONFIG
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: not a readable run configuration ({type(exc).__name__}: "
                              f"{' '.join(str(exc).split())})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: not a run configuration of python -m mdm_kernels.train "
                              "(expected a JSON object of option names to values)")
    return data

"""Datasets for the training layer: embedded real MOSI and a synthetic generator.

(``formats.py`` is reserved for community-format loaders: pickles, .csd.)
"""
from __future__ import annotations

import numpy as np
import torch

from .mosi import Split, load_mosi
from .synthetic import make_synthetic

__all__ = ["Split", "load_mosi", "make_synthetic", "load_dataset", "iterate_batches"]


def load_dataset(name: str, data_dir=None, text_features: str = "both", seed: int = 0) -> dict[str, Split]:
    if name == "mosi":
        return load_mosi(data_dir, text_features=text_features)
    if name == "synthetic":
        return make_synthetic(seed=seed)
    raise ValueError(f"--dataset must be 'mosi' or 'synthetic', got {name!r}")


def batch_from(split: Split, idx: np.ndarray, device) -> dict:
    lens = split.text_len[idx]
    L = int(lens.max())
    return {
        "text": torch.from_numpy(np.ascontiguousarray(split.text[idx, :L])).to(device),
        "text_len": torch.from_numpy(lens).to(device),
        "audio": torch.from_numpy(split.audio[idx]).to(device),
        "video": torch.from_numpy(split.video[idx]).to(device),
        "y": torch.from_numpy(split.y[idx]).to(device),
        "words": [split.words[i] for i in idx],
    }


def iterate_batches(split: Split, batch_size: int, device="cpu", shuffle: bool = False,
                    generator: torch.Generator | None = None):
    n = len(split)
    order = torch.randperm(n, generator=generator).numpy() if shuffle else np.arange(n)
    for s in range(0, n, batch_size):
        yield batch_from(split, order[s:s + batch_size], device)

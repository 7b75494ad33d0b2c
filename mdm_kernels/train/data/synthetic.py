"""Synthetic three-modality data with a known dependency structure.

A shared latent s ~ N(0, I_k) drives every modality: x_m = A_m s + sigma * e_m, with
modality-private noise; the label is y = clip(3 * tanh(w . s), -3, 3) + small noise.  With
``shared=0`` the modalities are independent and only text carries the label, so the true
mutual dependency between modalities is zero; otherwise it is positive and grows as
``noise`` shrinks.  Text is a sequence (the latent is spread over time steps), audio and video
length-1 sequences, like the MOSI loader.
"""
from __future__ import annotations

import numpy as np

from .mosi import Split


def make_synthetic(n_train: int = 384, n_valid: int = 96, n_test: int = 96, latent: int = 4,
                   dims=(16, 8, 8), seq_len: int = 6, noise: float = 0.5, shared: float = 1.0,
                   seed: int = 0) -> dict[str, Split]:
    rng = np.random.RandomState(seed)
    dt, da, dv = dims
    A = {m: rng.randn(latent, d) / np.sqrt(latent) for m, d in zip("tav", dims)}
    w = rng.randn(latent) / np.sqrt(latent)
    out = {}
    for name, n in (("train", n_train), ("valid", n_valid), ("test", n_test)):
        s = rng.randn(n, latent)
        private = {m: rng.randn(n, latent) for m in "tav"}
        # audio/video share sqrt(shared) of their latent with the text latent s
        mix = lambda m: np.sqrt(shared) * s + np.sqrt(1.0 - shared) * private[m]
        lat = {"t": s, "a": mix("a"), "v": mix("v")}
        lens = rng.randint(max(1, seq_len // 2), seq_len + 1, size=n)
        text = np.zeros((n, seq_len, dt), dtype=np.float32)
        for i in range(n):
            base = lat["t"][i] @ A["t"]
            text[i, :lens[i]] = base + noise * rng.randn(lens[i], dt)
        audio = (lat["a"] @ A["a"] + noise * rng.randn(n, da))[:, None, :].astype(np.float32)
        video = (lat["v"] @ A["v"] + noise * rng.randn(n, dv))[:, None, :].astype(np.float32)
        y = np.clip(3 * np.tanh(s @ w) + 0.1 * rng.randn(n), -3, 3).astype(np.float32)
        out[name] = Split(text=text, text_len=lens.astype(np.int64), audio=audio, video=video, y=y,
                          words=[" ".join(["tok"] * int(k)) for k in lens])
    return out

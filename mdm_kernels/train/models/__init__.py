"""Fusion models: ``build_model(name, in_dims, **sizes)``; each returns (pred, (z_l, z_a, z_v))."""
from __future__ import annotations

from .fusion import EFLSTM, LFLSTM, LMF, TFN, FusionModel, MulT

MODELS = ("ef_lstm", "lf_lstm", "tfn", "lmf", "mult", "mag")


def build_model(name: str, in_dims, **sizes) -> FusionModel:
    """``sizes``: d (z width), hidden, dropout, plus rank (lmf), heads/layers (mult)."""
    sizes = {k: v for k, v in sizes.items() if v is not None}
    if name == "ef_lstm":
        return EFLSTM(in_dims, **sizes)
    if name == "lf_lstm":
        return LFLSTM(in_dims, **sizes)
    if name == "tfn":
        return TFN(in_dims, **sizes)
    if name == "lmf":
        return LMF(in_dims, **sizes)
    if name == "mult":
        return MulT(in_dims, **sizes)
    if name == "mag":
        from .mag import MAGMiniLM
        return MAGMiniLM(in_dims, **sizes)
    raise ValueError(f"--model must be one of {', '.join(MODELS)}; got {name!r}")


__all__ = ["MODELS", "build_model", "FusionModel", "EFLSTM", "LFLSTM", "TFN", "LMF", "MulT"]

"""Fusion models: ``build_model(name, in_dims, **sizes)``; each returns (pred, (z_l, z_a, z_v))."""
from __future__ import annotations

from . import numerics  # noqa: F401  (first: pins MKL's code path before any matrix product)

from .fusion import EFLSTM, LFLSTM, LMF, TFN, FusionModel, MulT
from .mfn import MFN

#: model name -> class; "mag" is imported on demand (its encoder is an optional extra)
_CLASSES = {"ef_lstm": EFLSTM, "lf_lstm": LFLSTM, "tfn": TFN, "lmf": LMF, "mult": MulT, "mfn": MFN}
MODELS = (*_CLASSES, "mag")


def build_model(name: str, in_dims, **sizes) -> FusionModel:
    """``sizes``: d (z width), hidden, dropout, plus rank (lmf), heads/layers (mult)."""
    sizes = {k: v for k, v in sizes.items() if v is not None}
    if name == "mag":
        from .mag import MAGMiniLM
        return MAGMiniLM(in_dims, **sizes)
    if name not in _CLASSES:
        raise ValueError(f"--model must be one of {', '.join(MODELS)}; got {name!r}")
    return _CLASSES[name](in_dims, **sizes)


__all__ = ["MODELS", "build_model", "FusionModel", "EFLSTM", "LFLSTM", "TFN", "LMF", "MulT", "MFN"]

"""MOSI evaluation metrics, as in the multimodal sentiment literature (MulT / MISA / MAG code).

- ``acc7``: 7-class accuracy of round(clip(x, -3, 3)) (numpy rounding, half to even).
- ``acc2`` / ``f1``: binary "negative (< 0) vs non-negative (>= 0)" on all segments.
- ``acc2_nonzero`` / ``f1_nonzero``: drop segments whose *label* is exactly 0, then
  "positive (> 0) vs negative".
- F1 is the *weighted* F1 (per-class F1 averaged with the classes' support as weights), the
  convention of the MOSI literature (scikit-learn ``f1_score(average="weighted")``).
- ``mae``: mean absolute error; ``corr``: Pearson correlation (NaN when either side is
  constant).  All values are fractions, not percent.
"""
from __future__ import annotations

import numpy as np

KEYS = ("acc7", "acc2", "f1", "acc2_nonzero", "f1_nonzero", "mae", "corr")


def weighted_f1(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    y_true = np.asarray(y_true).astype(bool)
    y_pred = np.asarray(y_pred).astype(bool)
    if y_true.size == 0:
        return float("nan")
    total = 0.0
    for c in (False, True):
        support = np.sum(y_true == c)
        if support == 0:
            continue
        tp = np.sum((y_pred == c) & (y_true == c))
        fp = np.sum((y_pred == c) & (y_true != c))
        fn = support - tp
        denom = 2 * tp + fp + fn
        total += support * (2 * tp / denom if denom else 0.0)
    return float(total / y_true.size)


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    a, b = a - a.mean(), b - b.mean()
    den = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / den) if den > 0 else float("nan")


def sentiment_metrics(pred, label) -> dict[str, float]:
    pred = np.asarray(pred, dtype=np.float64).reshape(-1)
    label = np.asarray(label, dtype=np.float64).reshape(-1)
    if pred.shape != label.shape:
        raise ValueError(f"pred and label shapes differ: {pred.shape} vs {label.shape}")
    c7p = np.round(np.clip(pred, -3, 3))
    c7l = np.round(np.clip(label, -3, 3))
    nz = label != 0
    return {
        "acc7": float(np.mean(c7p == c7l)),
        "acc2": float(np.mean((pred >= 0) == (label >= 0))),
        "f1": weighted_f1(label >= 0, pred >= 0),
        "acc2_nonzero": float(np.mean((pred[nz] > 0) == (label[nz] > 0))) if nz.any() else float("nan"),
        "f1_nonzero": weighted_f1(label[nz] > 0, pred[nz] > 0),
        "mae": float(np.mean(np.abs(pred - label))),
        "corr": pearson(pred, label),
    }


def format_table(m: dict[str, float], title: str = "test") -> str:
    names = {"acc7": "Acc-7", "acc2": "Acc-2 (>=0)", "f1": "F1 (>=0, weighted)",
             "acc2_nonzero": "Acc-2 (non-zero)", "f1_nonzero": "F1 (non-zero, weighted)",
             "mae": "MAE", "corr": "Corr"}
    w = max(len(v) for v in names.values())
    lines = [f"Test metrics ({title})", f"{'metric':<{w}}  value", "-" * (w + 8)]
    lines += [f"{names[k]:<{w}}  {m[k]:.4f}" for k in KEYS]
    return "\n".join(lines)

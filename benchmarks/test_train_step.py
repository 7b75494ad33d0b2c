"""End-to-end row: one full training step of a fusion model with its dependency penalty —
the speed-up a user sees.  Two-stage update as in ``mdm_kernels.train.loop``: a critic step
maximising the bound on the detached z's, then the model step on task loss − λ·bound.
Paper scale: embedded CMU-MOSI batch of 32, LF-LSTM and MulT with their default sizes
(z width 32), critic MLP with one hidden layer of 128.  ``none`` is the model alone."""
from __future__ import annotations

import pytest
import torch

import mdm_bench as mb

MODELS = ("lf_lstm", "mult")
PENALTIES = ("mine", "wasserstein")
BACKENDS = ("none", "eager", "triton", "cuda")
BATCH = 32


def _rows():
    rows = []
    for model in MODELS:
        rows.append((model, "none", "none"))
        for pen in PENALTIES:
            for backend in BACKENDS[1:]:
                rows.append((model, pen, backend))
    return rows


_DATA = {}


def _batch(device):
    if "mosi" not in _DATA:
        from mdm_kernels.train.data import batch_from, load_dataset
        split = load_dataset("mosi")["train"]
        import numpy as np
        _DATA["mosi"] = (split, batch_from)
        _DATA["idx"] = np.arange(BATCH)
    split, batch_from = _DATA["mosi"]
    return batch_from(split, _DATA["idx"], device)


@pytest.mark.parametrize("row", _rows(), ids=[f"{m}-{p}-{b}" for m, p, b in _rows()])
def test_train_step(benchmark, row, sizes, bench_disabled):
    model_name, pen_kind, backend = row
    try:
        from mdm_kernels.train.models import build_model
    except ImportError as exc:
        pytest.skip(f"training models not available: {exc}")
    if backend in ("triton", "cuda"):
        reason = mb.fused_unavailable(backend)
        if reason:
            pytest.skip(reason)
    from mdm_kernels import DependencyPenalty
    device = mb.DEVICE
    batch = _batch(device)
    in_dims = (batch["text"].shape[-1], batch["audio"].shape[-1], batch["video"].shape[-1])
    torch.manual_seed(0)
    try:
        model = build_model(model_name, in_dims).to(device)
    except Exception as exc:
        pytest.skip(f"model {model_name} cannot be built: {type(exc).__name__}: {exc}")
    model.train()
    penalty = None
    if pen_kind != "none":
        lib_backend = "reference" if backend == "eager" else backend
        penalty = DependencyPenalty(pen_kind, tuple(model.dims), hidden=(128,), weight=0.1,
                                    backend=lib_backend).to(device)
        c_opt = torch.optim.Adam(penalty.critic.parameters(), lr=1e-3)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = torch.nn.L1Loss()

    def step():
        pred, zs = model(batch)
        loss = loss_fn(pred, batch["y"])
        if penalty is not None:
            c_opt.zero_grad(set_to_none=True)
            penalty.critic_loss(*zs).backward()
            c_opt.step()
            loss = loss + penalty(*zs)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if penalty is not None:
            penalty.critic.zero_grad(set_to_none=True)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()
        return loss

    key = f"train/{model_name}/{pen_kind}/B{BATCH}"
    info = {"section": "train", "op": f"train-step-{pen_kind}", "model": model_name,
            "penalty": pen_kind, "batch": BATCH, "m": 3, "dims": list(model.dims),
            "hidden": [128], "hidden_layers": 1, "negatives": "shuffle",
            "family": f"train/{model_name}/{pen_kind}", "sizes": sizes}
    from mdm_kernels.dispatch import BackendUnavailable
    try:
        mb.run_row(benchmark, step, key=key, backend=backend, flops=None,
                   disabled=bench_disabled, info=info)
    except BackendUnavailable as exc:
        pytest.skip(f"{backend}: {exc}")
    except (ImportError, NotImplementedError) as exc:
        if backend in ("triton", "cuda"):
            pytest.skip(f"{backend} backend not implemented yet: {type(exc).__name__}: {exc}")
        raise
    # the model-only row is the baseline of the penalty rows of the same model
    base = mb.RESULTS.get(f"train/{model_name}/none/B{BATCH}", {}).get("none")
    mine = mb.RESULTS.get(key, {}).get(backend)
    if base and mine and pen_kind != "none":
        benchmark.extra_info["penalty_overhead_s"] = mine[0] - base[0]

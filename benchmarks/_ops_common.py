"""The op-row body shared by ``test_ops.py`` (paper scale) and ``test_scale.py`` (sweeps)."""
from __future__ import annotations

import pytest

import mdm_bench as mb


def run_op_row(benchmark, op_row, sizes, disabled):
    case, backend = op_row
    if backend in ("triton", "cuda"):
        reason = mb.fused_unavailable(backend)
        if reason:
            pytest.skip(reason)
    if backend == "torch-mist":
        reason = mb.peer_unavailable(case)
        if reason:
            pytest.skip(reason)
    if backend == "compile":
        reason = mb.compile_row_allowed(case, sizes)
        if reason:
            pytest.skip(reason)
    if backend in ("eager", "compile", "torch-mist") and mb.ON_GPU:
        import torch
        need = mb.predicted_eager_bytes(case)
        total = torch.cuda.get_device_properties(mb.DEVICE).total_memory
        if backend != "compile" and need > total:
            pytest.skip(f"out of memory (predicted): the broadcast {backend} step needs "
                        f"~{need / 2**30:.0f} GiB > {total / 2**30:.0f} GiB on {mb.device_name()}")
    critic, zs = mb.make_inputs(case)
    if backend == "torch-mist":
        try:
            step = mb.make_peer_step(case, zs)
        except Exception as exc:  # third-party, optional: never fail the suite
            pytest.skip(f"torch-mist cannot build {case.op}: {type(exc).__name__}: {exc}")
    else:
        step = mb.make_op_step(case, backend, critic, zs)
    info = {"section": case.section, "op": case.op, "m": case.m, "dims": list(case.dims),
            "hidden": list(case.hidden), "hidden_layers": len(case.hidden),
            "batch": case.batch, "negatives": case.negatives, "family": case.family(),
            "num_marginal_samples": case.num_marginal(), "gp_rows": case.gp_rows(),
            "sizes": sizes}
    if backend == "triton":
        info["triton_path"] = mb.triton_path(case, critic, zs)
    if backend == "torch-mist" and mb.peer_estimator_note(case):
        info["peer_estimator"] = mb.peer_estimator_note(case)
    pair_hidden = None
    if case.negatives in ("all", "distinct") and case.op != "gp":
        pair_hidden = case.num_marginal() * case.hidden[0]
    from mdm_kernels.dispatch import BackendUnavailable
    try:
        mb.run_row(benchmark, step, key=case.key(), backend=backend,
                   flops=mb.nominal_flops(case), disabled=disabled, info=info,
                   pair_hidden=pair_hidden)
    except mb.OOM as exc:
        pytest.skip(str(exc))
    except BackendUnavailable as exc:
        pytest.skip(f"{backend}: {exc}")
    except (ImportError, NotImplementedError) as exc:
        if backend in ("triton", "cuda"):
            pytest.skip(f"{backend} backend not implemented yet for {case.op}: "
                        f"{type(exc).__name__}: {exc}")
        raise
    except Exception as exc:
        if backend == "torch-mist":
            pytest.skip(f"torch-mist failed on {case.op}: {type(exc).__name__}: {exc}")
        if backend == "compile":
            first = str(exc).strip().splitlines()[0][:240] if str(exc).strip() else ""
            pytest.skip(f"torch.compile cannot run this step ({type(exc).__name__}: {first})")
        raise

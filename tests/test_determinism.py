"""Bit-identical reruns on the CPU (issue 25): the same seed and configuration give the same
run for every model, in one process and across processes whose CPU libraries are steered to
other code paths (as on a machine with another instruction set or thread count)."""
import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mdm_kernels.train.config import TrainConfig
from mdm_kernels.train.loop import train

ROOT = Path(__file__).resolve().parents[1]
MODELS = ["ef_lstm", "lf_lstm", "tfn", "lmf", "mfn", "mult"]


#: the reproduction's backbones on MOSI; the others on the small synthetic set (word sequences:
#: the packed-LSTM and attention-mask paths)
DATASET = {"ef_lstm": "mosi", "lmf": "mosi", "mfn": "mosi", "lf_lstm": "synthetic", "tfn": "synthetic",
           "mult": "synthetic"}


def _short(model, penalty, out, **kw):
    cfg = TrainConfig(model=model, penalty=penalty, epochs=1, patience=0, text_features="utterance",
                      dataset=DATASET[model], device="cpu", quiet=True, seed=3, out=str(out), **kw)
    with contextlib.redirect_stdout(io.StringIO()):
        return train(cfg)


def _fingerprint(res: dict) -> dict:
    keep = ("acc7", "acc2", "f1", "mae", "corr", "best_val_mae", "best_epoch", "history")
    return {k: res[k] for k in keep}


@pytest.mark.parametrize("model", MODELS)
def test_rerun_is_bit_identical(model, tmp_path):
    # the baseline and a penalised arm (critic, shuffles and the model's term all seeded)
    penalty = "nwj" if model in ("lmf", "mfn") else "none"
    a = _short(model, penalty, tmp_path / "a")
    b = _short(model, penalty, tmp_path / "b")
    assert _fingerprint(a) == _fingerprint(b)  # exact: floats compared bit for bit
    assert a["versions"]["numerics"]["onednn_in_models"] is False


def test_arms_share_initialisation_and_data_order(tmp_path):
    # the critic draws its initialisation from its own seed: a penalty with weight 0 leaves the
    # model exactly where the baseline goes (same init, batches and dropout masks)
    base = _short("ef_lstm", "none", tmp_path / "none")
    zero = _short("ef_lstm", "nwj", tmp_path / "nwj0", weight=0.0)
    assert base["history"][0]["val_mae"] == zero["history"][0]["val_mae"]
    assert base["mae"] == zero["mae"]
    assert zero["history"][0]["cap_binds"] == 0 and zero["history"][0]["batches"] > 0


_CHILD = """
import json, sys, contextlib, io
import torch
torch.set_num_threads(int(sys.argv[2]))
from mdm_kernels.train.config import TrainConfig
from mdm_kernels.train.loop import train
cfg = TrainConfig(model="lmf", penalty="none", epochs=2, patience=0, text_features="utterance",
                  device="cpu", quiet=True, seed=0, out=sys.argv[1])
with contextlib.redirect_stdout(io.StringIO()):
    r = train(cfg)
print("RESULT " + json.dumps({k: r[k] for k in ("acc7", "acc2", "mae", "corr", "history")}
                             | {"numerics": r["versions"]["numerics"]}))
"""


def _child(tmp_path, name, threads, **env):
    e = {k: v for k, v in os.environ.items() if k not in ("MKL_CBWR", "ONEDNN_VERBOSE")}
    e.update(env)
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    p = subprocess.run([sys.executable, "-c", _CHILD, str(tmp_path / name), str(threads)], env=e,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):]), p.stdout


@pytest.mark.skipif(not torch.backends.mkl.is_available() or not torch.backends.mkldnn.is_available(),
                    reason="the CPU-dependent code paths are MKL's and oneDNN's")
def test_lmf_does_not_depend_on_the_cpu_code_path_or_threads(tmp_path):
    # LMF seed 0 used to change with the machine: oneDNN ran its LSTM with ISA-specific
    # kernels and MKL's GEMM dispatched on the CPU.  Steer both to other paths (AVX2 only, 2
    # threads) and the run must not move by a bit.
    ref, out = _child(tmp_path, "ref", 1, ONEDNN_VERBOSE="1")
    assert "primitive,exec" not in out  # no oneDNN primitive ran (its verbose mode lists them)
    # Intel: the AVX2 branch; AMD: MKL reports AUTO for any branch but COMPATIBLE (STRICT holds)
    assert ref["numerics"]["mkl_cbwr"] in ("AVX2,STRICT", "AUTO,STRICT")
    other, _ = _child(tmp_path, "other", 2, ONEDNN_MAX_CPU_ISA="AVX2", MKL_ENABLE_INSTRUCTIONS="AVX2")
    ref.pop("numerics"), other.pop("numerics")
    assert other == ref

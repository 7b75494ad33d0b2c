"""``torchrun --nproc_per_node 2 -m mdm_kernels.train`` on CPU (gloo), localhost only."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch.distributed as dist

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is unavailable")

EXPECTED = {"acc7", "acc2", "f1", "acc2_nonzero", "f1_nonzero", "mae", "corr", "best_epoch", "best_val_mae", "epochs_run", "train_seconds", "n_test", "device",
            "config", "versions", "history", "world_size"}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(out, *extra, timeout=75):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
           "-m", "mdm_kernels.train", "--dataset", "synthetic", "--model", "lf_lstm",
           "--z-dim", "4", "--hidden", "8", "--batch-size", "32", "--device", "cpu",
           "--quiet", "--out", str(out), *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("WORLD_SIZE", None)
    # own session, so that a hang is killed with all its workers
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    try:
        text, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        text, _ = proc.communicate()
        pytest.fail(f"torchrun did not finish in {timeout}s:\n{text[-4000:]}")
    assert proc.returncode == 0, text[-4000:]
    return text


def test_torchrun_two_processes_one_epoch_then_resume(tmp_path):
    out = tmp_path / "run"
    text = _torchrun(out, "--epochs", "1", "--penalty", "infonce")
    # metrics.json, the table and the checkpoints: written once, by rank 0
    assert text.count("wrote ") == 1 and text.count("Test metrics") == 1, text
    assert sorted(p.name for p in out.iterdir()) == ["best.pt", "last.pt", "metrics.json"]
    m = json.loads((out / "metrics.json").read_text())
    assert EXPECTED <= set(m), set(m) ^ EXPECTED
    assert m["world_size"] == 2 and m["epochs_run"] == 1 and m["n_test"] == 96
    rec = m["history"][0]
    assert {"train_loss", "train_task", "val_mae", "dependency", "critic_loss"} <= set(rec)
    assert all(v == v for v in (m["mae"], rec["val_mae"], rec["dependency"]))  # not NaN

    # --resume continues the distributed run from last.pt (rank 0 wrote it, every rank reads
    # it and restores its own RNG state)
    text = _torchrun(out, "--epochs", "2", "--penalty", "infonce", "--resume")
    m = json.loads((out / "metrics.json").read_text())
    assert m["epochs_run"] == 2 and [h["epoch"] for h in m["history"]] == [1, 2], text

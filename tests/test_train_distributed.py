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
    names = {p.name for p in out.iterdir()}
    assert {"best.pt", "last.pt", "metrics.json"} <= names <= {"best.pt", "last.pt", "metrics.json",
                                                              "config.json"}, names
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


def test_round_prefix_differs_between_restarts_and_agrees_within_one(monkeypatch):
    from mdm_kernels.train import ddp
    for k in ("TORCHELASTIC_USE_AGENT_STORE", "GROUP_WORLD_SIZE", "TORCHELASTIC_RESTART_COUNT", "RANK"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job")
    # a fresh store every round (MASTER_ADDR/PORT, TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1)
    assert ddp.round_prefix() == "mdm_kernels/job/"
    # torchrun's shared store, one node: the node's restart count
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    seen = []
    for restart in ("0", "1", "2"):
        monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", restart)
        seen.append(ddp.round_prefix(dist.HashStore()))
    assert len(set(seen)) == 3 and seen[1] == "mdm_kernels/job/restart1/"
    # several nodes (restart counts differ between nodes): each rank's incarnation in the store
    monkeypatch.setenv("GROUP_WORLD_SIZE", "2")
    store = dist.HashStore()
    rounds = []
    for _ in range(2):
        prefixes = []
        for rank, restart in (("0", "1"), ("1", "0")):  # node 0 counted the restart, node 1 did not
            monkeypatch.setenv("RANK", rank)
            monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", restart)
            prefixes.append(ddp.round_prefix(store))
        assert prefixes[0] == prefixes[1]
        rounds.append(prefixes[0])
    assert rounds[0] != rounds[1]


def test_dist_timeout_is_checked():
    from mdm_kernels.train import ddp
    from mdm_kernels.train.config import TrainConfig, validate
    assert ddp.check_timeout("2.5") == 2.5
    for bad in (0, -1, "x", float("nan"), float("inf"), None):
        with pytest.raises(ValueError, match="--dist-timeout"):
            ddp.check_timeout(bad)
        with pytest.raises(ValueError, match="--dist-timeout"):
            validate(TrainConfig(dist_timeout=bad))

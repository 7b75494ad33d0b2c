"""Checkpoints are read with torch.load(weights_only=True): a run directory carrying a pickled
``os.system`` call is refused before anything in it runs, by the API and by every CLI."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mdm_kernels.train.__main__ import main as train_main
from mdm_kernels.train.analyze import main as analyze_main
from mdm_kernels.train.checkpoint import CheckpointError, load_checkpoint
from mdm_kernels.train.config import TrainConfig
from mdm_kernels.train.loop import train

PACKAGE = Path(__file__).resolve().parents[1] / "mdm_kernels"


class ShellPayload:
    """Unpickling this runs a shell command (what a malicious checkpoint would carry)."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


@pytest.fixture
def evil_run(tmp_path):
    """A run directory whose best.pt and last.pt would create ``marker`` when unpickled."""
    run, marker = tmp_path / "evil_run", tmp_path / "marker"
    run.mkdir()
    for name in ("best.pt", "last.pt"):
        torch.save({"model": {}, "config": {"model": "lf_lstm", "hook": ShellPayload(f"touch {marker}")}},
                   run / name)
    return run, marker


def _one_line_exit_2(fn, argv, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        fn(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_loader_refuses_a_pickled_call(evil_run):
    run, marker = evil_run
    with pytest.raises(CheckpointError, match=r"last\.pt: refusing to load .*posix\.system|system"):
        load_checkpoint(run / "last.pt")
    assert not marker.exists()


@pytest.mark.parametrize("cli, argv", [
    ("train", ["--resume", "--out", "{run}"]),
    ("analyze", ["critic", "{run}", "--out", "{tmp}/critic"]),
    ("analyze", ["drop", "{run}", "--out", "{tmp}/drop"]),
])
def test_clis_refuse_before_anything_runs(cli, argv, evil_run, tmp_path, capsys):
    run, marker = evil_run
    argv = [a.format(run=run, tmp=tmp_path) for a in argv]
    err = _one_line_exit_2(train_main if cli == "train" else analyze_main, argv, capsys)
    assert "refusing to load" in err and "weights_only=True" in err
    assert not marker.exists()


def test_not_a_checkpoint(tmp_path, capsys):
    run = tmp_path / "r"
    run.mkdir()
    (run / "last.pt").write_bytes(b"not a zip and not a pickle")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(run / "last.pt")
    torch.save([1, 2, 3], run / "best.pt")
    with pytest.raises(CheckpointError, match="expected a dict with 'model' and 'config'"):
        load_checkpoint(run / "best.pt")
    err = _one_line_exit_2(train_main, ["--resume", "--out", str(run)], capsys)
    assert "--resume: " in err and "last.pt: not a readable checkpoint" in err


def test_written_checkpoints_load_with_weights_only(tmp_path):
    """Everything the loop stores (RNG states, optimizer and MINE-EMA state, the config) is
    tensors and plain values."""
    cfg = TrainConfig(dataset="synthetic", model="lf_lstm", penalty="mine", ema_decay=0.9, d=4, hidden=8,
                      critic_hidden=8, epochs=1, batch_size=128, device="cpu", backend="reference",
                      out=str(tmp_path), quiet=True)
    train(cfg)
    for name in ("best.pt", "last.pt"):
        ck = torch.load(tmp_path / name, weights_only=True)
        assert ck["config"]["penalty"] == "mine"
    ck = torch.load(tmp_path / "last.pt", weights_only=True)
    assert isinstance(ck["rng"]["numpy"]["keys"], torch.Tensor) and "penalty" in ck


def test_no_unrestricted_torch_load_in_the_package():
    """Every torch.load of the package passes weights_only=True."""
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        if "weights_only=False" in text:
            offenders.append(f"{path}: weights_only=False")
        for call in re.finditer(r"torch\.load\(([^)]*)\)", text):
            if "weights_only=True" not in call.group(1):
                offenders.append(f"{path}: {call.group(0)}")
    assert not offenders, offenders


def test_refusal_through_the_real_command_line(evil_run):
    run, marker = evil_run
    proc = subprocess.run([sys.executable, "-m", "mdm_kernels.train", "--resume", "--out", str(run)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("python -m mdm_kernels.train: error: --resume: "), proc.stderr
    assert "refusing to load" in lines[0]
    assert not marker.exists()

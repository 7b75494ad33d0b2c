"""The CLI: a short run on the embedded data, exact resume, clear errors."""
import json

import pytest
import torch

from mdm_kernels.train.__main__ import main
from mdm_kernels.train.config import TrainConfig, parse_args
from mdm_kernels.train.loop import train

try:
    from mdm_kernels import DependencyPenalty  # noqa: F401
    HAS_PENALTY = True
except ImportError:
    HAS_PENALTY = False

KEYS = ("acc7", "acc2", "f1", "acc2_nonzero", "f1_nonzero", "mae", "corr")


def test_short_run_on_embedded_mosi(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["--epochs", "1", "--batch-size", "64", "--d", "8", "--hidden", "16",
               "--text-features", "utterance", "--out", str(out), "--quiet"])
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    for k in KEYS:
        assert 0.0 <= m[k] <= (3.0 if k == "mae" else 1.0) or k == "corr", k
    assert m["n_test"] == 752
    assert m["config"]["model"] == "lf_lstm" and "torch" in m["versions"]
    assert (out / "best.pt").is_file() and (out / "last.pt").is_file()
    assert not list(out.glob("*.tmp"))
    printed = capsys.readouterr().out
    assert "Acc-7" in printed and "Corr" in printed


def _cfg(out, **kw):
    base = dict(dataset="synthetic", model="lf_lstm", d=4, hidden=8, epochs=3, patience=10,
                batch_size=128, out=str(out), quiet=True)
    base.update(kw)
    return TrainConfig(**base)


def test_resume_after_interruption_equals_uninterrupted(tmp_path):
    penalty = "infonce" if HAS_PENALTY else "none"  # a penalty also checks the critic's state
    full = train(_cfg(tmp_path / "full", penalty=penalty))
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(tmp_path / "cut", penalty=penalty), _interrupt_after_epoch=1)
    resumed = train(_cfg(tmp_path / "cut", penalty=penalty, resume=True))
    for k in KEYS + ("best_epoch", "best_val_mae"):
        assert resumed[k] == full[k], k
    assert resumed["history"] == full["history"]
    a = torch.load(tmp_path / "full" / "last.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "cut" / "last.pt", weights_only=False)["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_config_file_and_precedence(tmp_path):
    cfg_file = tmp_path / "c.json"
    cfg_file.write_text(json.dumps({"model": "tfn", "critic-steps": 3, "lr": 0.01}))
    cfg = parse_args(["--config", str(cfg_file), "--lr", "0.002"])
    assert cfg.model == "tfn" and cfg.critic_steps == 3 and cfg.lr == 0.002
    y = tmp_path / "c.yaml"
    y.write_text("penalty: nwj\nnegatives: 4\n")
    cfg = parse_args(["--config", str(y)])
    assert cfg.penalty == "nwj" and cfg.negatives == 4


@pytest.mark.parametrize("argv, needle", [
    (["--model", "bert"], "--model"),
    (["--penalty", "kl"], "--penalty"),
    (["--negatives", "0"], "--negatives"),
    (["--negatives", "many"], "--negatives"),
    (["--epochs", "0"], "--epochs"),
    (["--lr", "-1"], "--lr"),
    (["--backend", "opencl"], "--backend"),
    (["--device", "tpu"], "--device"),
    (["--ema-decay", "0.9"], "--ema-decay"),
    (["--config", "/nonexistent/cfg.yaml"], "--config"),
])
def test_bad_flags(argv, needle, capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(argv)
    assert e.value.code == 2
    assert needle in capsys.readouterr().err


def test_unknown_config_key(tmp_path, capsys):
    f = tmp_path / "c.json"
    f.write_text('{"modle": "tfn"}')
    with pytest.raises(SystemExit):
        parse_args(["--config", str(f)])
    assert "modle" in capsys.readouterr().err


def test_missing_data_dir(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--data-dir", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o"), "--quiet"])
    assert e.value.code == 2
    assert "--data-dir" in capsys.readouterr().err


def test_cuda_requested_without_gpu(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(SystemExit):
        main(["--device", "cuda", "--dataset", "synthetic", "--out", str(tmp_path), "--quiet"])
    assert "CUDA is not available" in capsys.readouterr().err

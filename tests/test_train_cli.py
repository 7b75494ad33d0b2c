"""The CLI: a short run on the embedded data, exact resume, clear errors."""
import json
import shlex

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


@pytest.mark.slow
def test_resume_after_interruption_equals_uninterrupted(tmp_path):
    penalty = "infonce" if HAS_PENALTY else "none"  # a penalty also checks the critic's state
    full = train(_cfg(tmp_path / "full", penalty=penalty))
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(tmp_path / "cut", penalty=penalty), _interrupt_after_epoch=1)
    resumed = train(_cfg(tmp_path / "cut", penalty=penalty, resume=True))
    for k in KEYS + ("best_epoch", "best_val_mae"):
        assert resumed[k] == full[k], k
    assert resumed["history"] == full["history"]
    a = torch.load(tmp_path / "full" / "last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_config_file_and_precedence(tmp_path):
    cfg_file = tmp_path / "c.json"
    cfg_file.write_text(json.dumps({"model": "tfn", "penalty": "mine", "critic-steps": 3, "lr": 0.01}))
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
    err = capsys.readouterr().err
    assert needle in err
    # one line naming the option plus "see --help", not the whole usage block
    assert len(err.strip().splitlines()) == 1 and err.rstrip().endswith("(see --help)"), err
    assert "usage:" not in err


def test_unknown_config_key(tmp_path, capsys):
    f = tmp_path / "c.json"
    f.write_text('{"modle": "tfn"}')
    with pytest.raises(SystemExit):
        parse_args(["--config", str(f)])
    assert "modle" in capsys.readouterr().err


def _user_error(argv, capsys) -> str:
    """Run the CLI's entry function; it must stop with status 2 and ONE stderr line."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("python -m mdm_kernels.train: error: ")
    return err


def test_missing_data_dir(tmp_path, capsys):
    err = _user_error(["--data-dir", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o"), "--quiet"], capsys)
    assert "--data-dir" in err


def test_cuda_requested_without_gpu(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    err = _user_error(["--device", "cuda", "--dataset", "synthetic", "--out", str(tmp_path), "--quiet"], capsys)
    assert "--device cuda: CUDA is not available" in err


SMALL = ["--dataset", "synthetic", "--d", "4", "--hidden", "8", "--batch-size", "128", "--quiet"]


@pytest.mark.parametrize("where, needle", [
    ("file", "exists and is not a directory"),          # FileExistsError
    ("file/run", "a parent of it is a file"),           # NotADirectoryError
])
def test_bad_out_paths(where, needle, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    err = _user_error(SMALL + ["--out", str(tmp_path / where)], capsys)
    assert f"--out {tmp_path / where}: {needle}" in err


def test_out_not_creatable(tmp_path, capsys, monkeypatch):
    """PermissionError / other OSErrors of --out (as /sys/x, /proc/x do as root) name --out."""
    from pathlib import Path
    for exc, needle in ((PermissionError(1, "Operation not permitted"), "cannot create it (Operation not permitted)"),
                        (OSError(2, "No such file or directory"), "cannot create the directory (No such file")):
        def refuse(self, *a, exc=exc, **k):
            raise exc
        monkeypatch.setattr(Path, "mkdir", refuse)
        err = _user_error(SMALL + ["--out", str(tmp_path / "x")], capsys)
        assert f"--out {tmp_path / 'x'}: {needle}" in err


def test_backend_unavailable_is_one_line(tmp_path, capsys, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the Triton backend can run")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # no interpreter: Triton cannot run on CPU
    err = _user_error(SMALL + ["--penalty", "mine", "--backend", "triton", "--epochs", "1",
                               "--out", str(tmp_path / "o")], capsys)
    assert "--backend triton: " in err and "CUDA tensors" in err


def test_debug_shows_the_traceback(tmp_path):
    from mdm_kernels._cli import UsageError
    (tmp_path / "file").write_text("x")
    with pytest.raises(UsageError, match="--out"):
        main(SMALL + ["--out", str(tmp_path / "file"), "--debug"])
    with pytest.raises(UsageError, match="--epochs must be >= 1"):  # refused while parsing too
        main(SMALL + ["--epochs", "0", "--debug"])


@pytest.mark.slow
def test_ctrl_c_hint_resumes_exactly_as_written(tmp_path, capsys, monkeypatch):
    """Interrupt a non-default run; the printed command alone continues it with the run's own
    configuration (model, lr, ...) and ends where an uninterrupted run ends."""
    import mdm_kernels.train.loop as loop
    run = ["--model", "tfn", "--lr", "0.002", "--epochs", "3", "--patience", "10"] + SMALL
    assert main(run + ["--out", str(tmp_path / "full")]) == 0
    real_train = loop.train
    monkeypatch.setattr(loop, "train", lambda cfg: real_train(cfg, _interrupt_after_epoch=1))
    out = tmp_path / "cut run"  # a space: the hint must quote it
    assert main(run + ["--out", str(out)]) == 130
    hint = capsys.readouterr().err.strip().splitlines()[-1]
    assert hint.startswith("interrupted; continue with --resume --out ")
    monkeypatch.setattr(loop, "train", real_train)
    assert main(shlex.split(hint.split("continue with ", 1)[1])) == 0
    full = json.loads((tmp_path / "full" / "metrics.json").read_text())
    resumed = json.loads((out / "metrics.json").read_text())
    assert resumed["config"]["model"] == "tfn" and resumed["config"]["lr"] == 0.002
    assert resumed["history"] == full["history"]
    for k in KEYS:
        assert resumed[k] == full[k], k
    # a flag that contradicts the run is an error naming the flag; the run's length may change
    err = _user_error(["--resume", "--out", str(out), "--model", "lf_lstm"], capsys)
    assert "--model 'lf_lstm' contradicts the run in" in err and "'tfn'" in err
    cfg = parse_args(["--resume", "--out", str(out), "--epochs", "5", "--model", "tfn"])
    assert cfg.model == "tfn" and cfg.epochs == 5 and cfg.lr == 0.002 and cfg.dataset == "synthetic"


@pytest.mark.parametrize("name, text, needle", [
    ("c.yaml", "model: [tfn\n", "not valid YAML"),
    ("c.json", '{"model": ', "not valid JSON"),
])
def test_unparsable_config_file(name, text, needle, tmp_path, capsys):
    f = tmp_path / name
    f.write_text(text)
    err = _user_error(["--config", str(f), "--out", str(tmp_path / "o")], capsys)
    assert f"--config {f}: {needle}" in err

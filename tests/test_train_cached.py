"""The run cache of ``sweep`` and ``reproduce`` (``analysis.train_cached``): a run interrupted
earlier continues from its last checkpoint, exactly; a checkpoint of another configuration is
not continued."""
import json

import pytest

from mdm_kernels.train import analysis, loop
from mdm_kernels.train.config import TrainConfig

KEYS = ("acc7", "acc2", "mae", "corr", "best_epoch", "best_val_mae", "epochs_run")


def _cfg(out, **kw):
    base = dict(dataset="synthetic", model="ef_lstm", penalty="nwj", d=4, hidden=8, critic_hidden=8,
                epochs=3, patience=10, batch_size=128, out=str(out), quiet=True)
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture
def interrupted(tmp_path):
    """A run stopped (like a killed grid worker) after its first epoch."""
    cut = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        loop.train(_cfg(cut), _interrupt_after_epoch=1)
    assert (cut / "last.pt").is_file() and not (cut / "metrics.json").exists()
    return cut


def test_interrupted_run_continues_exactly(tmp_path, interrupted):
    full = loop.train(_cfg(tmp_path / "full"))
    assert analysis.interrupted_run(_cfg(interrupted))
    res, reused = analysis.train_cached(_cfg(interrupted))
    assert not reused and res["resumed_after_epoch"] == 1 and "resumed_after_epoch" not in full
    assert {k: res[k] for k in KEYS} == {k: full[k] for k in KEYS}
    assert res["history"] == full["history"]
    assert res["train_seconds"] > 0
    # the continued run is a cache hit for the configuration the grid asks for (resume aside)
    assert json.loads((interrupted / "metrics.json").read_text())["config"]["resume"] is True
    again, reused = analysis.train_cached(_cfg(interrupted))
    assert reused and again["history"] == full["history"]


def test_checkpoint_of_another_configuration_is_not_continued(interrupted, monkeypatch):
    other = _cfg(interrupted, lr=0.0005)
    assert not analysis.interrupted_run(other)
    seen = []
    real = loop.train
    monkeypatch.setattr(loop, "train", lambda cfg, **kw: seen.append(cfg.resume) or real(cfg, **kw))
    res, reused = analysis.train_cached(other)
    assert seen == [False] and not reused and "resumed_after_epoch" not in res and res["epochs_run"] == 3


def test_no_skip_existing_trains_afresh(interrupted):
    assert analysis.interrupted_run(_cfg(interrupted))
    res, _ = analysis.train_cached(_cfg(interrupted), skip_existing=False)
    assert "resumed_after_epoch" not in res and res["config"]["resume"] is False


def test_torn_checkpoint_is_not_continued(tmp_path):
    run = tmp_path / "torn"
    run.mkdir()
    (run / "last.pt").write_bytes(b"not a checkpoint")
    assert not analysis.interrupted_run(_cfg(run))

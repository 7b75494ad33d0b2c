"""``reproduce --stop-by``: a worker starts a run only if it can end in time."""
import json
import time
from datetime import datetime

import pytest

from mdm_kernels.train import analyze, deadline
from mdm_kernels.train import reproduce as rep

NOW = datetime(2026, 12, 3, 1, 30).timestamp()


@pytest.mark.parametrize("text, seconds", [("+90m", 5400), ("+2h", 7200), ("+300s", 300), ("+1.5h", 5400),
                                           ("03:15", 6300), ("01:00", 23.5 * 3600),  # passed today: tomorrow
                                           ("2026-12-03T02:00", 1800)])
def test_stop_by_forms(text, seconds):
    assert deadline.parse_stop_by(text, now=NOW) == pytest.approx(NOW + seconds)


@pytest.mark.parametrize("text, message", [("soon", "expected"), ("25:00", "no such clock time"),
                                           ("2026-12-02T23:00", "already passed"), ("+5d", "expected")])
def test_stop_by_refuses(text, message):
    with pytest.raises(ValueError, match=message):
        deadline.parse_stop_by(text, now=NOW)


def _finished(root, folder, name, seconds):
    d = root / folder / name
    d.mkdir(parents=True)
    (d / "metrics.json").write_text(json.dumps({"train_seconds": seconds}))


def test_longest_run_seconds(tmp_path):
    _finished(tmp_path, "runs", "mag_none_s0", 100.0)
    _finished(tmp_path, "select", "mag_wasserstein_lam1_s0", 250.0)
    _finished(tmp_path, "runs", "mfn_none_s0", 999.0)
    (tmp_path / "runs" / "mag_none_s1").mkdir()
    (tmp_path / "runs" / "mag_none_s1" / "metrics.json").write_text("{")  # being written
    assert deadline.longest_run_seconds(tmp_path, "mag") == 250.0
    assert deadline.longest_run_seconds(tmp_path, "lmf") is None
    assert deadline.fits_before(NOW + 300, 250.0, now=NOW) and not deadline.fits_before(NOW + 200, 250.0, now=NOW)
    assert deadline.fits_before(None, 1e9) and deadline.fits_before(NOW, None, now=NOW + 1)


GRID = {"weight": (0.1, 1.0), "critic_steps": (1,), "critic_hidden": (8,)}
KW = dict(models=["ef_lstm"], grid=GRID, base={"dataset": "synthetic", "epochs": 1}, progress=True)


def test_grid_starts_only_what_fits(tmp_path, capsys):
    """Finished runs are collected; runs whose model's longest finished run would end after the
    stop time are listed as not started (said once), and nothing trains."""
    out = tmp_path / "grid"
    rep.run_reproduce(out, penalties=["none"], seeds=[0], doc=tmp_path / "a.md", **KW)
    _finished(out, "runs", "ef_lstm_none_s9", 3600.0)  # the longest ef_lstm run so far: an hour
    capsys.readouterr()
    res = rep.run_reproduce(out, penalties=["none"], seeds=[0, 1, 2], doc=tmp_path / "b.md",
                            stop_by=time.time() + 600, **KW)
    assert [r["seed"] for r in res["runs"]] == [0]
    assert res["missing"] == [f"ef_lstm/none/s{s} (not started: would end after --stop-by)" for s in (1, 2)]
    assert not (out / "runs" / "ef_lstm_none_s1").exists()
    assert capsys.readouterr().err.count("--stop-by: not starting") == 1
    report = (tmp_path / "b.md").read_text()
    assert "**Not run** (2 final runs): ef_lstm: 2 (none s1–2). 2 runs (selection runs included) were not started" in report
    assert res["deferred"] == ["ef_lstm/none/s1", "ef_lstm/none/s2"]


def test_shared_grid_does_not_wait_for_a_selection_it_deferred(tmp_path):
    """With --share, a final run waits for its λ selection, unless the selection was not started
    because of the stop time: then it is reported, not waited for."""
    out = tmp_path / "grid"
    _finished(out, "runs", "ef_lstm_none_s9", 3600.0)
    t0 = time.monotonic()
    res = rep.run_reproduce(out, penalties=["none", "nwj"], seeds=[0], doc=tmp_path / "r.md", share=True,
                            poll_seconds=60, stop_by=time.time() + 600, **KW)
    assert time.monotonic() - t0 < 30 and not res["runs"]
    assert res["missing"] == ["ef_lstm/none/s0 (not started: would end after --stop-by)",
                              "ef_lstm/nwj/s0 (selection unfinished)"]
    assert not list((out / "select").glob("*/*"))  # neither λ selection run started
    assert not list(out.rglob("*.claim"))


def test_stop_by_on_the_command_line(tmp_path, monkeypatch, capsys):
    seen = {}
    monkeypatch.setattr(rep, "run_reproduce", lambda *a, **kw: seen.update(kw) or {"runs": [], "missing": []})
    t0 = time.time()
    assert analyze.main(["reproduce", "--dataset", "synthetic", "--out", str(tmp_path), "--stop-by", "+90m"]) == 0
    assert seen["stop_by"] == pytest.approx(t0 + 5400, abs=5)
    with pytest.raises(SystemExit) as e:
        analyze.main(["reproduce", "--dataset", "synthetic", "--out", str(tmp_path), "--stop-by", "later"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "--stop-by" in err[-1] and "expected +DURATION" in err[-1]

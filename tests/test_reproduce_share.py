"""Several workers sharing one ``reproduce`` grid (``--share``): claims and waiting."""
import json
import os
import socket
import subprocess
import sys
import time

import pytest

from mdm_kernels.train import claims, loop
from mdm_kernels.train import reproduce as rep

HOST = socket.gethostname()


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_claim_is_exclusive_and_released(tmp_path):
    run = tmp_path / "runs" / "m_none_s0"
    assert claims.claim_run(run) and claims.claim_path(run).read_text() == f"{HOST} {os.getpid()}"
    assert claims.claim_run(run)  # ours already
    assert not run.exists()  # the claim lives beside the run, not in its cache
    claims.release_run(run)
    assert not claims.claim_path(run).exists()
    claims.release_run(run)  # releasing twice is harmless


@pytest.mark.parametrize("holder, taken", [
    (lambda: f"{HOST} {os.getppid()}", False),        # a live process on this host
    (lambda: f"{HOST} {_dead_pid()}", True),          # a dead one: stale, taken over
    (lambda: f"elsewhere.example {_dead_pid()}", False),  # another host, fresh heartbeat: held
])
def test_foreign_claims(tmp_path, holder, taken):
    run = tmp_path / "r"
    claims.claim_path(run).write_text(holder())
    assert claims.claim_run(run) is taken
    claims.release_run(run)
    assert claims.claim_path(run).exists() is not taken  # a foreign claim is never released by us


def test_claim_from_another_host_is_stale_once_its_heartbeat_is_old(tmp_path):
    run = tmp_path / "r"
    path = claims.claim_path(run)
    path.write_text("elsewhere.example 4242")
    old = time.time() - claims.FOREIGN_STALE_S + 60
    os.utime(path, (old, old))
    assert not claims.claim_run(run)  # a heartbeat 60 s inside the limit: still held
    old = time.time() - claims.FOREIGN_STALE_S - 60
    os.utime(path, (old, old))
    assert claims.claim_run(run) and path.read_text() == f"{HOST} {os.getpid()}"
    claims.release_run(run)


def test_held_claims_are_renewed_until_released(tmp_path, monkeypatch):
    monkeypatch.setattr(claims, "HEARTBEAT_S", 0.05)
    monkeypatch.setattr(claims, "_HEARTBEAT", claims._Heartbeat())
    run, other = tmp_path / "r", tmp_path / "o"
    assert claims.claim_run(run) and claims.claim_run(other)
    claims.release_run(other)
    old = time.time() - 3600
    for p in (claims.claim_path(run), claims.claim_path(other)):
        p.touch()
        os.utime(p, (old, old))
    deadline = time.time() + 10
    while claims.claim_path(run).stat().st_mtime < old + 1800 and time.time() < deadline:
        time.sleep(0.05)
    assert claims.claim_path(run).stat().st_mtime > old + 1800  # the held claim's heartbeat
    assert claims.claim_path(other).stat().st_mtime == pytest.approx(old)  # released: not renewed
    assert claims._HEARTBEAT.held() == {claims.claim_path(run)}
    claims.release_run(run)
    assert not claims._HEARTBEAT.held() and not claims.claim_path(run).exists()


def test_empty_claim_is_stale_only_when_old(tmp_path):
    run = tmp_path / "r"
    path = claims.claim_path(run)
    path.write_text("")
    assert not claims.claim_run(run)
    old = time.time() - claims.EMPTY_CLAIM_GRACE_S - 5
    os.utime(path, (old, old))
    assert claims.claim_run(run)


def test_shared_grid_waits_for_another_workers_run(tmp_path, monkeypatch, capsys):
    """A run held by another live process is skipped, the rest of the grid goes on, and the
    worker comes back to it once the holder is gone; the report is in plan order."""
    trained = []
    real = loop.train

    def counting(cfg, **kw):
        trained.append((cfg.penalty, cfg.seed))
        return real(cfg, **kw)
    monkeypatch.setattr(loop, "train", counting)
    out = tmp_path / "grid"
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(4)"])
    try:
        held = out / "runs" / "ef_lstm_none_s0"
        claims.claim_path(held).parent.mkdir(parents=True)
        claims.claim_path(held).write_text(f"{HOST} {holder.pid}")
        grid = {"weight": (0.1,), "critic_steps": (1,), "critic_hidden": (8,)}
        res = rep.run_reproduce(out, models=["ef_lstm"], penalties=["none", "nwj"], seeds=[0, 1], grid=grid,
                                base={"dataset": "synthetic", "epochs": 1}, progress=True,
                                doc=tmp_path / "r.md", share=True, poll_seconds=0.2)
        assert holder.poll() is not None  # the worker waited for the holder to end
    finally:
        holder.kill()
        holder.wait()
    assert trained[-1] == ("none", 0) and sorted(trained) == [("none", 0), ("none", 1), ("nwj", 0), ("nwj", 1)]
    assert [(r["penalty"], r["seed"]) for r in res["runs"]] == [("none", 0), ("nwj", 0), ("none", 1), ("nwj", 1)]
    assert not res["missing"] and not list(out.rglob("*.claim"))
    err = capsys.readouterr().err  # the wait is said once, not every poll
    assert err.count("waiting for 1 run(s) that other processes hold") == 1
    assert json.loads((out / "reproduce.json").read_text())["runs"] == json.loads(json.dumps(res["runs"]))


def test_shared_grid_final_runs_wait_for_their_selection(tmp_path, monkeypatch):
    """With --share a final run whose λ selection another worker is still training waits for it
    (without --share it would be reported as not run)."""
    out = tmp_path / "grid"
    grid = {"weight": (0.1, 1.0), "critic_steps": (1,), "critic_hidden": (8,)}
    kw = dict(models=["ef_lstm"], penalties=["none", "nwj"], seeds=[0], grid=grid,
              base={"dataset": "synthetic", "epochs": 1}, progress=False, doc=tmp_path / "r.md")
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(4)"])
    sel = out / "select" / "ef_lstm_nwj_lam1_unroll1_ch8_s0"
    claims.claim_path(sel).parent.mkdir(parents=True)
    claims.claim_path(sel).write_text(f"{HOST} {holder.pid}")
    try:
        res = rep.run_reproduce(out, **kw, share=True, poll_seconds=0.2)
    finally:
        holder.kill()
        holder.wait()
    assert not res["missing"] and {r["penalty"] for r in res["runs"]} == {"none", "nwj"}
    assert res["selection"]["ef_lstm/nwj"]["complete"]


def test_share_flag_reaches_the_grid(monkeypatch, tmp_path):
    seen = {}
    monkeypatch.setattr(rep, "run_reproduce", lambda *a, **kw: seen.update(kw) or {"runs": [], "missing": []})
    from mdm_kernels.train import analyze
    assert analyze.main(["reproduce", "--dataset", "synthetic", "--out", str(tmp_path), "--share"]) == 0
    assert seen["share"] is True


def test_report_only_never_waits(tmp_path):
    """--report-only with --share lists unfinished runs (selection included) instead of waiting."""
    grid = {"weight": (0.1, 1.0), "critic_steps": (1,), "critic_hidden": (8,)}
    t0 = time.monotonic()
    res = rep.run_reproduce(tmp_path / "grid", models=["ef_lstm"], penalties=["none", "nwj"], seeds=[0], grid=grid,
                            base={"dataset": "synthetic", "epochs": 1}, progress=False, doc=tmp_path / "r.md",
                            report_only=True, share=True, poll_seconds=60)
    assert time.monotonic() - t0 < 30 and not res["runs"]
    assert res["missing"] == ["ef_lstm/none/s0", "ef_lstm/nwj/s0 (selection unfinished)"]


def test_share_refuses_no_skip_existing(tmp_path):
    from mdm_kernels.train import analyze
    with pytest.raises(ValueError, match="--share needs the cache"):
        rep.run_reproduce(tmp_path, models=["ef_lstm"], penalties=["none"], seeds=[0], share=True,
                          skip_existing=False, base={"dataset": "synthetic"}, progress=False)
    # on the command line: one line naming the options, status 2
    with pytest.raises(SystemExit) as e:
        analyze.main(["reproduce", "--dataset", "synthetic", "--out", str(tmp_path), "--share", "--no-skip-existing"])
    assert e.value.code == 2

"""A crashed worker under ``torchrun --max-restarts``: the restarted round forms its process
group (fresh store keys, docs/training.md), continues from the last complete checkpoint and
ends with the metrics of an uninterrupted run; a checkpoint killed between write and rename
leaves the previous one usable; a stuck peer becomes a one-line error naming rank and step.

Linux only (the workers are found through /proc); CPU, gloo, localhost."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from mdm_kernels.train.checkpoint import load_checkpoint

pytestmark = [
    pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                       reason="torch.distributed with gloo is unavailable"),
    pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs Linux /proc"),
]

# a tiny run: 4 epochs of ~0.5 s on the synthetic data (start-up dominates)
RUN = ["--dataset", "synthetic", "--model", "ef_lstm", "--penalty", "mine", "--z-dim", "4",
       "--hidden", "8", "--batch-size", "32", "--epochs", "4", "--device", "cpu"]
# what must not change when the run is interrupted (train_seconds, config.out do)
SAME = ("acc7", "acc2", "f1", "acc2_nonzero", "f1_nonzero", "mae", "corr", "best_epoch",
        "best_val_mae", "epochs_run", "history", "world_size")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


TAG = "MDM_TORCHRUN_TEST"  # marks every process a test starts (torchrun's workers included)


def _env(tag: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    env[TAG] = tag
    return env


def _start(cmd, tag: str, env=None, **kw):
    proc = subprocess.Popen(cmd, text=True, env=env or _env(tag), start_new_session=True, **kw)
    proc.tag = tag
    return proc


def _torchrun(out, *extra, max_restarts=0):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--max-restarts", str(max_restarts), "--monitor-interval", "0.2",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{_free_port()}",
           "-m", "mdm_kernels.train", *RUN, "--out", str(out), *extra]
    return _start(cmd, str(out), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _finish(proc, timeout=120):
    """``proc``'s output (stdout, or (stdout, stderr) when piped apart); on a timeout it is
    killed with every process it started."""
    try:
        return _output(proc.communicate(timeout=timeout))
    except subprocess.TimeoutExpired:
        _kill(proc)
        pytest.fail(f"did not finish in {timeout}s:\n{str(_output(proc.communicate()))[-4000:]}")
    finally:
        _kill(proc)


def _output(pair):
    return pair[0] if pair[1] is None else pair


def _kill(proc) -> None:
    """SIGKILL every process carrying ``proc``'s tag: torchrun starts each worker in a
    session of its own, and a worker can outlive its launcher (then holding the pipes)."""
    for pid in [proc.pid, *_tagged(proc.tag)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def _tagged(tag: str) -> dict:
    """{pid: environment} of the live processes carrying ``tag``."""
    found = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            env = dict(kv.split("=", 1) for kv in (d / "environ").read_text().split("\0") if "=" in kv)
        except (OSError, ValueError):
            continue
        if env.get(TAG) == tag:
            found[int(d.name)] = env
    return found


def _workers(tag: str) -> dict:
    """{(restart count, rank): pid} of the tagged worker processes."""
    return {(int(env.get("TORCHELASTIC_RESTART_COUNT", "0")), int(env["RANK"])): pid
            for pid, env in _tagged(tag).items() if "RANK" in env}


def _same_metrics(a: dict, b: dict) -> None:
    for k in SAME:
        assert a[k] == b[k] or (a[k] != a[k] and b[k] != b[k]), (k, a[k], b[k])


@pytest.mark.slow
def test_killed_worker_restarts_and_matches_uninterrupted_run(tmp_path):
    ref_out, out = tmp_path / "uninterrupted", tmp_path / "killed"
    # the uninterrupted run (2 processes, launched directly) runs alongside the killed one
    port = _free_port()
    ref = [_direct(ref_out, r, port) for r in (0, 1)]
    proc = _torchrun(out, max_restarts=1)
    killed = None
    deadline = time.monotonic() + 90
    while killed is None and proc.poll() is None and time.monotonic() < deadline:
        if (out / "last.pt").is_file():  # epoch 1 is complete: kill rank 0 mid-run
            pid = _workers(proc.tag).get((0, 0))
            if pid is not None:
                os.kill(pid, signal.SIGKILL)
                killed = pid
        time.sleep(0.02)
    text = _finish(proc)
    ref_err = [_finish(p)[1] for p in ref]
    assert killed is not None, f"the run ended before a worker could be killed:\n{text[-4000:]}"
    assert proc.returncode == 0, text[-4000:]
    assert "exitcode: -9" in text, text[-4000:]  # torchrun saw the kill and restarted
    assert "resumed from" in text, text[-4000:]  # the restarted round continued from last.pt
    m = json.loads((out / "metrics.json").read_text())
    resumed = int(text.split("resumed from", 1)[1].split("after epoch", 1)[1].split()[0])
    assert 1 <= resumed <= m["epochs_run"], text[-4000:]
    assert all(p.returncode == 0 for p in ref), ref_err
    _same_metrics(m, json.loads((ref_out / "metrics.json").read_text()))


_KILL_BEFORE_RENAME = textwrap.dedent("""
    import os, signal, sys, torch
    from pathlib import Path
    from mdm_kernels.train import loop
    path = Path(sys.argv[1])
    loop.atomic_save({"model": {"w": torch.zeros(3)}, "config": {"epoch": 1}}, path)
    def killed(src, dst):  # the process dies after writing the new file, before renaming it
        os.kill(os.getpid(), signal.SIGKILL)
    loop.os.replace = killed
    loop.atomic_save({"model": {"w": torch.ones(3)}, "config": {"epoch": 2}}, path)
""")


def test_kill_between_write_and_rename_keeps_previous_checkpoint(tmp_path):
    path = tmp_path / "last.pt"
    proc = subprocess.run([sys.executable, "-c", _KILL_BEFORE_RENAME, str(path)], env=_env(str(path)),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    tmp = tmp_path / "last.pt.tmp"
    assert tmp.is_file() and tmp.stat().st_size > 0  # the new one was written, not renamed
    ck = load_checkpoint(path)  # the previous checkpoint, intact
    assert ck["config"] == {"epoch": 1} and torch.equal(ck["model"]["w"], torch.zeros(3))
    # a checkpoint cut short (a copy interrupted mid-file) is refused, never read as valid
    data = tmp.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    from mdm_kernels.train.checkpoint import CheckpointError
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(path)


def _direct(out, rank, port, *extra):
    """One rank of a 2-process run launched without torchrun (own env)."""
    env = dict(_env(str(out)), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cmd = [sys.executable, "-m", "mdm_kernels.train", *RUN, "--quiet", "--out", str(out), *extra]
    return _start(cmd, str(out), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_missing_peer_in_init_is_one_line_error_within_timeout(tmp_path):
    proc = _direct(tmp_path / "run", 0, _free_port(), "--dist-timeout", "3")  # rank 1 never comes
    try:
        _, err = proc.communicate(timeout=90)
    finally:
        _kill(proc)
    assert proc.returncode == 1, err[-2000:]
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    assert lines[0].startswith("python -m mdm_kernels.train: error: rank 0, start-up, "
                               "init_process_group(gloo)"), lines


@pytest.mark.slow
def test_stopped_peer_mid_run_is_one_line_error_naming_rank_and_step(tmp_path):
    out, port = tmp_path / "run", _free_port()
    procs = [_direct(out, r, port, "--dist-timeout", "4", "--epochs", "40") for r in (0, 1)]
    try:
        deadline = time.monotonic() + 60
        while not (out / "last.pt").is_file() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert (out / "last.pt").is_file(), procs[0].communicate(timeout=5)[1][-2000:]
        os.kill(procs[1].pid, signal.SIGSTOP)  # rank 1 hangs (alive, silent)
        _, err = procs[0].communicate(timeout=60)
    finally:
        for p in procs:
            _kill(p)
    assert procs[0].returncode == 1, err[-2000:]
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    assert lines[0].startswith("python -m mdm_kernels.train: error: rank 0, epoch "), lines

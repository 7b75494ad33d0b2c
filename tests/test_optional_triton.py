"""Triton is an optional extra (``pip install mdm-kernels[triton]``; CUDA builds of torch bring
it, ``[dev]`` pulls it for the interpreter tests): without it ``import mdm_kernels``, the
estimators and a CPU training step with a penalty work, and ``backend="triton"`` raises
BackendUnavailable saying why.  Triton is made unimportable in a subprocess by a
``sys.meta_path`` finder that refuses it."""
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent("""
    import sys

    class RefuseTriton:
        def find_spec(self, name, path=None, target=None):
            if name == "triton" or name.startswith("triton."):
                raise ModuleNotFoundError(f"No module named {name!r} (refused by the test)", name=name)
            return None

    sys.meta_path.insert(0, RefuseTriton())

    import torch
    import mdm_kernels
    from mdm_kernels import BackendUnavailable, MLPCritic, mine_loss
    from mdm_kernels.train.config import TrainConfig
    from mdm_kernels.train.loop import train

    zs = [torch.randn(16, d) for d in (4, 3, 2)]
    critic = MLPCritic((4, 3, 2), hidden=(8,))
    mine_loss(critic, *zs).backward()  # backend="auto" on CPU: the reference
    res = train(TrainConfig(dataset="synthetic", model="lf_lstm", penalty="mine", epochs=1, d=4, hidden=8,
                            critic_hidden=8, batch_size=128, device="cpu", out=sys.argv[1], quiet=True))
    assert res["epochs_run"] == 1
    try:
        mine_loss(critic, *zs, backend="triton")
    except BackendUnavailable as exc:
        print("BackendUnavailable:", exc)
    else:
        raise SystemExit("backend='triton' ran without triton")
    leaked = sorted(m for m in sys.modules if m == "triton" or m.startswith("triton."))
    assert not leaked, leaked
""")


def test_cpu_path_without_triton(tmp_path):
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "run")], capture_output=True,
                          text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("BackendUnavailable:"))
    assert "triton is not installed" in line
    assert (tmp_path / "run" / "metrics.json").is_file()


def test_triton_is_an_extra_pulled_by_dev():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not any(r.startswith("triton") for r in project["dependencies"])
    extras = project["optional-dependencies"]
    assert any(r.startswith("triton") for r in extras["triton"])
    assert any(r.startswith("triton") for r in extras["dev"])  # CI installs .[dev] for the interpreter tests

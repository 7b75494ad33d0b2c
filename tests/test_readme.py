"""The README's Python examples run as written (docs that match the code)."""
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)


def test_readme_has_examples():
    assert BLOCKS, "README.md should show a runnable Python example"


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index):
    exec(compile(BLOCKS[index], f"README.md[python block {index}]", "exec"), {})


# ------------------------------------------------------------------ the test commands (issue 26)

TEXT = README.read_text(encoding="utf-8")
CI = Path(__file__).resolve().parents[1] / ".ci" / "run"


def _ci_readme_block() -> str:
    lines = CI.read_text(encoding="utf-8").splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("# --- README test command"))
    end = next(i for i, ln in enumerate(lines) if i > start and ln.startswith("# ----"))
    return "\n".join(lines[start + 1:end]).strip()


def _bash_block_with(needle: str) -> str:
    blocks = [b.strip() for b in re.findall(r"```bash\n(.*?)```", TEXT, re.S) if needle in b]
    assert len(blocks) == 1, f"expected one README bash block with {needle!r}, found {len(blocks)}"
    return blocks[0]


def test_ci_runs_the_readmes_test_command():
    full = _bash_block_with('pip install -e ".[dev]"')
    assert _ci_readme_block() == full
    assert "python -m pytest tests -q -rs" in full  # skip reasons visible under -q


def test_readme_has_a_fast_tier_and_states_both_times():
    fast = _bash_block_with('-m "not slow"')
    assert fast.startswith("python -m pytest tests") and "-rs" in fast
    section = TEXT[TEXT.index(fast) - 1500:TEXT.index(fast) + 1500]
    assert re.search(r"\d+ min", section) and "fast" in section.lower() and "full" in section.lower()


@pytest.mark.slow
def test_fast_tier_selects_fewer_tests_than_the_full_run():
    import shlex
    import subprocess
    import sys
    fast = shlex.split(_bash_block_with('-m "not slow"'))
    assert fast[:3] == ["python", "-m", "pytest"]
    root = README.parent

    def collected(args):
        proc = subprocess.run([sys.executable, "-m", "pytest", *args, "--collect-only", "-q", "-p", "no:cacheprovider"],
                              capture_output=True, text=True, cwd=root, timeout=600)
        assert proc.returncode == 0, proc.stdout[-2000:]
        return {ln for ln in proc.stdout.splitlines() if "::" in ln}

    tier = collected([a for a in fast[3:] if a not in ("-q", "-rs")])  # one -q: node ids listed
    full = collected(["tests"])
    assert tier and tier < full  # a strict subset, never empty
    assert any(t.startswith("tests/test_new_user.py::") for t in tier)  # the CLI checks stay in it


def test_readme_says_how_to_install_without_cuda_and_what_shared_is():
    assert "https://download.pytorch.org/whl/cpu" in TEXT and "5.5 GB" in TEXT
    assert "MDM_BUILD_CUDA=0" in TEXT and "build/mdm_cuda/" in TEXT
    assert "`../shared`" in TEXT and "python -m mdm_kernels.analyze" in TEXT


def test_ci_fails_when_the_readme_command_fails(tmp_path):
    """``set -e`` ignores a failure inside an ``&&`` list unless it is the last command: the
    status check after the README block must stop CI when, e.g., the test run fails."""
    import subprocess
    lines = CI.read_text(encoding="utf-8").splitlines()
    end = next(i for i, ln in enumerate(lines) if ln.startswith("# ----"))
    stop = next(i for i, ln in enumerate(lines) if i > end and not ln.startswith("#") and "status" not in ln)
    check = "\n".join(lines[end:stop])
    for block, rc in (("true && false && true", 1), ("true && true", 0)):
        script = tmp_path / "ci"
        script.write_text(f"set -euo pipefail\n{block}\n{check}\necho reached\n")
        proc = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=60)
        assert proc.returncode == rc and ("reached" in proc.stdout) == (rc == 0), proc.stderr
        if rc:
            assert "the README's test command failed" in proc.stderr

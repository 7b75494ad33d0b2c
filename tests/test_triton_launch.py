"""Launch-side pieces of the fused Triton kernels, checked without a GPU: the stable tanh
(against float64), the autotune size buckets, the outer-sum backward's grid, the
one-program/multi-program cost model, device checks and guards.

The kernels themselves are tested against the reference in ``tests/test_triton_bounds.py``.
"""
from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from mdm_kernels.ops import triton_helpers  # noqa: E402
from mdm_kernels.ops.triton_helpers import check_same_device, size_bucket  # noqa: E402


# --- tanh: the stable form ----------------------------------------------------------------
@triton.jit
def _tanh_kernel(x_ptr, y_ptr, d_ptr, d2_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask)
    tl.store(y_ptr + offs, triton_helpers.activation(x, 2), mask=mask)
    tl.store(d_ptr + offs, triton_helpers.activation_grad(x, 2), mask=mask)
    tl.store(d2_ptr + offs, triton_helpers.activation_grad2(x, 2), mask=mask)


def _max_relative_error(got, want):
    return ((got.double() - want).abs() / want.abs()).max().item()


@pytest.mark.skipif(not torch.cuda.is_available() and not triton_helpers.interpreter_enabled(),
                    reason="needs a GPU or TRITON_INTERPRET=1")
def test_tanh_relative_error_over_the_range():
    """tanh, tanh' and tanh'' of the kernels against float64 torch over |x| from 1e-30 to 20
    (both signs; the former 1 − 2/(e^{2x} + 1) was 1.7e-4 off at x = 1e-4 and 100 % off
    below 3e-8).  Bounds: 5e-7 relative in the interpreter's exact float32 (measured
    ≤ 2.7e-7), 2e-6 compiled on a GPU (ex2.approx and div.full; docs/triton_backend.md)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    magnitude = torch.logspace(-30, 1.3, 2001, dtype=torch.float64)
    x = torch.cat([-magnitude.flip(0), magnitude]).float().to(device)
    y, d, d2 = (torch.empty_like(x) for _ in range(3))
    _tanh_kernel[(triton.cdiv(x.numel(), 1024),)](x, y, d, d2, x.numel(), BLOCK=1024)
    x64 = x.double().cpu()
    tanh = torch.tanh(x64)
    sech2 = torch.cosh(x64).pow(-2)
    bound = 2e-6 if device == "cuda" else 5e-7
    assert _max_relative_error(y.cpu(), tanh) <= bound
    assert _max_relative_error(d.cpu(), sech2) <= bound
    assert _max_relative_error(d2.cpu(), -2 * tanh * sech2) <= 2 * bound
    assert torch.equal(y.cpu(), -y.cpu().flip(0))  # odd, exactly


# --- autotune keys -----------------------------------------------------------------------
def test_size_bucket_is_the_next_power_of_two():
    assert [size_bucket(n) for n in (0, 1, 2, 3, 4, 5, 255, 256, 257)] == \
        [1, 1, 2, 4, 4, 8, 256, 256, 512]
    # a short last batch and a gathered DDP batch share the full batch's bucket
    assert size_bucket(200) == size_bucket(256) and size_bucket(129 * 129) == size_bucket(
        16384 + 1)
    with pytest.raises(ValueError, match="n must be >= 0"):
        size_bucket(-1)


# --- devices -------------------------------------------------------------------------------
def test_check_same_device_names_the_argument():
    a = torch.zeros(2)
    assert check_same_device({"zs[0]": a, "perms": None, "zs[1]": a}) == a.device
    with pytest.raises(ValueError, match=r"zs\[1\] is on meta but zs\[0\] is on cpu"):
        check_same_device({"zs[0]": a, "zs[1]": torch.zeros(2, device="meta")})


def test_launch_device_is_a_no_op_on_cpu():
    with triton_helpers.launch_device(torch.zeros(1)):
        pass

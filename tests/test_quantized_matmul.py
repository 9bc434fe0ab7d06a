"""The Triton weight-only quantized matmul (kernels/dequant_matmul.py) against its torch
reference, on CPU in Triton's interpreter: int8 per channel and int4 group-wise, symmetric and
asymmetric, fp32/bf16/fp16 activations, decode (1 row) and prefill-sized row counts, the K loop
split over programs or not. Tolerance: kernel_rules (the kernel's error against the exact math
at most twice that of torch computing in the same low precision; fp32 <= 1e-5 relative here,
the reference's own float rounding)."""

import os

if not os.environ.get("TRITON_INTERPRET"):
    try:
        import torch as _torch

        if not _torch.cuda.is_available():
            os.environ["TRITON_INTERPRET"] = "1"
    except ImportError:  # pragma: no cover
        pass

import pytest
import torch
from kernel_rules import assert_rule, needs_triton

import kernels
from kernels import dequant_matmul as qm

pytestmark = needs_triton


def quantized(bits: int, symmetric: bool, n: int, k: int, group: int, seed: int = 0):
    """Random integers and plausible scales/zeros in the format's dtypes."""
    g = torch.Generator().manual_seed(seed)
    groups = k // group
    if bits == 8:
        qweight = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
        scales = torch.rand(n, 1, generator=g) * 0.02 + 0.001
        zeros = None if symmetric else torch.randn(n, 1, generator=g) * 0.01
    else:
        qweight = torch.randint(0, 256, (n, k // 2), generator=g, dtype=torch.uint8)
        scales = (torch.rand(n, groups, generator=g) * 0.05 + 0.005).bfloat16()
        zeros = None if symmetric else (torch.randn(n, groups, generator=g) * 0.05).bfloat16()
    return qweight, scales, zeros


CASES = [(8, True, 256), (8, False, 256), (4, True, 32), (4, False, 64), (4, False, 128)]


@pytest.mark.parametrize("bits,symmetric,group", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows,splits", [(1, 1), (1, 3), (5, None), (20, 2)])
def test_kernel_matches_reference(bits, symmetric, group, dtype, rows, splits):
    n, k = 40, 256  # 40: a partial tile of output columns
    qweight, scales, zeros = quantized(bits, symmetric, n, k, group)
    g = group if bits == 4 else k
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(1)).to(dtype)
    bias = torch.randn(n, generator=torch.Generator().manual_seed(2)).to(dtype)
    out = qm._quantized_matmul_launch(x, qweight, scales, zeros, bits, g, bias, splits=splits)
    weight = qm.dequantize_reference(qweight, scales, zeros, bits, g)
    exact = (x.double() @ weight.double().t() + bias.double())
    torch_lo = torch.nn.functional.linear(x, weight.to(dtype), bias)  # torch in the same low precision
    if dtype == torch.float32:
        assert out.dtype == dtype and out.shape == exact.shape
        assert (out.double() - exact).abs().max() <= 1e-5 * exact.abs().max()
    else:
        assert_rule(out, exact, torch_lo, dtype)


def test_leading_dimensions_and_strides():
    qweight, scales, zeros = quantized(4, False, 32, 128, 32)
    x = torch.randn(2, 3, 256)[..., ::2]  # a non-contiguous last dimension
    out = qm._quantized_matmul_launch(x, qweight, scales, zeros, 4, 32)
    expected = qm.quantized_matmul_reference(x, qweight, scales, zeros, 4, 32)
    assert out.shape == (2, 3, 32)
    assert (out - expected).abs().max() <= 1e-5 * expected.abs().max()


def test_dispatch(monkeypatch):
    """IDEFICS2_MINI_KERNELS=triton sends CPU tensors through the kernel (interpreter); torch and
    a gradient take the reference."""
    qweight, scales, zeros = quantized(4, False, 32, 128, 64)
    x = torch.randn(1, 128)
    calls = []
    launch = qm._quantized_matmul_launch
    monkeypatch.setattr(qm, "_quantized_matmul_launch", lambda *a, **k: calls.append(1) or launch(*a, **k))
    expected = qm.quantized_matmul_reference(x, qweight, scales, zeros, 4, 64)
    monkeypatch.setenv(kernels.KERNELS_ENV, "triton")
    out = kernels.quantized_matmul(x, qweight, scales, zeros, 4, 64)
    assert len(calls) == 1 and (out - expected).abs().max() <= 1e-5 * expected.abs().max()
    kernels.quantized_matmul(x.requires_grad_(), qweight, scales, zeros, 4, 64)
    monkeypatch.setenv(kernels.KERNELS_ENV, "torch")
    kernels.quantized_matmul(x.detach(), qweight, scales, zeros, 4, 64)
    assert len(calls) == 1


def test_unpack_layout():
    """Byte j of a group holds column j (low nibble) and column j + G/2 (high nibble), each + 8."""
    packed = torch.zeros(1, 16, dtype=torch.uint8)  # one row, one group of 32
    packed[0, 0] = 0x0F | (0x00 << 4)  # column 0 -> 7, column 16 -> -8
    packed[0, 5] = 0x08 | (0x09 << 4)  # column 5 -> 0, column 21 -> 1
    q = qm.unpack_int4(packed, 32)
    assert q.dtype == torch.int8 and q.shape == (1, 32)
    assert (q[0, 0], q[0, 16], q[0, 5], q[0, 21]) == (7, -8, 0, 1)
    assert (q[0, [1, 2, 17]] == -8).all()


def test_format_errors():
    qweight, scales, zeros = quantized(4, False, 8, 128, 32)
    qm.check_format(qweight, scales, zeros, 4, 32, in_features=128)
    with pytest.raises(ValueError, match="bits must be 8 or 4"):
        qm.check_format(qweight, scales, zeros, 3, 32)
    with pytest.raises(ValueError, match="does not divide"):
        qm.check_format(qweight, scales, zeros, 4, 48)
    with pytest.raises(ValueError, match="scales must be"):
        qm.check_format(qweight, scales[:, :2], None, 4, 32)
    with pytest.raises(ValueError, match="zeros must"):
        qm.check_format(qweight, scales, zeros[:, :2], 4, 32)

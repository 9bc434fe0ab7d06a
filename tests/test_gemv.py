"""backends/gemv.c: bf16 weights times a few rows, against the exact sum rounded once to bf16."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from idefics2_mini.backends import cpu, gemv

pytestmark = pytest.mark.skipif(gemv.LIBRARY.get() is None, reason=f"gemv.c not built: {gemv.LIBRARY.error}")


def _ulps_from_exact(out: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """How many bf16 steps `out` is from the fp64 product rounded to bf16."""
    exact = (x.double() @ w.double().T).to(torch.bfloat16)
    step = torch.finfo(torch.bfloat16).eps * exact.float().abs().clamp_min(1e-30)
    return ((out.float() - exact.float()).abs() / step).round()


@pytest.fixture(params=["default", "fma"])
def loop(request, monkeypatch):
    """Both inner loops: the default (vdpbf16ps where the CPU has it) and the portable one."""
    if request.param == "fma":
        monkeypatch.setenv("IDEFICS2_MINI_GEMV_FMA", "1")
    return request.param


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize("n, k", [(4, 16), (37, 100), (70, 4096), (9, 1000)])  # tails in N (tiles of 4) and K (16, 32)
def test_bf16_linear_is_the_exact_sum_rounded_once(rows, n, k, loop):
    torch.manual_seed(rows * 1000 + n + k)
    x = torch.randn(rows, k).bfloat16()
    w = torch.randn(n, k).bfloat16()
    out = gemv.bf16_linear(x, w)
    assert out.dtype == torch.bfloat16 and out.shape == (rows, n)
    ulps = _ulps_from_exact(out, x, w)
    # fp32 accumulation in another order than fp64: at most one bf16 step off, and mostly none
    assert ulps.max() <= 1 and (ulps == 0).float().mean() > 0.9
    # and as close to the exact result as torch's own bf16 matmul
    assert (out.float() - (x.double() @ w.double().T)).abs().max() <= 1.01 * (
        F.linear(x, w).float() - (x.double() @ w.double().T)).abs().max() + 1e-6


def test_bf16_linear_keeps_the_leading_shape():
    x = torch.randn(2, 1, 64).bfloat16()
    w = torch.randn(48, 64).bfloat16()
    assert torch.equal(gemv.bf16_linear(x, w).view(2, 48), gemv.bf16_linear(x.view(2, 64), w))
    # a non-contiguous slice of the last token, as generation sends it to the lm_head
    seq = torch.randn(3, 5, 64).bfloat16()
    assert torch.equal(gemv.bf16_linear(seq[:, -1:], w).view(3, 48), gemv.bf16_linear(seq[:, -1].contiguous(), w))


def test_what_the_cpu_linear_sends_to_gemv(monkeypatch):
    calls = []
    real = gemv.bf16_linear
    monkeypatch.setattr(gemv, "bf16_linear", lambda x, w: calls.append(x.shape) or real(x, w))
    w = torch.randn(64, 32).bfloat16()
    cpu.linear(torch.randn(1, 32).bfloat16(), w)
    cpu.linear(torch.randn(gemv.MAX_ROWS, 32).bfloat16(), w)
    assert len(calls) == 2
    cpu.linear(torch.randn(gemv.MAX_ROWS + 1, 32).bfloat16(), w)  # prefill: oneDNN
    cpu.linear(torch.randn(1, 32).bfloat16(), w, torch.randn(64).bfloat16())  # a bias: F.linear rounds once
    cpu.linear(torch.randn(1, 32).half(), w.half())  # fp16
    cpu.linear(torch.randn(1, 32), w.float())  # fp32
    x = torch.randn(1, 32).bfloat16().requires_grad_()
    cpu.linear(x, w).float().sum().backward()  # training: autograd's F.linear
    assert len(calls) == 2 and x.grad is not None


def test_switched_off_by_the_environment(monkeypatch):
    monkeypatch.setenv("IDEFICS2_MINI_GEMV", "reference")
    assert not gemv.takes(torch.randn(1, 32).bfloat16(), torch.randn(8, 32).bfloat16())


def test_compiled_call_is_one_opaque_op():
    w = torch.randn(40, 64).bfloat16()
    x = torch.randn(1, 64).bfloat16()
    compiled = torch.compile(lambda x: cpu.linear(x, w) * 2, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(x), gemv.bf16_linear(x, w) * 2)

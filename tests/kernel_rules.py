"""The kernels issue's tolerance rule, shared by every kernel test.

A kernel's error against an fp32 (or fp64) reference may be at most twice the error of the
torch reference run in the same low precision (plus 1e-6 for rounding noise); with fp32 inputs
it must be <= 1e-5.
"""

from __future__ import annotations

import pytest
import torch

from kernels import _triton

LOW_PRECISION = (torch.bfloat16, torch.float16)

# Interpreter tests: Triton must import and run either compiled (CUDA) or interpreted (CPU).
needs_triton = pytest.mark.skipif(
    not _triton.available() or not (torch.cuda.is_available() or _triton.interpreter_active()),
    reason="triton is not importable, or the interpreter could not be enabled",
)


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def assert_rule(out, ref_hi, ref_lo, dtype, fp32_tol: float = 1e-5) -> None:
    """out: the kernel's result; ref_hi: the reference in high precision; ref_lo: the reference
    run in `dtype`."""
    assert out.dtype == dtype and out.shape == ref_hi.shape
    assert torch.isfinite(out).all()
    err = max_err(out, ref_hi)
    if dtype in LOW_PRECISION:
        base = max_err(ref_lo, ref_hi)
        assert err <= 2 * base + 1e-6, f"kernel error {err:.3g} > 2 x torch {dtype} error {base:.3g}"
    else:
        assert err <= fp32_tol, f"fp32 kernel error {err:.3g}"

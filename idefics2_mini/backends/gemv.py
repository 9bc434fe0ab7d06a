"""bf16 linears of a few rows (decode) on the CPU through gemv.c, which streams the weight at
the memory's bandwidth where oneDNN's bf16 inner product does not (see gemv.c).

    takes(x, weight, bias)    whether `bf16_linear` runs for these tensors
    bf16_linear(x, weight)    x [..., K] bf16 (at most MAX_ROWS rows) @ weight[N, K].T -> [..., N] bf16

The sum is in fp32 and rounded to bf16 once, as torch's bf16 matmul does; only the order of the
additions differs. On CPUs with AVX-512 BF16 the products are vdpbf16ps's (`dpbf16()` says
whether this build has it; IDEFICS2_MINI_GEMV_FMA=1 takes the portable widen-and-FMA loop
instead, for comparisons). IDEFICS2_MINI_GEMV=reference switches gemv.c off (the oneDNN path).
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import torch

from .native import NativeLibrary

MAX_ROWS = 8  # rows of x per call: each weight row is read once for all of them


def _declare(lib: ctypes.CDLL) -> None:
    pointer, int64 = ctypes.c_void_p, ctypes.c_int64
    lib.gemv_bf16.argtypes = [pointer, int64, int64, pointer, int64, pointer, ctypes.c_int]
    lib.gemv_bf16.restype = lib.gemv_dpbf16.restype = ctypes.c_int


LIBRARY = NativeLibrary(Path(__file__).with_name("gemv.c"), _declare, switch_env="IDEFICS2_MINI_GEMV")


_built: bool | None = None  # settled by the first eager `built()`; what a compiled step reads


def built() -> bool:
    """Whether gemv.c is built and on. Inside torch.compile the answer of the last eager call
    (compile_decode makes one before tracing): the ctypes library is nothing a graph can hold."""
    global _built  # noqa: PLW0603
    if torch.compiler.is_compiling():
        return bool(_built)
    _built = LIBRARY.get() is not None
    return _built


def dpbf16() -> bool:
    """Whether this build multiplies with vdpbf16ps (AVX-512 BF16) by default."""
    lib = LIBRARY.get()
    return bool(lib is not None and lib.gemv_dpbf16() and not os.environ.get("IDEFICS2_MINI_GEMV_FMA"))


def takes(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> bool:
    """bf16 x of 1..MAX_ROWS rows, a contiguous bf16 [N, K] weight and no bias, on the CPU, the
    library built. (A bias would be added after the bf16 rounding, one rounding more than
    F.linear; the decoder and lm_head, the only decode-sized linears, have none.)"""
    rows = x.numel() // x.shape[-1] if x.dim() and x.shape[-1] else 0
    return (0 < rows <= MAX_ROWS and bias is None and x.dtype == torch.bfloat16 and weight.dtype == torch.bfloat16
            and x.device.type == "cpu" and weight.device.type == "cpu" and weight.dim() == 2
            and weight.is_contiguous() and built())


def _run(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    k, n = weight.shape[1], weight.shape[0]
    flat = x.reshape(-1, k).contiguous()
    out = torch.empty(flat.shape[0], n, dtype=torch.bfloat16)
    status = LIBRARY.get().gemv_bf16(flat.data_ptr(), flat.shape[0], k, weight.data_ptr(), n, out.data_ptr(),
                                     torch.get_num_threads())
    if status:
        raise RuntimeError(f"gemv.c refused its arguments (status {status}): rows {flat.shape[0]}, K {k}, N {n}")
    return out.view(*x.shape[:-1], n)


@torch.library.custom_op("idefics2_mini::gemv_bf16", mutates_args=())
def _gemv_op(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`_run` as an op torch.compile keeps whole (it cannot trace a ctypes call)."""
    return _run(x, weight)


@_gemv_op.register_fake
def _(x, weight):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def bf16_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [..., K] @ weight[N, K].T for `takes(x, weight)` inputs -> [..., N] bf16."""
    return _gemv_op(x, weight) if torch.compiler.is_compiling() else _run(x, weight)

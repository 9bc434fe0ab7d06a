"""The CPU fast path of a quantized linear: qmatmul.c, built once with the system C compiler.

Why not torch's own packed ops: at decode sizes on this project's CPUs they are compute-bound
rather than bandwidth-bound (`_weight_int4pack_mm_for_cpu` reads its int4 weights at ~4-5 GB/s
where the memory gives ~20, `_weight_int8pack_mm` at ~12 GB/s, and both take ~10x longer
still with fp32 activations); benchmarks/quantize.py times them beside this kernel. The kernel
streams the stored bytes as they are (the format of kernels/dequant_matmul.py) for up to
MAX_ROWS rows of x, each weight row read once for all of them, by one of four paths
(qmatmul.c explains each; `kernel_path` below picks one per call):

    "vnni"      CPUs with AVX-512 VNNI (Intel Ice Lake / Sapphire Rapids and later, AMD Zen 4):
                the weights stay integers, x is rounded to 16-bit integers per block of columns
                (per group for int4; error 2^-16 of the block's largest |x|), and vpdpwssd /
                vpdpbusd multiply 32 / 64 pairs per instruction. The default where it exists:
                on 2 AMD EPYC (Zen 4) cores, one row of x, it streams int8 at 33-43 GB/s and
                int4 (g64) at 26-30 where the paths below reached 15-29 and 11-15 (rows of
                14336 columns: int8 ~24, int4 ~30; the memory: 27-47 GB/s by torch.sum).
    "avx2"      CPUs with AVX2 but no AVX-512 (AMD Zen 2/3, Intel client cores, most laptops):
                "vnni"'s math (the same 16-bit grid of x) with vpmaddwd on 256-bit vectors.
                On 2 AMD EPYC (Zen 3) cores, one row of x, weights from memory: int8 12-18
                GB/s, int4 (g64) 11-15, where "portable" gave 1.4-2.9 and 0.5-1.1 (GCC cannot
                vectorise the 16-entry table lookup without AVX-512); the memory: 13-19 GB/s
                by torch.sum.
    "bf16"      int4 on AVX-512 BF16: nibbles as bf16 numbers against x split into two bf16
                halves; measured faster than the table only for one row of bf16 x (Xeon).
    "portable"  GCC/Clang vector extensions, any CPU: int8 widened to fp32, int4 through a
                16-entry table per group; exact fp32 math.

More rows (prefill) dequantize a block of weight rows at a time and run the float matmul
(`dequantized_linear`), which is compute-bound there anyway.

IDEFICS2_MINI_QMM_PATH=vnni|avx2|bf16|portable forces a path where it applies (benchmarks, tests).

Building: once per machine by the system C compiler (`backends/native.py`, which also builds
the bf16 kernel, backends/gemv.c). Without a working C compiler (or with
IDEFICS2_MINI_QUANT_CPU=reference) every call takes the dequantize-and-matmul path instead: same results, slower decode. The OpenMP runtime is the one
torch already loaded (same soname), so the kernel shares torch's threads.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import torch

from ..backends import cpu as cpu_backend
from ..backends.native import NativeLibrary
from kernels.dequant_matmul import dequantize_reference

SOURCE = Path(__file__).with_name("qmatmul.c")
MAX_ROWS = 8  # rows of x the C kernel takes in one call (each weight row read once for all)
# The "vnni" path's rounding of x (qmatmul.c: X16_MAX, XBLOCK8): x16 = round(x * X16_MAX / max|x|)
# per block of VNNI_INT8_BLOCK columns (int8) or per group (int4). Tests emulate it with these.
X16_MAX = 32639
VNNI_INT8_BLOCK = 128
CPU_ENV = "IDEFICS2_MINI_QUANT_CPU"  # "auto" (default) or "reference"
# Rows of the weight dequantized at once on the dequantize-and-matmul path: 4 MiB of fp32 at
# K = 4096, so the temporary never costs memory worth mentioning.
DEQUANT_BLOCK_ELEMENTS = 2**20


def _declare(lib: ctypes.CDLL) -> None:
    pointer, int64, integer = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.qmm_int8.argtypes = [pointer, int64, int64, pointer, int64, pointer, pointer, pointer, integer, integer]
    lib.qmm_int4.argtypes = [pointer, int64, int64, int64, pointer, int64, pointer, pointer, pointer, integer,
                             integer]
    lib.qmm_takes.argtypes = [integer, integer, int64, int64]
    lib.qmm_int8.restype = lib.qmm_int4.restype = lib.qmm_takes.restype = lib.qmm_paths.restype = integer


LIBRARY = NativeLibrary(SOURCE, _declare, switch_env=CPU_ENV)  # built by backends/native.py


def library() -> ctypes.CDLL | None:
    """The compiled kernel (built on first use), or None when it cannot be built or is switched
    off; `build_error()` then says why."""
    return LIBRARY.get()


PATHS = {"portable": 0, "vnni": 1, "bf16": 2, "avx2": 3}  # qmatmul.c's PATH_* numbers
# The paths that multiply x on the 16-bit grid (x~, X16_MAX above) rather than x itself.
INTEGER_PATHS = ("vnni", "avx2")
PATH_ENV = "IDEFICS2_MINI_QMM_PATH"


def paths() -> list[str]:
    """The kernel paths this build has, the preferred first ("vnni", "avx2", "bf16", "portable";
    none without a build)."""
    lib = library()
    if lib is None:
        return []
    built = lib.qmm_paths()
    return [name for name, bit in (("vnni", 1), ("avx2", 4), ("bf16", 2)) if built & bit] + ["portable"]


def kernel_path(bits: int, rows: int, k: int, group_size: int, dtype: torch.dtype) -> str:
    """The path qmatmul.c takes for one call ("unavailable" without a build; this is where the
    per-machine choice lives):
    IDEFICS2_MINI_QMM_PATH if set and it takes the shapes; else "vnni" where built (measured
    fastest on AMD EPYC Zen 4 for int8 and int4, every row count up to MAX_ROWS); else "avx2"
    where built (CPUs without AVX-512; measured on AMD EPYC Zen 3); else, for int4, "bf16" for
    one row of bf16 x with groups >= 64 (the one case measured faster than the table on the
    Xeon, before the "vnni" path existed; "vnni" has not been timed there); else "portable"."""
    lib = library()
    if lib is None:
        return "unavailable"
    return _path(lib, bits, rows, k, group_size, dtype)


def _path(lib: ctypes.CDLL, bits: int, rows: int, k: int, group_size: int, dtype: torch.dtype) -> str:
    forced = os.environ.get(PATH_ENV, "auto")
    key = (bits, rows, k, group_size, dtype, forced, lib)
    path = _chosen.get(key)
    if path is None:  # decided once per kind of call: a decode step makes ~15 of them
        path = _choose(lib, bits, rows, k, group_size, dtype, forced.strip().lower())
        _chosen[key] = path
    return path


_chosen: dict[tuple, str] = {}


def _choose(lib, bits: int, rows: int, k: int, group_size: int, dtype: torch.dtype, forced: str) -> str:
    if forced in PATHS and lib.qmm_takes(bits, PATHS[forced], k, group_size):
        return forced
    if lib.qmm_takes(bits, PATHS["vnni"], k, group_size):
        return "vnni"
    if lib.qmm_takes(bits, PATHS["avx2"], k, group_size):
        return "avx2"
    if (bits == 4 and rows == 1 and dtype == torch.bfloat16 and group_size >= 64
            and lib.qmm_takes(4, PATHS["bf16"], k, group_size)):
        return "bf16"
    return "portable"


def int4_path(rows: int = 1, k: int = 4096, group_size: int = 64, dtype: torch.dtype = torch.float32) -> str:
    """`kernel_path` for an int4 call of this kind ("unavailable" without a build)."""
    return kernel_path(4, rows, k, group_size, dtype)


def build_error() -> str | None:
    library()
    return LIBRARY.error


def available() -> bool:
    return library() is not None


def _pointer(tensor: torch.Tensor | None) -> int | None:
    return None if tensor is None else tensor.data_ptr()


def kernel_takes(x: torch.Tensor, bits: int, group_size: int) -> bool:
    """Whether `kernel_matmul` runs for this input (few rows, CPU, no gradient, built)."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    return (x.device.type == "cpu" and 0 < rows <= MAX_ROWS and x.dtype in (torch.float32, torch.bfloat16, torch.float16)
            and not (torch.is_grad_enabled() and x.requires_grad) and (bits == 8 or group_size % 32 == 0)
            and available())


def kernel_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                  bits: int, group_size: int, path: str | None = None) -> torch.Tensor:
    """x [..., K] (at most MAX_ROWS rows) -> [..., N] in x's dtype, through qmatmul.c (`path`:
    None for `kernel_path`'s choice). The quantized tensors must be contiguous, with
    scales/zeros fp32 (int8) or bf16 (int4)."""
    lib = library()
    k, n = x.shape[-1], qweight.shape[0]
    rows = x.numel() // k
    # A decode step makes ~15 of these calls, each a few hundred microseconds of weight
    # streaming: fp32 x goes in as it is and the output is made in its final shape, so the
    # Python around the call stays at ~10 us (it was ~25 with a reshape, a copy and a view).
    x32 = x if x.dtype == torch.float32 and x.is_contiguous() else x.to(torch.float32).contiguous()
    path = path or _path(lib, bits, rows, k, group_size, x.dtype)
    out = torch.empty(*x.shape[:-1], n, dtype=torch.float32)
    threads = torch.get_num_threads()
    if bits == 8:
        status = lib.qmm_int8(x32.data_ptr(), rows, k, qweight.data_ptr(), n, scales.data_ptr(),
                              _pointer(zeros), out.data_ptr(), threads, PATHS[path])
    else:
        status = lib.qmm_int4(x32.data_ptr(), rows, k, group_size, qweight.data_ptr(), n, scales.data_ptr(),
                              _pointer(zeros), out.data_ptr(), threads, PATHS[path])
    if status:
        raise RuntimeError(f"qmatmul.c refused its arguments (status {status}): int{bits}, path {path}, rows {rows}, "
                           f"K {k}, group {group_size}")
    return out if x.dtype == torch.float32 else out.to(x.dtype)


@torch.library.custom_op("idefics2_mini::quantized_matmul_cpu", mutates_args=())
def kernel_matmul_op(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                     bits: int, group_size: int) -> torch.Tensor:
    """`kernel_matmul` as an op torch.compile keeps whole (it cannot trace a ctypes call)."""
    return kernel_matmul(x, qweight, scales, zeros, bits, group_size)


@kernel_matmul_op.register_fake
def _(x, qweight, scales, zeros, bits, group_size):
    return x.new_empty(*x.shape[:-1], qweight.shape[0])


def dequantized_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                       bits: int, group_size: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] -> [..., N] in x's dtype: blocks of weight rows dequantized to x's dtype (at
    most DEQUANT_BLOCK_ELEMENTS at a time), each multiplied by the CPU backends' linear (or
    F.linear elsewhere). For many rows (prefill), where the float matmul is compute-bound."""
    n = qweight.shape[0]
    k = x.shape[-1]
    block = max(1, DEQUANT_BLOCK_ELEMENTS // k)
    matmul = cpu_backend.linear if x.device.type == "cpu" else torch.nn.functional.linear
    if n <= block:
        weight = dequantize_reference(qweight, scales, zeros, bits, group_size).to(x.dtype)
        return matmul(x, weight, bias)
    pieces = []
    for start in range(0, n, block):
        rows = slice(start, start + block)
        weight = dequantize_reference(qweight[rows], scales[rows], None if zeros is None else zeros[rows],
                                      bits, group_size).to(x.dtype)
        pieces.append(matmul(x, weight, None if bias is None else bias[rows]))
    return torch.cat(pieces, dim=-1)

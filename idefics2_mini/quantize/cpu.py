"""The CPU fast path of a quantized linear: qmatmul.c, built once with the system C compiler.

Why not torch's own packed ops: at decode sizes on this project's CPUs they are compute-bound
rather than bandwidth-bound (`_weight_int4pack_mm_for_cpu` reads its int4 weights at ~4-5 GB/s
where the memory gives ~20, `_weight_int8pack_mm` at ~12 GB/s, and both take ~10x longer
still with fp32 activations); benchmarks/quantize.py times them beside this kernel. The kernel
streams the stored bytes as they are (the format of kernels/dequant_matmul.py) for up to
MAX_ROWS rows of x (int8 widened to fp32 in registers; int4 dequantized by a table lookup, or,
for one row of bf16 activations on CPUs with AVX-512 BF16, turned into bf16 numbers with two bit
operations and multiplied by vdpbf16ps: the one case where that measured faster; `int4_path()`
says whether this build has it); more rows (prefill) dequantize a block of weight rows at a time and run
the float matmul (`dequantized_linear`), which is compute-bound there anyway.

Building: `cc -O3 -march=native -fopenmp -shared -fPIC` into the user cache
($IDEFICS2_MINI_CACHE, else $XDG_CACHE_HOME/idefics2_mini, else ~/.cache/idefics2_mini), named by
a hash of the source, the flags and the CPU model, so it happens once per machine (< 1 s).
Without a working C compiler (or with IDEFICS2_MINI_QUANT_CPU=reference) every call takes the
dequantize-and-matmul path instead: same results, slower decode. The OpenMP runtime is the one
torch already loaded (same soname), so the kernel shares torch's threads.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from ..backends import cpu as cpu_backend
from kernels.dequant_matmul import dequantize_reference

SOURCE = Path(__file__).with_name("qmatmul.c")
MAX_ROWS = 8  # rows of x the C kernel takes in one call (each weight row read once for all)
CPU_ENV = "IDEFICS2_MINI_QUANT_CPU"  # "auto" (default) or "reference"
FLAG_SETS = (
    ["-O3", "-march=native", "-fopenmp"],
    ["-O3", "-fopenmp"],
    ["-O3", "-march=native"],  # e.g. Apple clang: no OpenMP -> one thread
    ["-O3"],
)
# Rows of the weight dequantized at once on the dequantize-and-matmul path: 4 MiB of fp32 at
# K = 4096, so the temporary never costs memory worth mentioning.
DEQUANT_BLOCK_ELEMENTS = 2**20

_library: ctypes.CDLL | None = None
_build_error: str | None = None


def cache_dir() -> Path:
    if os.environ.get("IDEFICS2_MINI_CACHE"):
        return Path(os.environ["IDEFICS2_MINI_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "idefics2_mini"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("model name", "flags")):
                    return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _compile(compiler: str, flags: list[str], target: Path) -> str | None:
    """Compile SOURCE into `target` (atomically); None on success, else the compiler's message."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as work:
        partial = Path(work) / target.name
        command = [compiler, *flags, "-shared", "-fPIC", "-o", str(partial), str(SOURCE)]
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.TimeoutExpired) as err:
            return f"{' '.join(command)}: {err}"
        if result.returncode != 0:
            return f"{' '.join(command)}: {result.stderr.strip()[-500:]}"
        os.replace(partial, target)
    return None


def library() -> ctypes.CDLL | None:
    """The compiled kernel (built on first use), or None when it cannot be built or is switched
    off; `build_error()` then says why."""
    global _library, _build_error  # noqa: PLW0603
    if os.environ.get(CPU_ENV, "auto").strip().lower() == "reference":
        return None
    if _library is not None or _build_error is not None:
        return _library
    compiler = next((c for c in (os.environ.get("CC"), "cc", "gcc", "clang") if c and shutil.which(c)), None)
    if compiler is None:
        _build_error = "no C compiler found (set CC, or install gcc or clang)"
        return None
    errors = []
    source = SOURCE.read_bytes()
    for flags in FLAG_SETS:
        key = hashlib.sha256(source + " ".join([compiler, *flags, _cpu_model()]).encode()).hexdigest()[:16]
        target = cache_dir() / f"qmatmul-{key}.so"
        if not target.is_file():
            error = _compile(compiler, flags, target)
            if error is not None:
                errors.append(error)
                continue
        try:
            lib = ctypes.CDLL(str(target))
        except OSError as err:
            errors.append(f"{target}: {err}")
            continue
        pointer, int64 = ctypes.c_void_p, ctypes.c_int64
        lib.qmm_int8.argtypes = [pointer, int64, int64, pointer, int64, pointer, pointer, pointer, ctypes.c_int]
        lib.qmm_int4.argtypes = [pointer, int64, int64, int64, pointer, int64, pointer, pointer, pointer,
                                 ctypes.c_int]
        lib.qmm_int8.restype = lib.qmm_int4.restype = lib.qmm_int4_path.restype = ctypes.c_int
        _library = lib
        return lib
    _build_error = "; ".join(errors)
    return None


def int4_path() -> str:
    """Which int4 kernels qmatmul.c has here: "avx512-bf16" (one row of bf16 x; the table
    otherwise), "table" or "unavailable"."""
    lib = library()
    if lib is None:
        return "unavailable"
    return "avx512-bf16" if lib.qmm_int4_path() and not os.environ.get("IDEFICS2_MINI_QMM_INT4_TABLE") else "table"


def build_error() -> str | None:
    library()
    return _build_error


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
                  bits: int, group_size: int) -> torch.Tensor:
    """x [..., K] (at most MAX_ROWS rows) -> [..., N] in x's dtype, through qmatmul.c. The
    quantized tensors must be contiguous, with scales/zeros fp32 (int8) or bf16 (int4)."""
    lib = library()
    k = x.shape[-1]
    x32 = x.reshape(-1, k).to(torch.float32).contiguous()
    rows, n = x32.shape[0], qweight.shape[0]
    out = torch.empty(rows, n, dtype=torch.float32)
    threads = torch.get_num_threads()
    if bits == 8:
        status = lib.qmm_int8(x32.data_ptr(), rows, k, qweight.data_ptr(), n, scales.data_ptr(),
                              _pointer(zeros), out.data_ptr(), threads)
    else:
        status = lib.qmm_int4(x32.data_ptr(), rows, k, group_size, qweight.data_ptr(), n, scales.data_ptr(),
                              _pointer(zeros), out.data_ptr(), threads)
    if status:
        raise RuntimeError(f"qmatmul.c refused its arguments (status {status}): rows {rows}, K {k}, group {group_size}")
    return out.view(*x.shape[:-1], n).to(x.dtype)


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

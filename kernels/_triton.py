"""Optional Triton import, shared by the kernel files.

Triton is optional: without it `triton` and `tl` are None, the kernel files skip defining
their Triton kernels, and every public function runs its torch reference.

Interpreter mode. Triton 3.9 decides between compiling and interpreting *when a function is
decorated*: `triton.jit` reads `triton.knobs.runtime.interpret` (the TRITON_INTERPRET
environment variable) and returns an `InterpretedFunction` instead of a `JITFunction`. This
also holds for Triton's own library functions (`tl.max`, `tl.sum`, ...), which are decorated
when `triton.language` is first imported — so the choice is effectively made once per process,
at the first `import triton`. We therefore decide *before* importing triton:

- a CUDA device is present, or TRITON_INTERPRET is already set: leave the environment alone
  (compiled kernels on the GPU; or whatever the user asked for);
- no CUDA device: set TRITON_INTERPRET=1, so that `IDEFICS2_MINI_KERNELS=triton` can run the
  kernels on CPU tensors in the interpreter (Triton cannot run compiled kernels without a GPU
  anyway, so nothing is lost).

If triton was imported elsewhere *before* this module on a CPU-only machine, the interpreter is
not active; `interpreter_active()` reports that and the wrappers raise a clear error when asked
to run a kernel on CPU tensors.

Interpreter caveats (triton 3.9), both about bfloat16, which numpy lacks:
- the interpreter stores bf16 as raw uint16 and does no arithmetic on it (`tl.dot` on bf16
  multiplies the bit patterns), though `.to(tl.float32)` converts it correctly. A loaded block
  that the GPU computes on in its own dtype goes through `computable(x)`, which in the
  interpreter widens bf16 to fp32 (exact); an operand rounded for a `tl.dot` goes through
  `dot_operand`, which rounds through bf16 exactly where the GPU path rounds (e.g. the softmax
  probabilities before P @ V) and then widens likewise;
- its fp32 -> bf16 cast truncates instead of rounding to nearest even (the GPU's default).
  Every bf16 rounding in the kernels goes through `to_dtype(x, dtype)`, which in the
  interpreter first rounds to nearest even by integer arithmetic on the fp32 bits (after which
  the truncating cast is exact).
With both, the interpreted kernels compute the same numbers as the compiled ones, up to
summation order, which is what lets the CPU tests hold them to the GPU tolerance rule.

Both fixes hang on one module constant, `INTERPRETED` (a `tl.constexpr`, which jitted functions
may read as a global): it is fixed for the process at the first `import triton`, so it is no
argument of any kernel, and when compiled it is False and the branches vanish from the code.
"""

from __future__ import annotations

import os
import sys

import torch

triton = None
tl = None
_IMPORT_ERROR: Exception | None = None

if "triton" not in sys.modules and "TRITON_INTERPRET" not in os.environ:
    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

try:  # pragma: no cover - exercised implicitly by every test
    import triton  # type: ignore[no-redef]
    import triton.language as tl  # type: ignore[no-redef]
except Exception as error:  # ImportError, or a broken install
    triton, tl, _IMPORT_ERROR = None, None, error


def interpreter_active() -> bool:
    """True when Triton's own library functions were built for the interpreter."""
    if triton is None:
        return False
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(tl.max, InterpretedFunction)


if triton is not None:
    INTERPRETED = tl.constexpr(interpreter_active())

    @triton.jit
    def computable(x):
        """x unchanged, except in the interpreter, where a bf16 block is widened to fp32
        (exact), since the interpreter cannot compute on bf16 (see above)."""
        if INTERPRETED:
            if x.dtype == tl.bfloat16:
                x = x.to(tl.float32)
        return x

    @triton.jit
    def to_dtype(x, dtype: tl.constexpr):
        """x.to(dtype), rounding to nearest even also in the interpreter (see above)."""
        if INTERPRETED:
            if dtype == tl.bfloat16:
                bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
                # Add half an ulp of bf16 (minus one unless the kept last bit is odd: ties to
                # even), then drop the 16 low bits.
                bits = bits + 0x7FFF + ((bits >> 16) & 1)
                x = ((bits >> 16) << 16).to(tl.float32, bitcast=True)
        return x.to(dtype)

    @triton.jit
    def dot_operand(x, dtype: tl.constexpr):
        """Round an fp32 block to `dtype` (the inputs' dtype) so the next tl.dot runs on tensor
        cores in 16 bit, as the GPU does; in the interpreter a bf16 block is then widened back
        to fp32 (exactly), since the interpreter cannot multiply bf16 (see above)."""
        return computable(to_dtype(x, dtype))

    @triton.jit
    def online_softmax_step(s, v, m_i, l_i, acc, P_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr):
        """Fold one block of keys into a running softmax(s) @ V (flash attention's recurrence,
        in base 2: s is already scaled by log2(e)).

        s [M, N] scores with -inf where a key is masked; v [N, D] the block's values;
        m_i [M] running max, l_i [M] running sum of exp2(s - m_i), acc [M, D] running
        unnormalised output. Returns the updated (m_i, l_i, acc); the caller divides acc by
        l_i at the end (l_i = 0: the row saw no key). P is rounded to P_DTYPE (V's dtype) so
        the second matmul runs in 16 bit on tensor cores.
        """
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row with no visible key so far has m_new = -inf; subtracting 0 instead keeps
        # exp2 at exp2(-inf) = 0 rather than exp2(-inf + inf) = NaN.
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(dot_operand(p, P_DTYPE), computable(v), input_precision=DOT_PRECISION)
        return m_new, l_i, acc

    # -----------------------------------------------------------------------------------------
    # Masking rules of prefill attention, shared by its forward and backward kernels
    # (kernels/attention_prefill.py states the rules).
    # -----------------------------------------------------------------------------------------

    @triton.jit
    def sequence_rows(b, cu_ptr, padded_len, VARLEN: tl.constexpr):
        """(first row as int64, row count) of sequence b along one axis: from the cumulative
        lengths cu [B + 1] in the packed layout, else rows [0, padded_len) of batch entry b."""
        if VARLEN:
            first = tl.load(cu_ptr + b)
            count = tl.load(cu_ptr + b + 1) - first
            first = first.to(tl.int64)
        else:
            first = 0
            count = padded_len
        return first, count

    @triton.jit
    def key_block_range(start_m, q_len, k_len, window, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """Keys worth visiting for query rows [start_m, start_m + BLOCK_M) of one sequence.

        Returns (lo, hi, full_lo, full_hi): [lo, hi) holds every key visible to some row (lo is
        a multiple of BLOCK_N, so key blocks stay aligned) and [full_lo, full_hi) the keys
        visible to every row, where a key block needs no positional mask.
        """
        # Causal alignment: query i sits at key position i + (Lk - Lq).
        first_pos = start_m + (k_len - q_len)
        last_pos = tl.minimum(start_m + BLOCK_M, q_len) - 1 + (k_len - q_len)
        lo = 0
        hi = k_len
        full_lo = 0
        full_hi = k_len
        if CAUSAL:
            hi = tl.minimum(k_len, last_pos + 1)
            full_hi = tl.minimum(k_len, first_pos + 1)
            if HAS_WINDOW:
                lo = tl.maximum(0, first_pos - window + 1)
                lo = (lo // BLOCK_N) * BLOCK_N
                full_lo = last_pos - window + 1
        return lo, hi, full_lo, full_hi

    @triton.jit
    def query_block_range(start_n, q_len, k_len, window, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """The mirror of `key_block_range`: queries worth visiting for keys
        [start_n, start_n + BLOCK_N) of one sequence.

        Returns (lo, hi, full_lo, full_hi): [lo, hi) holds every query row that sees some key of
        the block (lo a multiple of BLOCK_M) and [full_lo, full_hi) the rows that see all of
        them (the key block is assumed complete; the caller masks a partial last block).
        """
        offset = k_len - q_len  # query i sits at key position i + offset
        lo = 0
        hi = q_len
        full_lo = 0
        full_hi = q_len
        if CAUSAL:
            # Query i sees key j only if j <= i + offset: rows before the block's first key see none.
            lo = tl.maximum(0, start_n - offset)
            lo = (lo // BLOCK_M) * BLOCK_M
            full_lo = start_n + BLOCK_N - 1 - offset
            if HAS_WINDOW:
                # ... and only if j > i + offset - window: rows a window past the last key see none.
                last_key = tl.minimum(start_n + BLOCK_N, k_len) - 1
                hi = tl.minimum(q_len, last_key + window - offset)
                full_hi = tl.minimum(q_len, start_n + window - offset)
        return lo, hi, full_lo, full_hi

    @triton.jit
    def visible(q_pos, k_pos, in_range, window, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
        """Bool block: the key at k_pos is visible from the query at q_pos (both broadcast to
        the block's shape, positions on the key axis); in_range marks real rows and keys."""
        seen = in_range
        if CAUSAL:
            seen = seen & (k_pos <= q_pos)
        if HAS_WINDOW:
            seen = seen & (k_pos > q_pos - window)
        return seen

else:
    INTERPRETED = False
    computable = to_dtype = online_softmax_step = dot_operand = None
    sequence_rows = key_block_range = query_block_range = visible = None

LOG2_E = 1.4426950408889634


def available() -> bool:
    """True when triton imported."""
    return triton is not None


def check_runnable(tensor: torch.Tensor) -> None:
    """Raise a clear error when a Triton kernel cannot run on `tensor`'s device."""
    if triton is None:
        raise RuntimeError(f"triton is not importable ({_IMPORT_ERROR!r}); use the torch references")
    if not tensor.is_cuda and not interpreter_active():
        raise RuntimeError(
            "Triton kernels on CPU tensors run only in Triton's interpreter, which must be chosen "
            "before triton is first imported: set TRITON_INTERPRET=1 in the environment (this "
            "process either has a CUDA device or imported triton before `kernels`)."
        )


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def multiprocessor_count(device: torch.device) -> int:
    """SM count of a CUDA device (used to size grids); a small constant on CPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4

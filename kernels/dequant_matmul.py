"""Weight-only quantized matmul: y = x @ dequantize(q, s, z).T (+ bias), weights int8 or int4.

The storage format (idefics2_mini/quantize/ makes it; this file only reads it): a linear's
weight W [N, K] becomes integers q and, per output row n and input group g (columns
g*G .. g*G + G - 1), a scale s[n, g] and, when asymmetric, a zero z[n, g]:

    W[n, k] ≈ q[n, k] * s[n, g] + z[n, g]        (z = 0 when symmetric: no zeros tensor)

- int8 (bits=8): qweight int8 [N, K], q itself; per output channel, so G = K and
  scales/zeros are [N, 1] fp32.
- int4 (bits=4): q in [-8, 7], stored as q + 8 in a nibble, two per byte: qweight uint8
  [N, K / 2]; within each group of G columns byte j (0 <= j < G/2) holds column j in its low
  nibble and column j + G/2 in its high nibble (the two halves of a group are contiguous, so a
  kernel unpacks a byte into two runs of consecutive columns). scales/zeros are bf16 [N, K/G].

This file holds:
- `unpack_int4`, `dequantize_reference`, `quantized_matmul_reference`: the math above in torch
  (the contract; fp32 throughout, the result cast to x's dtype);
- `_quantized_matmul_kernel` (Triton) and its launcher: for each tile of output rows and
  columns it loads the integer weights, dequantizes them in registers (fp32, then rounded to
  x's dtype for tl.dot, as a bf16 model multiplies bf16 weights) and accumulates in fp32; the
  K loop can be split over programs (decode has one row, so the grid needs more programs than
  output tiles to fill a GPU), the partial sums then added by torch;
- `quantized_matmul`: the dispatching function (see dispatch.py for the rule). On the CPU the
  quantized linear (idefics2_mini/quantize/) runs its own C kernel for few rows instead.
"""

from __future__ import annotations

import torch

from . import _triton
from ._triton import computable, dot_operand, tl, triton
from .dispatch import use_triton

BITS = (8, 4)


def unpack_int4(qweight: torch.Tensor, group_size: int) -> torch.Tensor:
    """qweight uint8 [N, K/2] (the nibble layout of the module docstring) -> q int8 [N, K] in [-8, 7]."""
    rows, half_k = qweight.shape
    k = 2 * half_k
    if group_size % 2 or k % group_size:
        raise ValueError(f"int4 group size {group_size} must be even and divide the {k} columns")
    grouped = qweight.view(rows, k // group_size, group_size // 2)
    low = (grouped & 15).to(torch.int8) - 8  # columns j of each group
    high = (grouped >> 4).to(torch.int8) - 8  # columns j + G/2
    return torch.cat([low, high], dim=-1).view(rows, k)


def dequantize_reference(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                         bits: int, group_size: int) -> torch.Tensor:
    """The quantized weight as fp32 [N, K]: q * s + z, group by group (module docstring)."""
    if bits == 8:
        q = qweight
    elif bits == 4:
        q = unpack_int4(qweight, group_size)
    else:
        raise ValueError(f"bits must be 8 or 4, got {bits}")
    rows, k = q.shape
    groups = scales.shape[-1]
    weight = q.float().view(rows, groups, k // groups) * scales.float()[..., None]
    if zeros is not None:
        weight = weight + zeros.float()[..., None]
    return weight.view(rows, k)


def quantized_matmul_reference(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                               zeros: torch.Tensor | None, bits: int, group_size: int,
                               bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] -> [..., N] in x's dtype: fp32 x @ dequantize_reference(...).T + bias."""
    weight = dequantize_reference(qweight, scales, zeros, bits, group_size)
    out = x.float() @ weight.t()
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


# ---------------------------------------------------------------------------------------------
# Triton kernel
#
# Program (m, n, split): output rows m*BLOCK_M.., columns n*BLOCK_N.., and the share `split` of
# the K groups. int8 tiles along K are BLOCK_K wide; int4 tiles are one group, loaded as G/2
# bytes and unpacked into its two halves, each multiplied with its own half of x.
# ---------------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _quantized_matmul_kernel(
        x_ptr, q_ptr, s_ptr, z_ptr, out_ptr,
        M, N, K, groups, per_split, x_row_stride,
        BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZERO: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
    ):
        """x [M, K] (row stride given); q: int8 [N, K] (BITS=8) or uint8 [N, K/2] (BITS=4);
        s, z [N, groups]; out fp32 [splits, M, N]: this program's partial sum over its share of
        K: `per_split` columns (int8; a multiple of BLOCK_K) or groups (int4)."""
        pid_m, pid_n, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok, col_ok = rows < M, cols < N
        x_rows = x_ptr + rows.to(tl.int64)[:, None] * x_row_stride
        dtype = x_ptr.dtype.element_ty
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        if BITS == 8:
            # One group per row (G = K): sum q * x over this split's columns, scale once.
            q_rows = q_ptr + cols.to(tl.int64)[:, None] * K
            x_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
            k_begin = split * per_split
            k_end = tl.minimum(k_begin + per_split, K)
            for k0 in range(k_begin, k_end, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                k_ok = ks < k_end
                x = tl.load(x_rows + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                x = computable(x)
                q = tl.load(q_rows + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0)
                w = dot_operand(q.to(tl.float32), dtype)  # exact: |q| <= 128
                acc += tl.dot(x, tl.trans(w), input_precision=DOT_PRECISION)
                x_sum += tl.sum(x.to(tl.float32), axis=1)
            s = tl.load(s_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
            acc = acc * s[None, :]
            if HAS_ZERO:
                z = tl.load(z_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
                acc += x_sum[:, None] * z[None, :]
        else:
            HALF: tl.constexpr = GROUP // 2
            halves = tl.arange(0, HALF)
            q_rows = q_ptr + cols.to(tl.int64)[:, None] * (K // 2)
            first = split * per_split
            last = tl.minimum(first + per_split, groups)
            for g in range(first, last):
                packed = tl.load(q_rows + g * HALF + halves[None, :], mask=col_ok[:, None], other=0)
                low = ((packed & 15).to(tl.int32) - 8).to(tl.float32)  # columns g*G + j
                high = ((packed >> 4).to(tl.int32) - 8).to(tl.float32)  # columns g*G + HALF + j
                s = tl.load(s_ptr + cols * groups + g, mask=col_ok, other=0.0).to(tl.float32)
                w_low = low * s[:, None]
                w_high = high * s[:, None]
                if HAS_ZERO:
                    z = tl.load(z_ptr + cols * groups + g, mask=col_ok, other=0.0).to(tl.float32)
                    w_low += z[:, None]
                    w_high += z[:, None]
                x_low = tl.load(x_rows + g * GROUP + halves[None, :], mask=row_ok[:, None], other=0.0)
                x_high = tl.load(x_rows + g * GROUP + HALF + halves[None, :], mask=row_ok[:, None], other=0.0)
                x_low = computable(x_low)
                x_high = computable(x_high)
                acc += tl.dot(x_low, tl.trans(dot_operand(w_low, dtype)), input_precision=DOT_PRECISION)
                acc += tl.dot(x_high, tl.trans(dot_operand(w_high, dtype)), input_precision=DOT_PRECISION)
        out = out_ptr + split.to(tl.int64) * M * N + rows.to(tl.int64)[:, None] * N + cols[None, :]
        tl.store(out, acc, mask=row_ok[:, None] & col_ok[None, :])


def _launch_config(rows: int, n: int, k: int, groups: int, bits: int,
                   device: torch.device) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, splits): 16-row tiles (tl.dot's minimum) up to 64; the K loop
    split over programs until the grid has a few per multiprocessor (decode: one row tile)."""
    block_m = 16 if rows <= 16 else 32 if rows <= 32 else 64
    block_n, block_k = 64, 128
    tiles = triton.cdiv(rows, block_m) * triton.cdiv(n, block_n)
    wanted = 4 * _triton.multiprocessor_count(device)
    k_steps = groups if bits == 4 else triton.cdiv(k, block_k)
    splits = max(1, min(wanted // tiles, k_steps, 16))
    return block_m, block_n, block_k, splits


def _quantized_matmul_launch(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                             zeros: torch.Tensor | None, bits: int, group_size: int,
                             bias: torch.Tensor | None = None, splits: int | None = None) -> torch.Tensor:
    """x [..., K] -> [..., N] in x's dtype (the reference's contract)."""
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    rows, n = x2.shape[0], qweight.shape[0]
    groups = scales.shape[-1]
    block_m, block_n, block_k, auto_splits = _launch_config(rows, n, k, groups, bits, x.device)
    splits = auto_splits if splits is None else splits
    if bits == 4:
        per_split = triton.cdiv(groups, splits)
        splits = triton.cdiv(groups, per_split)
    else:
        per_split = triton.cdiv(triton.cdiv(k, splits), block_k) * block_k
        splits = triton.cdiv(k, per_split)
    partial = torch.empty(splits, rows, n, dtype=torch.float32, device=x.device)
    if rows and n:
        grid = (triton.cdiv(rows, block_m), triton.cdiv(n, block_n), splits)
        _quantized_matmul_kernel[grid](
            x2, qweight, scales.contiguous(), scales if zeros is None else zeros.contiguous(), partial,
            rows, n, k, groups, per_split, x2.stride(0),
            BITS=bits, GROUP=group_size, HAS_ZERO=zeros is not None,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
            DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        )
    out = partial.sum(0) if splits > 1 else partial[0]
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype).view(*x.shape[:-1], n)


@torch.library.custom_op("idefics2_mini::quantized_matmul_fwd", mutates_args=())
def quantized_matmul_fwd_op(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                            zeros: torch.Tensor | None, bits: int, group_size: int,
                            bias: torch.Tensor | None) -> torch.Tensor:
    """The Triton path as an op torch.compile keeps whole."""
    _triton.check_runnable(x)
    return _quantized_matmul_launch(x, qweight, scales, zeros, bits, group_size, bias)


@quantized_matmul_fwd_op.register_fake
def _(x, qweight, scales, zeros, bits, group_size, bias):
    return x.new_empty(*x.shape[:-1], qweight.shape[0])


def check_format(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int,
                 group_size: int, in_features: int | None = None) -> None:
    """Raise ValueError unless the tensors are a consistent quantized weight (module docstring)."""
    if bits not in BITS:
        raise ValueError(f"bits must be 8 or 4, got {bits}")
    rows = qweight.shape[0]
    k = qweight.shape[1] * (2 if bits == 4 else 1)
    expected_q = torch.int8 if bits == 8 else torch.uint8
    problems = []
    if qweight.dim() != 2 or qweight.dtype != expected_q:
        problems.append(f"qweight must be a 2-D {expected_q} tensor, got {qweight.dtype} {list(qweight.shape)}")
    if in_features is not None and k != in_features:
        problems.append(f"qweight holds {k} columns, the layer has {in_features}")
    if group_size <= 0 or k % group_size:
        problems.append(f"group size {group_size} does not divide the {k} columns")
    elif list(scales.shape) != [rows, k // group_size]:
        problems.append(f"scales must be [{rows}, {k // group_size}], got {list(scales.shape)}")
    if zeros is not None and zeros.shape != scales.shape:
        problems.append(f"zeros must have the scales' shape {list(scales.shape)}, got {list(zeros.shape)}")
    if problems:
        raise ValueError("; ".join(problems))


def _triton_ok(x: torch.Tensor, bits: int, group_size: int) -> bool:
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return False
    if bits == 4 and (group_size < 32 or group_size & (group_size - 1)):
        return False  # a group's halves are tl.dot operands: a power of two, at least 16 wide
    if torch.is_grad_enabled() and x.requires_grad:
        return False  # forward only
    return use_triton(x)


def quantized_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                     bits: int, group_size: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Dispatching quantized matmul (the reference's signature and result): x [..., K] ->
    [..., N] in x's dtype. Triton (see dispatch.py) without a gradient, else the reference."""
    if _triton_ok(x, bits, group_size):
        _triton.check_runnable(x)
        return quantized_matmul_fwd_op(x, qweight, scales, zeros, bits, group_size, bias)
    return quantized_matmul_reference(x, qweight, scales, zeros, bits, group_size, bias)

"""RMSNorm: y = weight * (x / sqrt(mean(x^2) + eps)), optionally after a fused residual add.

Cast order is the model's (Mistral / Idefics2): statistics in fp32, the normalised value cast
back to the input dtype, *then* multiplied by the weight.

This file holds three things:
- `rms_norm_reference`: the torch math above (the contract);
- the Triton kernels `_rms_norm_fwd_kernel` / `_rms_norm_bwd_kernel` and their launchers,
  registered as the torch custom ops `idefics2_mini::rms_norm_fwd` / `rms_norm_bwd` (so
  `torch.compile` treats them as opaque calls) and wrapped in `RMSNormFunction`
  (`torch.autograd.Function`) for training;
- `rms_norm`: the dispatching function the model calls (see dispatch.py for the rule).
"""

from __future__ import annotations

from typing import Optional

import torch

from . import _triton
from ._triton import tl, to_dtype, triton
from .dispatch import use_triton


def rms_norm_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """x, residual: [..., N]; weight: [N].

    Returns y [..., N], or (y, x + residual) when `residual` is given (the sum is the next
    layer's residual stream).
    """
    summed = None
    if residual is not None:
        x = x + residual
        summed = x
    if x.dtype == torch.float32 and weight.dtype == torch.float32:
        # In fp32 there is no cast to place: torch's fused op computes the same expression in
        # one call (decode on CPU is bound by per-op overhead, not by this arithmetic).
        y = torch.nn.functional.rms_norm(x, (x.shape[-1],), weight, eps)
        return y if summed is None else (y, summed)
    input_dtype = x.dtype
    x32 = x.float()
    variance = x32.pow(2).mean(-1, keepdim=True)
    y = weight * (x32 * torch.rsqrt(variance + eps)).to(input_dtype)
    return y if summed is None else (y, summed)


# ---------------------------------------------------------------------------------------------
# Triton kernels
#
# One program per row for the forward: a row of the model is at most 4096 wide (16 KiB in
# fp32), so a power-of-two block covering the whole row fits in registers and x is read from
# memory exactly once. Rows wider than MAX_ONE_BLOCK columns (16384) switch to a two-pass loop
# over column blocks (sum of squares first, then normalise), reading x twice but never spilling.
# ---------------------------------------------------------------------------------------------

MAX_ONE_BLOCK = 16384
LOOP_BLOCK = 4096

if triton is not None:

    @triton.jit
    def _rms_norm_fwd_kernel(
        x_ptr, residual_ptr, weight_ptr, y_ptr, summed_ptr, rstd_ptr,
        n_cols, x_row_stride, r_row_stride, y_row_stride, s_row_stride, eps,
        HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, ONE_BLOCK: tl.constexpr,
        ACC: tl.constexpr, FIX_BF16: tl.constexpr,
    ):
        """x, residual, y, summed: [rows, n_cols] (row strides given, unit column stride);
        weight: [n_cols]; rstd: [rows] (ACC dtype, saved for the backward)."""
        row = tl.program_id(0).to(tl.int64)
        x_row = x_ptr + row * x_row_stride
        r_row = residual_ptr + row * r_row_stride
        y_row = y_ptr + row * y_row_stride
        s_row = summed_ptr + row * s_row_stride
        in_dtype = x_ptr.dtype.element_ty
        if ONE_BLOCK:
            cols = tl.arange(0, BLOCK)
            in_row = cols < n_cols
            x = tl.load(x_row + cols, mask=in_row, other=0.0).to(ACC)
            if HAS_RESIDUAL:
                r = tl.load(r_row + cols, mask=in_row, other=0.0).to(ACC)
                # torch adds in the input dtype: an exact fp32 add rounded once to that dtype.
                x = to_dtype(x + r, in_dtype, FIX_BF16)
                tl.store(s_row + cols, x, mask=in_row)
                x = x.to(ACC)
            rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n_cols + eps)
            # The reference casts the normalised value to the input dtype *before* the weight.
            normed = to_dtype(x * rstd, in_dtype, FIX_BF16).to(ACC)
            w = tl.load(weight_ptr + cols, mask=in_row, other=0.0).to(ACC)
            tl.store(y_row + cols, to_dtype(w * normed, y_ptr.dtype.element_ty, FIX_BF16), mask=in_row)
        else:
            sum_sq = tl.zeros([BLOCK], dtype=ACC)
            for start in range(0, n_cols, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                in_row = cols < n_cols
                x = tl.load(x_row + cols, mask=in_row, other=0.0).to(ACC)
                if HAS_RESIDUAL:
                    r = tl.load(r_row + cols, mask=in_row, other=0.0).to(ACC)
                    x = to_dtype(x + r, in_dtype, FIX_BF16)
                    tl.store(s_row + cols, x, mask=in_row)
                    x = x.to(ACC)
                sum_sq += x * x
            rstd = 1.0 / tl.sqrt(tl.sum(sum_sq, axis=0) / n_cols + eps)
            for start in range(0, n_cols, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                in_row = cols < n_cols
                # Recompute x (+ residual) rather than re-reading `summed`: a store and a load by
                # the same program are not guaranteed to be ordered across threads.
                x = tl.load(x_row + cols, mask=in_row, other=0.0).to(ACC)
                if HAS_RESIDUAL:
                    r = tl.load(r_row + cols, mask=in_row, other=0.0).to(ACC)
                    x = to_dtype(x + r, in_dtype, FIX_BF16).to(ACC)
                normed = to_dtype(x * rstd, in_dtype, FIX_BF16).to(ACC)
                w = tl.load(weight_ptr + cols, mask=in_row, other=0.0).to(ACC)
                tl.store(y_row + cols, to_dtype(w * normed, y_ptr.dtype.element_ty, FIX_BF16), mask=in_row)
        tl.store(rstd_ptr + row, rstd)

    @triton.jit
    def _rms_norm_bwd_kernel(
        dy_ptr, x_ptr, weight_ptr, rstd_ptr, dsum_ptr, dx_ptr, dw_partial_ptr,
        n_rows, n_cols, rows_per_program,
        dy_row_stride, x_row_stride, dsum_row_stride, dx_row_stride,
        HAS_DSUM: tl.constexpr, BLOCK: tl.constexpr, ONE_BLOCK: tl.constexpr,
        ACC: tl.constexpr, FIX_BF16: tl.constexpr,
    ):
        """Backward of y = w * cast(x * rstd).

        With n = x * rstd and g = dy * w:  dx = rstd * (g - n * mean(g * n)),
        dw = sum over rows of dy * cast(n). The cast is treated as the identity for dx (as
        autograd does). Each program owns `rows_per_program` consecutive rows and accumulates
        its share of dw into its own row of dw_partial [programs, n_cols] (no atomics); the
        wrapper sums the partials. dsum (the gradient of the returned x + residual) is added
        to dx, because the sum feeds the norm and is also returned.
        """
        pid = tl.program_id(0)
        row_start = pid * rows_per_program
        row_end = tl.minimum(row_start + rows_per_program, n_rows)
        in_dtype = x_ptr.dtype.element_ty
        dw_row = dw_partial_ptr + pid.to(tl.int64) * n_cols
        # Row pointers advance by their strides each iteration (64-bit pointer arithmetic, so
        # no int32 overflow on large tensors).
        first_row = row_start.to(tl.int64)
        x_row = x_ptr + first_row * x_row_stride
        dy_row = dy_ptr + first_row * dy_row_stride
        dsum_row = dsum_ptr + first_row * dsum_row_stride
        dx_row = dx_ptr + first_row * dx_row_stride
        rstd_row = rstd_ptr + first_row
        if ONE_BLOCK:
            cols = tl.arange(0, BLOCK)
            in_row = cols < n_cols
            w = tl.load(weight_ptr + cols, mask=in_row, other=0.0).to(ACC)
            dw_acc = tl.zeros([BLOCK], dtype=ACC)
            for _ in range(row_start, row_end):
                x = tl.load(x_row + cols, mask=in_row, other=0.0).to(ACC)
                dy = tl.load(dy_row + cols, mask=in_row, other=0.0).to(ACC)
                rstd = tl.load(rstd_row)
                normed = x * rstd
                g = dy * w
                mean_gn = tl.sum(g * normed, axis=0) / n_cols
                dx = (g - normed * mean_gn) * rstd
                if HAS_DSUM:
                    dx += tl.load(dsum_row + cols, mask=in_row, other=0.0).to(ACC)
                tl.store(dx_row + cols, to_dtype(dx, dx_ptr.dtype.element_ty, FIX_BF16), mask=in_row)
                dw_acc += dy * to_dtype(normed, in_dtype, FIX_BF16).to(ACC)
                x_row += x_row_stride
                dy_row += dy_row_stride
                dsum_row += dsum_row_stride
                dx_row += dx_row_stride
                rstd_row += 1
            tl.store(dw_row + cols, dw_acc, mask=in_row)
        else:
            for _ in range(row_start, row_end):
                rstd = tl.load(rstd_row)
                acc = tl.zeros([BLOCK], dtype=ACC)
                for start in range(0, n_cols, BLOCK):
                    cols = start + tl.arange(0, BLOCK)
                    in_row = cols < n_cols
                    x = tl.load(x_row + cols, mask=in_row, other=0.0).to(ACC)
                    dy = tl.load(dy_row + cols, mask=in_row, other=0.0).to(ACC)
                    w = tl.load(weight_ptr + cols, mask=in_row, other=0.0).to(ACC)
                    acc += dy * w * x * rstd
                mean_gn = tl.sum(acc, axis=0) / n_cols
                for start in range(0, n_cols, BLOCK):
                    cols = start + tl.arange(0, BLOCK)
                    in_row = cols < n_cols
                    x = tl.load(x_row + cols, mask=in_row, other=0.0).to(ACC)
                    dy = tl.load(dy_row + cols, mask=in_row, other=0.0).to(ACC)
                    w = tl.load(weight_ptr + cols, mask=in_row, other=0.0).to(ACC)
                    normed = x * rstd
                    dx = (dy * w - normed * mean_gn) * rstd
                    if HAS_DSUM:
                        dx += tl.load(dsum_row + cols, mask=in_row, other=0.0).to(ACC)
                    tl.store(dx_row + cols, to_dtype(dx, dx_ptr.dtype.element_ty, FIX_BF16), mask=in_row)
                    # dw_partial row `pid` belongs to this program alone, so read-modify-write is
                    # race free (each element is touched by the same thread every time).
                    dw = tl.load(dw_row + cols, mask=in_row, other=0.0)
                    tl.store(dw_row + cols, dw + dy * to_dtype(normed, in_dtype, FIX_BF16).to(ACC), mask=in_row)
                x_row += x_row_stride
                dy_row += dy_row_stride
                dsum_row += dsum_row_stride
                dx_row += dx_row_stride
                rstd_row += 1


def _acc_dtype(*tensors: torch.Tensor):
    """fp64 statistics for fp64 inputs (so gradcheck can run through the kernel), else fp32."""
    return tl.float64 if any(t.dtype == torch.float64 for t in tensors) else tl.float32


def _block_config(n_cols: int, max_one_block: int) -> tuple[int, bool, int]:
    """(BLOCK, ONE_BLOCK, num_warps): a block covering the row when it fits, else a loop."""
    block = _triton.next_power_of_2(n_cols)
    if block <= max_one_block:
        one_block = True
    else:
        block, one_block = min(LOOP_BLOCK, max_one_block), False
    # Enough warps that each thread holds a handful of elements (8 to 16 per thread).
    num_warps = 4 if block <= 1024 else 8 if block <= 4096 else 16
    return block, one_block, num_warps


def _rms_norm_fwd_launch(x, weight, eps, residual, max_one_block=MAX_ONE_BLOCK):
    """x, residual: [..., N] (same dtype); weight [N] -> (y, summed or empty, rstd [rows])."""
    n_cols = x.shape[-1]
    x2 = x.reshape(-1, n_cols)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    rows = x2.shape[0]
    y_dtype = torch.promote_types(weight.dtype, x.dtype)
    y = torch.empty(x.shape, dtype=y_dtype, device=x.device)
    stats_dtype = torch.float64 if torch.float64 in (x.dtype, weight.dtype) else torch.float32
    rstd = torch.empty(rows, dtype=stats_dtype, device=x.device)
    if residual is not None:
        r2 = residual.reshape(-1, n_cols)
        if r2.stride(-1) != 1:
            r2 = r2.contiguous()
        summed = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    else:
        r2, summed = x2, torch.empty(0, dtype=x.dtype, device=x.device)
    if rows == 0:
        return y, summed, rstd
    y2 = y.view(-1, n_cols)
    s2 = summed.view(-1, n_cols) if residual is not None else x2
    block, one_block, num_warps = _block_config(n_cols, max_one_block)
    _rms_norm_fwd_kernel[(rows,)](
        x2, r2, weight, y2, s2, rstd,
        n_cols, x2.stride(0), r2.stride(0), y2.stride(0), s2.stride(0), eps,
        HAS_RESIDUAL=residual is not None, BLOCK=block, ONE_BLOCK=one_block,
        ACC=_acc_dtype(x, weight), FIX_BF16=_triton.interpreter_active(), num_warps=num_warps,
    )
    return y, summed, rstd


def _rms_norm_bwd_launch(dy, x, weight, rstd, dsum, max_one_block=MAX_ONE_BLOCK):
    """dy: [..., N]; x: the normalised input [..., N]; rstd: [rows]; dsum: [..., N] or None.
    Returns (dx [..., N] in x's dtype, dweight [N] in weight's dtype)."""
    n_cols = x.shape[-1]
    dy2 = dy.reshape(-1, n_cols).contiguous()
    x2 = x.reshape(-1, n_cols).contiguous()
    rows = x2.shape[0]
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if rows == 0:
        return dx, torch.zeros_like(weight)
    ds2 = dsum.reshape(-1, n_cols).contiguous() if dsum is not None else dy2
    # Enough programs to fill the GPU (a few per SM); each loops over its share of rows.
    programs = min(rows, 4 * _triton.multiprocessor_count(x.device))
    rows_per_program = triton.cdiv(rows, programs)
    programs = triton.cdiv(rows, rows_per_program)
    acc_dtype = torch.float64 if torch.float64 in (x.dtype, weight.dtype) else torch.float32
    dw_partial = torch.zeros(programs, n_cols, dtype=acc_dtype, device=x.device)
    block, one_block, num_warps = _block_config(n_cols, max_one_block)
    dx2 = dx.view(-1, n_cols)
    _rms_norm_bwd_kernel[(programs,)](
        dy2, x2, weight, rstd, ds2, dx2, dw_partial,
        rows, n_cols, rows_per_program,
        dy2.stride(0), x2.stride(0), ds2.stride(0), dx2.stride(0),
        HAS_DSUM=dsum is not None, BLOCK=block, ONE_BLOCK=one_block,
        ACC=_acc_dtype(x, weight), FIX_BF16=_triton.interpreter_active(), num_warps=num_warps,
    )
    return dx, dw_partial.sum(0).to(weight.dtype)


# ---------------------------------------------------------------------------------------------
# Custom ops (opaque to torch.compile) and the autograd wrapper
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("idefics2_mini::rms_norm_fwd", mutates_args=())
def rms_norm_fwd_op(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: Optional[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton RMSNorm forward: (y [..., N], x + residual [..., N] or an empty tensor, rstd [rows])."""
    _triton.check_runnable(x)
    return _rms_norm_fwd_launch(x, weight, eps, residual)


@rms_norm_fwd_op.register_fake
def _(x, weight, eps, residual):
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    stats_dtype = torch.float64 if torch.float64 in (x.dtype, weight.dtype) else torch.float32
    y = x.new_empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype))
    summed = x.new_empty(x.shape) if residual is not None else x.new_empty(0)
    return y, summed, x.new_empty(rows, dtype=stats_dtype)


@torch.library.custom_op("idefics2_mini::rms_norm_bwd", mutates_args=())
def rms_norm_bwd_op(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor,
    dsum: Optional[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton RMSNorm backward: (dx [..., N], dweight [N])."""
    _triton.check_runnable(x)
    return _rms_norm_bwd_launch(dy, x, weight, rstd, dsum)


@rms_norm_bwd_op.register_fake
def _(dy, x, weight, rstd, dsum):
    return x.new_empty(x.shape), weight.new_empty(weight.shape)


class RMSNormFunction(torch.autograd.Function):
    """Autograd for the Triton RMSNorm: forward/backward are the two custom ops above.

    Returns y, or (y, x + residual) when a residual is given; the gradient of the sum flows
    back into both x and residual together with the norm's own gradient.
    """

    @staticmethod
    def forward(ctx, x, weight, eps, residual):
        y, summed, rstd = rms_norm_fwd_op(x, weight, eps, residual)
        ctx.has_residual = residual is not None
        ctx.save_for_backward(summed if ctx.has_residual else x, weight, rstd)
        return (y, summed) if ctx.has_residual else y

    @staticmethod
    def backward(ctx, dy, dsum=None):
        normed_input, weight, rstd = ctx.saved_tensors
        dx, dweight = rms_norm_bwd_op(dy, normed_input, weight, rstd, dsum)
        return dx, dweight, None, (dx if ctx.has_residual else None)


def _triton_supports(x, weight, residual) -> bool:
    """Shapes/dtypes the kernel handles; anything else falls back to the reference."""
    float_types = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    if x.dtype not in float_types or weight.dtype not in float_types or x.dim() == 0:
        return False
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1] or weight.device != x.device:
        return False
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        return False
    return True


def rms_norm(x, weight, eps, residual=None):
    """Dispatching RMSNorm (same signature and result as `rms_norm_reference`).

    x, residual: [..., N]; weight: [N]. Returns y [..., N] (dtype: promote(weight, x)), or
    (y, x + residual). Triton path (see dispatch.py) has a fused backward via
    `RMSNormFunction`; unusual inputs (mixed x/residual dtypes, a non-1-D weight) use the
    reference.
    """
    if use_triton(x) and _triton_supports(x, weight, residual):
        _triton.check_runnable(x)
        return RMSNormFunction.apply(x, weight, float(eps), residual)
    return rms_norm_reference(x, weight, eps, residual)

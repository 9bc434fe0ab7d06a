"""RMSNorm: y = weight * (x / sqrt(mean(x^2) + eps)) (Zhang and Sennrich, arXiv:1910.07467).

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

import torch

from . import _triton
from ._triton import tl, to_dtype, triton
from .dispatch import use_triton


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x: [..., N]; weight: [N] -> y [..., N] (dtype: promote(weight, x))."""
    if x.dtype == torch.float32 and weight.dtype == torch.float32:
        # In fp32 there is no cast to place: torch's fused op computes the same expression in
        # one call (decode on CPU is bound by per-op overhead, not by this arithmetic).
        return torch.nn.functional.rms_norm(x, (x.shape[-1],), weight, eps)
    if x.dtype in (torch.bfloat16, torch.float16) and not torch.is_grad_enabled():
        # The same cast order in two ops instead of eight: torch's fused op, without a weight,
        # takes the statistics in fp32 and rounds x * rstd once to x's dtype, bit for bit the
        # lines below (tests/test_bf16.py); then the weight, as the reference multiplies it.
        return weight * torch.nn.functional.rms_norm(x, (x.shape[-1],), None, eps)
    input_dtype = x.dtype
    x32 = x.float()
    variance = x32.pow(2).mean(-1, keepdim=True)
    return weight * (x32 * torch.rsqrt(variance + eps)).to(input_dtype)


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
        x_ptr, weight_ptr, y_ptr, rstd_ptr,
        n_cols, x_row_stride, y_row_stride, eps,
        BLOCK: tl.constexpr, ONE_BLOCK: tl.constexpr, ACC: tl.constexpr,
    ):
        """x, y: [rows, n_cols] (row strides given, unit column stride); weight: [n_cols];
        rstd: [rows] (ACC dtype, saved for the backward)."""
        row = tl.program_id(0).to(tl.int64)
        x_row = x_ptr + row * x_row_stride
        y_row = y_ptr + row * y_row_stride
        in_dtype = x_ptr.dtype.element_ty
        if ONE_BLOCK:
            cols = tl.arange(0, BLOCK)
            in_row = cols < n_cols
            x = tl.load(x_row + cols, mask=in_row, other=0.0).to(ACC)
            rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n_cols + eps)
            # The reference casts the normalised value to the input dtype *before* the weight.
            normed = to_dtype(x * rstd, in_dtype).to(ACC)
            w = tl.load(weight_ptr + cols, mask=in_row, other=0.0).to(ACC)
            tl.store(y_row + cols, to_dtype(w * normed, y_ptr.dtype.element_ty), mask=in_row)
        else:
            sum_sq = tl.zeros([BLOCK], dtype=ACC)
            for start in range(0, n_cols, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                in_row = cols < n_cols
                x = tl.load(x_row + cols, mask=in_row, other=0.0).to(ACC)
                sum_sq += x * x
            rstd = 1.0 / tl.sqrt(tl.sum(sum_sq, axis=0) / n_cols + eps)
            for start in range(0, n_cols, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                in_row = cols < n_cols
                x = tl.load(x_row + cols, mask=in_row, other=0.0).to(ACC)
                normed = to_dtype(x * rstd, in_dtype).to(ACC)
                w = tl.load(weight_ptr + cols, mask=in_row, other=0.0).to(ACC)
                tl.store(y_row + cols, to_dtype(w * normed, y_ptr.dtype.element_ty), mask=in_row)
        tl.store(rstd_ptr + row, rstd)

    @triton.jit
    def _rms_norm_bwd_kernel(
        dy_ptr, x_ptr, weight_ptr, rstd_ptr, dx_ptr, dw_partial_ptr,
        n_rows, n_cols, rows_per_program,
        dy_row_stride, x_row_stride, dx_row_stride,
        BLOCK: tl.constexpr, ONE_BLOCK: tl.constexpr, ACC: tl.constexpr,
    ):
        """Backward of y = w * cast(x * rstd).

        With n = x * rstd and g = dy * w:  dx = rstd * (g - n * mean(g * n)),
        dw = sum over rows of dy * cast(n). The cast is treated as the identity for dx (as
        autograd does). Each program owns `rows_per_program` consecutive rows and accumulates
        its share of dw into its own row of dw_partial [programs, n_cols] (no atomics); the
        wrapper sums the partials.
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
                tl.store(dx_row + cols, to_dtype(dx, dx_ptr.dtype.element_ty), mask=in_row)
                dw_acc += dy * to_dtype(normed, in_dtype).to(ACC)
                x_row += x_row_stride
                dy_row += dy_row_stride
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
                    tl.store(dx_row + cols, to_dtype(dx, dx_ptr.dtype.element_ty), mask=in_row)
                    # dw_partial row `pid` belongs to this program alone, so read-modify-write is
                    # race free (each element is touched by the same thread every time).
                    dw = tl.load(dw_row + cols, mask=in_row, other=0.0)
                    tl.store(dw_row + cols, dw + dy * to_dtype(normed, in_dtype).to(ACC), mask=in_row)
                x_row += x_row_stride
                dy_row += dy_row_stride
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


def _rms_norm_fwd_launch(x, weight, eps, max_one_block=MAX_ONE_BLOCK):
    """x: [..., N]; weight [N] -> (y, rstd [rows])."""
    n_cols = x.shape[-1]
    x2 = x.reshape(-1, n_cols)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    rows = x2.shape[0]
    y_dtype = torch.promote_types(weight.dtype, x.dtype)
    y = torch.empty(x.shape, dtype=y_dtype, device=x.device)
    stats_dtype = torch.float64 if torch.float64 in (x.dtype, weight.dtype) else torch.float32
    rstd = torch.empty(rows, dtype=stats_dtype, device=x.device)
    if rows == 0:
        return y, rstd
    y2 = y.view(-1, n_cols)
    block, one_block, num_warps = _block_config(n_cols, max_one_block)
    _rms_norm_fwd_kernel[(rows,)](
        x2, weight, y2, rstd, n_cols, x2.stride(0), y2.stride(0), eps,
        BLOCK=block, ONE_BLOCK=one_block, ACC=_acc_dtype(x, weight), num_warps=num_warps,
    )
    return y, rstd


def _rms_norm_bwd_launch(dy, x, weight, rstd, max_one_block=MAX_ONE_BLOCK):
    """dy: [..., N]; x: the normalised input [..., N]; rstd: [rows].
    Returns (dx [..., N] in x's dtype, dweight [N] in weight's dtype)."""
    n_cols = x.shape[-1]
    dy2 = dy.reshape(-1, n_cols).contiguous()
    x2 = x.reshape(-1, n_cols).contiguous()
    rows = x2.shape[0]
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if rows == 0:
        return dx, torch.zeros_like(weight)
    # Enough programs to fill the GPU (a few per SM); each loops over its share of rows.
    programs = min(rows, 4 * _triton.multiprocessor_count(x.device))
    rows_per_program = triton.cdiv(rows, programs)
    programs = triton.cdiv(rows, rows_per_program)
    acc_dtype = torch.float64 if torch.float64 in (x.dtype, weight.dtype) else torch.float32
    dw_partial = torch.zeros(programs, n_cols, dtype=acc_dtype, device=x.device)
    block, one_block, num_warps = _block_config(n_cols, max_one_block)
    dx2 = dx.view(-1, n_cols)
    _rms_norm_bwd_kernel[(programs,)](
        dy2, x2, weight, rstd, dx2, dw_partial,
        rows, n_cols, rows_per_program,
        dy2.stride(0), x2.stride(0), dx2.stride(0),
        BLOCK=block, ONE_BLOCK=one_block, ACC=_acc_dtype(x, weight), num_warps=num_warps,
    )
    return dx, dw_partial.sum(0).to(weight.dtype)


# ---------------------------------------------------------------------------------------------
# Custom ops (opaque to torch.compile) and the autograd wrapper
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("idefics2_mini::rms_norm_fwd", mutates_args=())
def rms_norm_fwd_op(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton RMSNorm forward: (y [..., N], rstd [rows])."""
    _triton.check_runnable(x)
    return _rms_norm_fwd_launch(x, weight, eps)


@rms_norm_fwd_op.register_fake
def _(x, weight, eps):
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    stats_dtype = torch.float64 if torch.float64 in (x.dtype, weight.dtype) else torch.float32
    y = x.new_empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype))
    return y, x.new_empty(rows, dtype=stats_dtype)


@torch.library.custom_op("idefics2_mini::rms_norm_bwd", mutates_args=())
def rms_norm_bwd_op(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton RMSNorm backward: (dx [..., N], dweight [N])."""
    _triton.check_runnable(x)
    return _rms_norm_bwd_launch(dy, x, weight, rstd)


@rms_norm_bwd_op.register_fake
def _(dy, x, weight, rstd):
    return x.new_empty(x.shape), weight.new_empty(weight.shape)


class RMSNormFunction(torch.autograd.Function):
    """Autograd for the Triton RMSNorm: forward/backward are the two custom ops above."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        y, rstd = rms_norm_fwd_op(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, rstd = ctx.saved_tensors
        dx, dweight = rms_norm_bwd_op(dy, x, weight, rstd)
        return dx, dweight, None


def _triton_supports(x, weight) -> bool:
    """Shapes/dtypes the kernel handles; anything else falls back to the reference."""
    float_types = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    if x.dtype not in float_types or weight.dtype not in float_types or x.dim() == 0:
        return False
    return weight.dim() == 1 and weight.shape[0] == x.shape[-1] and weight.device == x.device


def rms_norm(x, weight, eps):
    """Dispatching RMSNorm (same signature and result as `rms_norm_reference`).

    x: [..., N]; weight: [N] -> y [..., N] (dtype: promote(weight, x)). The Triton path (see
    dispatch.py) has a Triton backward via `RMSNormFunction`; unusual inputs (a non-1-D weight)
    use the reference.
    """
    if use_triton(x) and _triton_supports(x, weight):
        _triton.check_runnable(x)
        return RMSNormFunction.apply(x, weight, float(eps))
    return rms_norm_reference(x, weight, eps)

"""Backward of the prefill attention (kernels/attention_prefill.py): dq, dk, dv in Triton.

Same layouts and masking rules as the forward (padded with an optional key padding mask, or
packed by cumulative lengths; causal with a sliding window, or not; GQA), same dtypes.

The math, per (sequence, query head), with P = softmax(S), S = scale * Q Kᵀ, O = P V and dO the
gradient of the output:

    dV = Pᵀ dO                      dP = dO Vᵀ
    dS = P ∘ (dP - delta)           delta_i = Σ_j P_ij dP_ij = dO_i · O_i
    dQ = scale * dS K               dK = scale * dSᵀ Q

FlashAttention-2 computes this without ever holding P: the forward saved each row's log-sum-exp
(lse), so any block of P is rebuilt as exp2(s - lse) from a block of scores. Three kernels:

1. `_attention_bwd_preprocess_kernel`: delta = rowsum(dO ∘ O), one fp32 per query row;
2. `_attention_bwd_dkdv_kernel`: one program per block of keys of one kv head. It keeps its
   K, V block and the dK, dV accumulators on chip and streams the query blocks that can see
   those keys. With GQA it also walks the `group` query heads sharing the kv head, so dK / dV
   are summed over them in registers: no atomics, no repeated K/V;
3. `_attention_bwd_dq_kernel`: one program per block of queries of one query head, streaming
   the visible key blocks exactly like the forward. A separate kernel (rather than atomics on
   dq from kernel 2) recomputes S and dP once more but is deterministic.

Rows that see no key have lse = +inf (set by the forward), so their P, hence all their
gradient contributions, are exactly 0.

Precision: every accumulator is fp32. As in the forward, P and dS are rounded to the inputs'
dtype just before they enter a tl.dot, so the matmuls run on tensor cores in 16 bit.
"""

from __future__ import annotations

import torch

from . import _triton
from ._triton import (LOG2_E, computable, dot_operand, query_block_range, key_block_range, sequence_rows, tl,
                      to_dtype, triton, visible)

# ---------------------------------------------------------------------------------------------
# Triton kernels
#
# Pointer conventions shared by the three kernels (as in the forward): every tensor is
# addressed as (batch b, head h, row) through a batch stride, a head stride and a row stride.
# The padded layout [B, H, L, D] uses its strides as they are; the packed layout [T, H, D] has
# batch stride 0 and adds the sequence's first row (from the cumulative lengths) to the row.
# lse and delta are [B, Hq, Lq] (padded) or [Hq, Tq] (packed), fp32, row stride 1.
# ---------------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _attention_bwd_preprocess_kernel(
        o_ptr, do_ptr, delta_ptr,
        so_b, so_h, so_m, sdo_b, sdo_h, sdo_m, sdelta_b, sdelta_h,
        n_rows, n_heads, head_dim,
        BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """delta[b, h, i] = Σ_d dO[b, h, i, d] * O[b, h, i, d] (fp32).

        o, do: [B, H, n_rows, D] by strides (the packed layout is one batch of Tq rows).
        Grid: (cdiv(n_rows, BLOCK_M), B * H)."""
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = (pid_bh // n_heads).to(tl.int64)
        h = (pid_bh % n_heads).to(tl.int64)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        row_in = offs_m < n_rows
        in_block = row_in[:, None] & (offs_d < head_dim)[None, :]
        o = tl.load(o_ptr + b * so_b + h * so_h + offs_m[:, None] * so_m + offs_d[None, :],
                    mask=in_block, other=0.0).to(tl.float32)
        do = tl.load(do_ptr + b * sdo_b + h * sdo_h + offs_m[:, None] * sdo_m + offs_d[None, :],
                     mask=in_block, other=0.0).to(tl.float32)
        tl.store(delta_ptr + b * sdelta_b + h * sdelta_h + offs_m, tl.sum(o * do, axis=1), mask=row_in)

    @triton.jit
    def _attention_bwd_dkdv_kernel(
        q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, kpm_ptr, cu_q_ptr, cu_k_ptr,
        sq_b, sq_h, sq_m, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, sdo_b, sdo_h, sdo_m,
        sdk_b, sdk_h, sdk_n, sdv_b, sdv_h, sdv_n, slse_b, slse_h, skpm_b,
        q_len_padded, k_len_padded, n_kv_heads, group, head_dim, qk_scale, sm_scale, window,
        VARLEN: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_KPM: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
    ):
        """dK, dV for BLOCK_N keys of one (sequence, kv head).

        Padded: q/do [B, Hq, Lq, D], k/v/dk/dv [B, Hkv, Lk, D], kpm [B, Lk] uint8 (1 = real key).
        Varlen: q/do [Tq, Hq, D], k/v/dk/dv [Tk, Hkv, D], cu_q/cu_k [B + 1] int32.
        Grid: (cdiv(max key length, BLOCK_N), B * Hkv).

        The program works on transposed scores sT = K Qᵀ [BLOCK_N, BLOCK_M], so that dV += Pᵀ dO
        and dK += dSᵀ Q are plain dots with the keys as rows.
        """
        pid_n = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // n_kv_heads
        kv_h = pid_bh % n_kv_heads
        q_start, q_len = sequence_rows(b, cu_q_ptr, q_len_padded, VARLEN)
        k_start, k_len = sequence_rows(b, cu_k_ptr, k_len_padded, VARLEN)
        start_n = pid_n * BLOCK_N
        if start_n >= k_len:
            return
        b64 = b.to(tl.int64)
        offs_n = start_n + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        key_in = offs_n < k_len
        d_in = offs_d < head_dim
        kv_block = key_in[:, None] & d_in[None, :]

        # This program's keys and values stay on chip for the whole walk over the queries.
        k = tl.load(k_ptr + b64 * sk_b + (k_start + offs_n[:, None]) * sk_n + kv_h.to(tl.int64) * sk_h
                    + offs_d[None, :], mask=kv_block, other=0.0)
        v = tl.load(v_ptr + b64 * sv_b + (k_start + offs_n[:, None]) * sv_n + kv_h.to(tl.int64) * sv_h
                    + offs_d[None, :], mask=kv_block, other=0.0)
        k = computable(k)
        v = computable(v)
        if HAS_KPM:
            real_key = tl.load(kpm_ptr + b64 * skpm_b + offs_n, mask=key_in, other=0) != 0

        lo, hi, full_lo, full_hi = query_block_range(start_n, q_len, k_len, window, CAUSAL, HAS_WINDOW,
                                                     BLOCK_M, BLOCK_N)
        partial_key_block = start_n + BLOCK_N > k_len
        dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        for g in range(0, group):
            h = (kv_h * group + g).to(tl.int64)
            q_base = q_ptr + b64 * sq_b + q_start * sq_m + h * sq_h
            do_base = do_ptr + b64 * sdo_b + q_start * sdo_m + h * sdo_h
            lse_base = lse_ptr + b64 * slse_b + q_start + h * slse_h
            delta_base = delta_ptr + b64 * slse_b + q_start + h * slse_h
            for start_m in range(lo, hi, BLOCK_M):
                offs_m = start_m + tl.arange(0, BLOCK_M)
                row_in = offs_m < q_len
                # Q is loaded transposed ([BLOCK_D, BLOCK_M]) so K @ Qᵀ is a plain dot.
                qt = tl.load(q_base + offs_m[None, :] * sq_m + offs_d[:, None],
                             mask=d_in[:, None] & row_in[None, :], other=0.0)
                do = tl.load(do_base + offs_m[:, None] * sdo_m + offs_d[None, :],
                             mask=row_in[:, None] & d_in[None, :], other=0.0)
                qt = computable(qt)
                do = computable(do)
                # Rows past the sequence get lse = +inf, hence P = 0.
                lse = tl.load(lse_base + offs_m, mask=row_in, other=float("inf"))
                delta = tl.load(delta_base + offs_m, mask=row_in, other=0.0)

                st = tl.dot(k, qt, input_precision=DOT_PRECISION) * qk_scale
                if (start_m < full_lo) | (start_m + BLOCK_M > full_hi) | partial_key_block:
                    seen = visible((offs_m + (k_len - q_len))[None, :], offs_n[:, None],
                                   key_in[:, None] & row_in[None, :], window, CAUSAL, HAS_WINDOW)
                    st = tl.where(seen, st, float("-inf"))
                if HAS_KPM:
                    st = tl.where(real_key[:, None], st, float("-inf"))
                pt = tl.exp2(st - lse[None, :])  # Pᵀ: the softmax probabilities, rebuilt

                dv += tl.dot(dot_operand(pt, v_ptr.dtype.element_ty), do, input_precision=DOT_PRECISION)
                dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
                dst = pt * (dpt - delta[None, :])
                dk += tl.dot(dot_operand(dst, q_ptr.dtype.element_ty), tl.trans(qt), input_precision=DOT_PRECISION)
        # S = scale * Q Kᵀ, so dK picks up the scale (the log2(e) of qk_scale only served exp2).
        dk = dk * sm_scale
        tl.store(dk_ptr + b64 * sdk_b + (k_start + offs_n[:, None]) * sdk_n + kv_h.to(tl.int64) * sdk_h
                 + offs_d[None, :], to_dtype(dk, dk_ptr.dtype.element_ty), mask=kv_block)
        tl.store(dv_ptr + b64 * sdv_b + (k_start + offs_n[:, None]) * sdv_n + kv_h.to(tl.int64) * sdv_h
                 + offs_d[None, :], to_dtype(dv, dv_ptr.dtype.element_ty), mask=kv_block)

    @triton.jit
    def _attention_bwd_dq_kernel(
        q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, kpm_ptr, cu_q_ptr, cu_k_ptr,
        sq_b, sq_h, sq_m, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, sdo_b, sdo_h, sdo_m,
        sdq_b, sdq_h, sdq_m, slse_b, slse_h, skpm_b,
        q_len_padded, k_len_padded, n_q_heads, group, head_dim, qk_scale, sm_scale, window,
        VARLEN: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_KPM: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
    ):
        """dQ for BLOCK_M query rows of one (sequence, query head); layouts as the dK/dV kernel,
        dq like q. Grid: (cdiv(max query length, BLOCK_M), B * Hq)."""
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // n_q_heads
        h = pid_bh % n_q_heads
        kv_h = (h // group).to(tl.int64)
        h = h.to(tl.int64)
        q_start, q_len = sequence_rows(b, cu_q_ptr, q_len_padded, VARLEN)
        k_start, k_len = sequence_rows(b, cu_k_ptr, k_len_padded, VARLEN)
        start_m = pid_m * BLOCK_M
        if start_m >= q_len:
            return
        b64 = b.to(tl.int64)
        k_base = k_ptr + b64 * sk_b + k_start * sk_n + kv_h * sk_h
        v_base = v_ptr + b64 * sv_b + k_start * sv_n + kv_h * sv_h
        offs_m = start_m + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        row_in = offs_m < q_len
        d_in = offs_d < head_dim
        q_block = row_in[:, None] & d_in[None, :]
        q_pos = offs_m + (k_len - q_len)

        q = tl.load(q_ptr + b64 * sq_b + (q_start + offs_m[:, None]) * sq_m + h * sq_h + offs_d[None, :],
                    mask=q_block, other=0.0)
        do = tl.load(do_ptr + b64 * sdo_b + (q_start + offs_m[:, None]) * sdo_m + h * sdo_h + offs_d[None, :],
                     mask=q_block, other=0.0)
        q = computable(q)
        do = computable(do)
        lse = tl.load(lse_ptr + b64 * slse_b + q_start + h * slse_h + offs_m, mask=row_in, other=float("inf"))
        delta = tl.load(delta_ptr + b64 * slse_b + q_start + h * slse_h + offs_m, mask=row_in, other=0.0)

        lo, hi, full_lo, full_hi = key_block_range(start_m, q_len, k_len, window, CAUSAL, HAS_WINDOW,
                                                   BLOCK_M, BLOCK_N)
        dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        for start_n in range(lo, hi, BLOCK_N):
            offs_kn = start_n + offs_n
            key_in = offs_kn < k_len
            # K and V transposed ([BLOCK_D, BLOCK_N]): S = Q Kᵀ and dP = dO Vᵀ are plain dots.
            kt = tl.load(k_base + offs_kn[None, :] * sk_n + offs_d[:, None],
                         mask=d_in[:, None] & key_in[None, :], other=0.0)
            vt = tl.load(v_base + offs_kn[None, :] * sv_n + offs_d[:, None],
                         mask=d_in[:, None] & key_in[None, :], other=0.0)
            kt = computable(kt)
            vt = computable(vt)
            s = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale
            if (start_n < full_lo) | (start_n + BLOCK_N > full_hi):
                seen = visible(q_pos[:, None], offs_kn[None, :], row_in[:, None] & key_in[None, :],
                               window, CAUSAL, HAS_WINDOW)
                s = tl.where(seen, s, float("-inf"))
            if HAS_KPM:
                real = tl.load(kpm_ptr + b64 * skpm_b + offs_kn, mask=key_in, other=0)
                s = tl.where(real[None, :] != 0, s, float("-inf"))
            p = tl.exp2(s - lse[:, None])
            dp = tl.dot(do, vt, input_precision=DOT_PRECISION)
            ds = p * (dp - delta[:, None])
            dq += tl.dot(dot_operand(ds, k_ptr.dtype.element_ty), tl.trans(kt), input_precision=DOT_PRECISION)
        dq = dq * sm_scale
        tl.store(dq_ptr + b64 * sdq_b + (q_start + offs_m[:, None]) * sdq_m + h * sdq_h + offs_d[None, :],
                 to_dtype(dq, dq_ptr.dtype.element_ty), mask=q_block)


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------


def _backward_block_sizes(head_dim_padded: int, dtype: torch.dtype, device: torch.device):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages), used by both the dK/dV and the dQ kernel.

    GPU: a program keeps two input blocks and two fp32 accumulators of [block, D] on chip (K, V,
    dK, dV, or Q, dO, dQ), twice the forward's state, so registers are the limit: 64 x 64
    blocks with 8 warps at D = 128 (4 warps at D <= 64), 32 x 32 with 8 warps for fp32 inputs
    or D > 128. ptxas for sm_90 reports no register spills for any of these (compiled ahead of
    time with the 16-byte alignment a contiguous launch gets), while 4 warps at D = 128 or
    larger fp32 blocks spill. Not yet timed against other sizes on a GPU.
    Interpreter: 16 x 16, as in the forward, so small test shapes span many blocks.
    """
    if device.type != "cuda" or _triton.interpreter_active():
        return 16, 16, 4, 1
    if dtype == torch.float32 or head_dim_padded > 128:
        return 32, 32, 8, 2
    return 64, 64, 8 if head_dim_padded > 64 else 4, 2


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _bhm_strides(t: torch.Tensor, varlen: bool) -> tuple[int, int, int]:
    """(batch, head, row) strides: [B, H, L, D] as is; packed [T, H, D] has no batch axis."""
    return (0, t.stride(1), t.stride(0)) if varlen else (t.stride(0), t.stride(1), t.stride(2))


def _launch_backward(grad_out, q, k, v, out, lse, dq, dk, dv, kpm, cu_q, cu_k, *, varlen, batch,
                     q_len, k_len, max_q_len, max_k_len, causal, window, scale, block_m, block_n):
    """Run the three kernels; dq, dk, dv are filled in place. Lengths are the padded ones
    (0 when varlen); max_*_len size the grids."""
    q_heads, kv_heads = q.shape[1], k.shape[1]  # [B, H, L, D] and [T, H, D] alike
    head_dim = q.shape[-1]
    group = q_heads // kv_heads
    block_d = max(16, _triton.next_power_of_2(head_dim))
    bm, bn, num_warps, num_stages = _backward_block_sizes(block_d, q.dtype, q.device)
    bm, bn = block_m or bm, block_n or bn
    scale = head_dim**-0.5 if scale is None else scale
    common = dict(VARLEN=varlen, CAUSAL=causal, HAS_WINDOW=window is not None, HAS_KPM=kpm is not None,
                  BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d,
                  DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
                  num_warps=num_warps, num_stages=num_stages)
    # lse (and delta, same layout) [B, Hq, Lq] or [Hq, Tq]: (batch, head) strides.
    lse_strides = (0, lse.stride(0)) if varlen else (lse.stride(0), lse.stride(1))
    kpm_arg = kpm if kpm is not None else q  # never read when HAS_KPM is off
    kpm_stride = kpm.stride(0) if kpm is not None else 0

    # 1. delta = rowsum(dO ∘ O). The packed layout is one "batch" of Tq rows.
    delta = torch.empty_like(lse)
    rows = out.shape[0] if varlen else q_len
    pre_batch = 1 if varlen else batch
    pre_block = 64 if q.is_cuda and not _triton.interpreter_active() else 16
    _attention_bwd_preprocess_kernel[(triton.cdiv(rows, pre_block), pre_batch * q_heads)](
        out, grad_out, delta, *_bhm_strides(out, varlen), *_bhm_strides(grad_out, varlen), *lse_strides,
        rows, q_heads, head_dim, BLOCK_M=pre_block, BLOCK_D=block_d, num_warps=4,
    )

    # 2. dK, dV: one program per (key block, sequence, kv head).
    _attention_bwd_dkdv_kernel[(triton.cdiv(max(max_k_len, 1), bn), batch * kv_heads)](
        q, k, v, grad_out, lse, delta, dk, dv, kpm_arg, cu_q, cu_k,
        *_bhm_strides(q, varlen), *_bhm_strides(k, varlen), *_bhm_strides(v, varlen),
        *_bhm_strides(grad_out, varlen), *_bhm_strides(dk, varlen), *_bhm_strides(dv, varlen),
        *lse_strides, kpm_stride,
        q_len, k_len, kv_heads, group, head_dim, scale * LOG2_E, scale, window or 0, **common,
    )

    # 3. dQ: one program per (query block, sequence, query head).
    _attention_bwd_dq_kernel[(triton.cdiv(max(max_q_len, 1), bm), batch * q_heads)](
        q, k, v, grad_out, lse, delta, dq, kpm_arg, cu_q, cu_k,
        *_bhm_strides(q, varlen), *_bhm_strides(k, varlen), *_bhm_strides(v, varlen),
        *_bhm_strides(grad_out, varlen), *_bhm_strides(dq, varlen), *lse_strides, kpm_stride,
        q_len, k_len, q_heads, group, head_dim, scale * LOG2_E, scale, window or 0, **common,
    )


def attention_backward_triton(grad_out, q, k, v, out, lse, *, causal=False, window=None,
                              key_padding_mask=None, scale=None, block_m=None, block_n=None):
    """Gradients of `attention_triton` (padded layout) with respect to q, k, v.

    grad_out, q, out: [B, Hq, Lq, D]; k, v: [B, Hkv, Lk, D]; lse: [B, Hq, Lq] fp32 from
    `attention_triton(..., return_lse=True)`, whose out must be passed too; key_padding_mask:
    [B, Lk] bool. Returns (dq [B, Hq, Lq, D], dk, dv [B, Hkv, Lk, D]) in the inputs' dtypes.
    block_m / block_n override the block sizes (tests).
    """
    batch, q_heads, q_len, _ = q.shape
    kv_heads, k_len = k.shape[1], k.shape[2]
    grad_out, q, k, v, out = (_last_dim_contiguous(t) for t in (grad_out, q, k, v, out))
    dq, dk, dv = (torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))
    if q.numel() == 0 or k.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    kpm = None
    if key_padding_mask is not None:
        kpm = key_padding_mask.to(device=q.device, dtype=torch.bool).contiguous().view(torch.uint8)
    _launch_backward(grad_out, q, k, v, out, lse.contiguous(), dq, dk, dv, kpm, q, q, varlen=False,
                     batch=batch, q_len=q_len, k_len=k_len, max_q_len=q_len, max_k_len=k_len,
                     causal=causal, window=window, scale=scale, block_m=block_m, block_n=block_n)
    return dq, dk, dv


def attention_varlen_backward_triton(grad_out, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, *,
                                     max_seqlen_q=None, max_seqlen_k=None, causal=False, window=None,
                                     scale=None, block_m=None, block_n=None):
    """Gradients of `attention_varlen_triton` (packed layout) with respect to q, k, v.

    grad_out, q, out: [Tq, Hq, D]; k, v: [Tk, Hkv, D]; lse: [Hq, Tq] fp32 from
    `attention_varlen_triton(..., return_lse=True)`; cu_seqlens_q, cu_seqlens_k: [B + 1] int32.
    max_seqlen_* size the grids (computed from the cumulative lengths, one device sync each,
    when None). Returns (dq [Tq, Hq, D], dk, dv [Tk, Hkv, D]); rows outside every sequence get 0.
    """
    batch = cu_seqlens_q.shape[0] - 1
    grad_out, q, k, v, out = (_last_dim_contiguous(t) for t in (grad_out, q, k, v, out))
    # Zero-filled: rows that belong to no sequence are never written by the kernels.
    dq, dk, dv = (torch.zeros(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))
    if q.numel() == 0 or k.numel() == 0 or batch <= 0:
        return dq, dk, dv
    cu_q = cu_seqlens_q.to(device=q.device, dtype=torch.int32).contiguous()
    cu_k = cu_seqlens_k.to(device=q.device, dtype=torch.int32).contiguous()
    if max_seqlen_q is None:
        max_seqlen_q = int((cu_q[1:] - cu_q[:-1]).max().item())
    if max_seqlen_k is None:
        max_seqlen_k = int((cu_k[1:] - cu_k[:-1]).max().item())
    _launch_backward(grad_out, q, k, v, out, lse.contiguous(), dq, dk, dv, None, cu_q, cu_k, varlen=True,
                     batch=batch, q_len=0, k_len=0, max_q_len=max_seqlen_q, max_k_len=max_seqlen_k,
                     causal=causal, window=window, scale=scale, block_m=block_m, block_n=block_n)
    return dq, dk, dv

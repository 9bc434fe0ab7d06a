"""Attention over a whole prompt (prefill), for the vision tower, the perceiver and the decoder.

Two layouts:
- padded: q [B, Hq, Lq, D], k/v [B, Hkv, Lk, D] with an optional key padding mask;
- packed ("varlen"): sequences concatenated along one axis, q [Tq, Hq, D], k/v [Tk, Hkv, D],
  with cumulative lengths cu_seqlens_q / cu_seqlens_k [B + 1] (int32).

Masking rules shared by both:
- GQA: query head h reads kv head h // (Hq // Hkv); K/V are never copied per query head.
- causal: queries are aligned to the *end* of the keys (query i of a length-Lq block sits at
  key position p = i + Lk - Lq) and see keys j <= p;
- window W (with causal): additionally j > p - W, i.e. the W most recent keys including itself;
- a query that sees no key at all (e.g. a left-padding query) outputs zeros, never NaN.

The Triton kernel `_attention_fwd_kernel` serves both layouts (strides + optional cumulative
lengths). Its backward (dq, dk, dv; FlashAttention-2's three kernels) is in
kernels/attention_backward.py. Both are registered as torch custom ops (opaque to torch.compile):
- inference: `idefics2_mini::attention_fwd` / `attention_varlen_fwd` (the output only);
- training: `idefics2_mini::attention_fwd_lse` / `attention_varlen_fwd_lse` also return each
  row's log-sum-exp, which `idefics2_mini::attention_bwd` / `attention_varlen_bwd` consume;
  `AttentionFunction` / `AttentionVarlenFunction` (torch.autograd.Function) tie them together.
The dispatching functions `attention` / `attention_varlen` take the Triton path when
`use_triton(q)` says so (see dispatch.py): the training pair when q, k or v needs a gradient,
else the inference op; otherwise the torch reference.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from . import _triton
from ._triton import (LOG2_E, computable, key_block_range, online_softmax_step, sequence_rows, tl,
                      to_dtype, triton, visible)
from .attention_backward import attention_backward_triton, attention_varlen_backward_triton
from .dispatch import use_triton


def visible_keys_mask(
    query_len: int,
    key_len: int,
    *,
    causal: bool,
    window: int | None,
    device: torch.device | str | None = None,
) -> torch.Tensor | None:
    """Bool [Lq, Lk]: True where query i may see key j (None when every key is visible)."""
    if not causal:
        if window is not None:
            raise ValueError("a sliding window needs causal=True")
        return None
    query_pos = torch.arange(query_len, device=device)[:, None] + (key_len - query_len)
    key_pos = torch.arange(key_len, device=device)[None, :]
    visible = key_pos <= query_pos
    if window is not None:
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        visible &= key_pos > query_pos - window
    return visible


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    window: int | None = None,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Padded-layout attention.

    q: [B, Hq, Lq, D]; k, v: [B, Hkv, Lk, D]; key_padding_mask: [B, Lk] bool (True = real key).
    Returns [B, Hq, Lq, D] in q's dtype.
    """
    batch, q_heads, query_len, _ = q.shape
    kv_heads, key_len = k.shape[1], k.shape[2]
    if q_heads % kv_heads != 0:
        raise ValueError(f"query heads ({q_heads}) must be a multiple of kv heads ({kv_heads})")
    mask = visible_keys_mask(query_len, key_len, causal=causal, window=window, device=q.device)
    if key_padding_mask is not None:
        padding = key_padding_mask.to(torch.bool)[:, None, None, :]  # [B, 1, 1, Lk]
        mask = padding if mask is None else (mask[None, None] & padding)
    any_visible = None
    if mask is not None:
        mask = mask.expand(batch, 1, query_len, key_len)
        any_visible = mask.any(-1, keepdim=True)  # [B, 1, Lq, 1]
        # A row with no visible key would be NaN in softmax; let it see everything, zero it after.
        mask = mask | ~any_visible
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, scale=scale, enable_gqa=q_heads != kv_heads
    )
    if any_visible is not None:
        out = out.masked_fill(~any_visible, 0.0)
    return out


def attention_varlen_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    *,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    causal: bool = False,
    window: int | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Packed-layout attention: each sequence attends within itself only.

    q: [Tq, Hq, D]; k, v: [Tk, Hkv, D]; cu_seqlens_q, cu_seqlens_k: [B + 1] int (cumulative
    lengths starting at 0; a sequence may be empty). max_seqlen_* are hints for kernels and
    unused here. Returns [Tq, Hq, D].
    """
    out = q.new_zeros(q.shape)
    starts_q, starts_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for b in range(len(starts_q) - 1):
        q0, q1, k0, k1 = starts_q[b], starts_q[b + 1], starts_k[b], starts_k[b + 1]
        if q1 == q0:
            continue
        if k1 == k0:
            continue  # no keys: stays zero, like a fully masked row
        seq_out = attention_reference(
            q[q0:q1].transpose(0, 1)[None],
            k[k0:k1].transpose(0, 1)[None],
            v[k0:k1].transpose(0, 1)[None],
            causal=causal,
            window=window,
            scale=scale,
        )
        out[q0:q1] = seq_out[0].transpose(0, 1)
    return out



# ---------------------------------------------------------------------------------------------
# Triton kernel: flash attention forward (online softmax, O(N) memory)
#
# Program (pid_m, pid_bh) computes BLOCK_M query rows of one (sequence, query head). It walks
# the sequence's keys in blocks of BLOCK_N, keeping per row a running max m, a running sum l
# and an unnormalised output acc (all fp32). When a new block raises the max from m to m',
# the old sum and output were computed with exp(s - m) and must be rescaled by exp(m - m') —
# that is the "online softmax". Scores are pre-multiplied by log2(e) so the kernel can use
# exp2 (one instruction on the GPU).
#
# Masking is done per block: the key range [lo, hi) (`key_block_range`) already skips blocks
# that are fully masked by causality or the sliding window, and inside that range the
# positional mask is only built for boundary blocks (a block fully visible to every row of
# the query block skips it).
#
# Head dims 72 and 96 are not powers of two, but `tl.arange` (hence a block) must be: the head
# dim is padded to BLOCK_D (128) with masked loads that read zeros. Zero columns add nothing
# to q·k, and the padded output columns are never stored.
#
# GQA: query head h reads kv head h // group through the strides: K/V are never copied.
#
# Training: with STORE_LSE the kernel also writes each row's log-sum-exp, m + log2(l) (base 2,
# in units of the scaled scores), which is all the backward needs to rebuild the softmax
# probabilities block by block (kernels/attention_backward.py). Inference launches leave the
# flag off: no extra store, no extra buffer.
# ---------------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _attention_fwd_kernel(
        q_ptr, k_ptr, v_ptr, o_ptr, kpm_ptr, cu_q_ptr, cu_k_ptr, lse_ptr,
        sq_b, sq_h, sq_m, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, so_b, so_h, so_m, skpm_b, slse_b, slse_h,
        q_len_padded, k_len_padded, n_q_heads, group, head_dim, qk_scale, window,
        VARLEN: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
        HAS_KPM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr, STORE_LSE: tl.constexpr = False,
    ):
        """Padded: q/o [B, Hq, Lq, D], k/v [B, Hkv, Lk, D], kpm [B, Lk] uint8 (1 = real key),
        lse [B, Hq, Lq] fp32. Varlen: q/o [Tq, Hq, D], k/v [Tk, Hkv, D], cu_q/cu_k [B + 1]
        int32, lse [Hq, Tq] fp32 (batch strides 0). Grid: (cdiv(max query length, BLOCK_M), B * Hq)."""
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // n_q_heads
        h = pid_bh % n_q_heads
        kv_h = h // group
        q_start, q_len = sequence_rows(b, cu_q_ptr, q_len_padded, VARLEN)
        k_start, k_len = sequence_rows(b, cu_k_ptr, k_len_padded, VARLEN)
        # Programs past the end of a short sequence (the grid covers the longest) do nothing.
        if pid_m * BLOCK_M >= q_len:
            return
        b64 = b.to(tl.int64)
        q_base = q_ptr + b64 * sq_b + q_start * sq_m + h.to(tl.int64) * sq_h
        o_base = o_ptr + b64 * so_b + q_start * so_m + h.to(tl.int64) * so_h
        k_base = k_ptr + b64 * sk_b + k_start * sk_n + kv_h.to(tl.int64) * sk_h
        v_base = v_ptr + b64 * sv_b + k_start * sv_n + kv_h.to(tl.int64) * sv_h

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        d_in = offs_d < head_dim
        row_in = offs_m < q_len
        q_pos = offs_m + (k_len - q_len)

        q = tl.load(q_base + offs_m[:, None] * sq_m + offs_d[None, :],
                    mask=row_in[:, None] & d_in[None, :], other=0.0)
        q = computable(q)

        lo, hi, full_lo, full_hi = key_block_range(pid_m * BLOCK_M, q_len, k_len, window, CAUSAL, HAS_WINDOW,
                                                   BLOCK_M, BLOCK_N)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        for start_n in range(lo, hi, BLOCK_N):
            offs_kn = start_n + offs_n
            key_in = offs_kn < k_len
            # K is loaded transposed ([BLOCK_D, BLOCK_N]) so q @ kT is a plain dot.
            kt = tl.load(k_base + offs_kn[None, :] * sk_n + offs_d[:, None],
                         mask=d_in[:, None] & key_in[None, :], other=0.0)
            kt = computable(kt)
            s = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale
            if (start_n < full_lo) | (start_n + BLOCK_N > full_hi):
                seen = visible(q_pos[:, None], offs_kn[None, :], row_in[:, None] & key_in[None, :],
                               window, CAUSAL, HAS_WINDOW)
                s = tl.where(seen, s, float("-inf"))
            if HAS_KPM:
                real = tl.load(kpm_ptr + b64 * skpm_b + offs_kn, mask=key_in, other=0)
                s = tl.where(real[None, :] != 0, s, float("-inf"))
            v = tl.load(v_base + offs_kn[:, None] * sv_n + offs_d[None, :],
                        mask=key_in[:, None] & d_in[None, :], other=0.0)
            m_i, l_i, acc = online_softmax_step(s, v, m_i, l_i, acc, v_ptr.dtype.element_ty, DOT_PRECISION)
        # Rows that saw no key (l = 0) output zeros, like the reference.
        l_safe = tl.where(l_i == 0.0, 1.0, l_i)
        out = acc / l_safe[:, None]
        tl.store(o_base + offs_m[:, None] * so_m + offs_d[None, :],
                 to_dtype(out, o_ptr.dtype.element_ty), mask=row_in[:, None] & d_in[None, :])
        if STORE_LSE:
            # +inf for a row that saw no key: the backward's exp2(s - lse) is then 0 for every
            # key, so the row gets zero gradients instead of NaN.
            lse = tl.where(l_i == 0.0, float("inf"), m_i + tl.log2(l_safe))
            lse_base = lse_ptr + b64 * slse_b + q_start + h.to(tl.int64) * slse_h
            tl.store(lse_base + offs_m, lse, mask=row_in)


def _block_sizes(head_dim_padded: int, dtype: torch.dtype, device: torch.device):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages).

    GPU: 128 query rows x 64 keys per step with 8 warps, 3 pipeline stages keeps the tensor
    cores busy on an H100 while q (128 x 128) plus double-buffered K/V blocks fit in shared
    memory; fp32 inputs take twice the bytes, so their blocks are halved.
    Interpreter: 16 x 16, the smallest tl.dot shape, so short test sequences still exercise
    many blocks, boundary masks and skipped blocks.
    """
    if device.type != "cuda" or _triton.interpreter_active():
        return 16, 16, 4, 1
    if dtype == torch.float32 or head_dim_padded > 128:
        return 64, 32, 4, 2
    if head_dim_padded <= 64:
        return 128, 64, 4, 3
    return 128, 64, 8, 3


def _launch(q, k, v, out, kpm, cu_q, cu_k, lse, strides, q_len, k_len, grid_m, batch, *,
            varlen, causal, window, scale, head_dim, block_m=None, block_n=None):
    q_heads = strides["q_heads"]
    group = q_heads // strides["kv_heads"]
    block_d = max(16, _triton.next_power_of_2(head_dim))
    bm, bn, num_warps, num_stages = _block_sizes(block_d, q.dtype, q.device)
    bm, bn = block_m or bm, block_n or bn
    scale = head_dim**-0.5 if scale is None else scale
    grid = (triton.cdiv(max(grid_m, 1), bm), batch * q_heads)
    _attention_fwd_kernel[grid](
        q, k, v, out, kpm, cu_q, cu_k, q if lse is None else lse, *strides["values"],
        q_len, k_len, q_heads, group, head_dim, scale * LOG2_E, window or 0,
        VARLEN=varlen, CAUSAL=causal, HAS_WINDOW=window is not None,
        HAS_KPM=strides["has_kpm"], BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        STORE_LSE=lse is not None, num_warps=num_warps, num_stages=num_stages,
    )
    return out


def _check_masking(causal: bool, window: int | None) -> None:
    if window is not None:
        if not causal:
            raise ValueError("a sliding window needs causal=True")
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def attention_triton(q, k, v, *, causal=False, window=None, key_padding_mask=None, scale=None,
                     block_m=None, block_n=None, return_lse=False):
    """Triton padded-layout attention; same contract as `attention_reference`.

    q: [B, Hq, Lq, D]; k, v: [B, Hkv, Lk, D] (any strides with unit stride on D, e.g. a
    transposed [B, L, H, D] view); key_padding_mask: [B, Lk] bool. Returns [B, Hq, Lq, D], or
    with return_lse (training) (out, lse [B, Hq, Lq] fp32): each row's log2-sum-exp2 of its
    scaled scores (scale * log2(e) * q·k), +inf for a row that sees no key.
    block_m / block_n override the block sizes (tests).
    """
    _check_masking(causal, window)
    batch, q_heads, q_len, head_dim = q.shape
    kv_heads, k_len = k.shape[1], k.shape[2]
    if q_heads % kv_heads != 0:
        raise ValueError(f"query heads ({q_heads}) must be a multiple of kv heads ({kv_heads})")
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, q_heads, q_len), dtype=torch.float32, device=q.device) if return_lse else None
    if out.numel() == 0 or k_len == 0:
        out.zero_()
        if lse is not None:
            lse.fill_(float("inf"))
        return (out, lse) if return_lse else out
    kpm = None
    if key_padding_mask is not None:
        kpm = key_padding_mask.to(device=q.device, dtype=torch.bool).contiguous().view(torch.uint8)
    # Inference launches pass lse strides 0: a constant, so they add no compiled variants
    # (Triton specialises integer arguments on their value's divisibility).
    strides = {
        "q_heads": q_heads, "kv_heads": kv_heads, "has_kpm": kpm is not None,
        "values": (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                   v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1),
                   out.stride(2), kpm.stride(0) if kpm is not None else 0,
                   *((lse.stride(0), lse.stride(1)) if return_lse else (0, 0))),
    }
    # Unused pointer arguments get q (never dereferenced: their constexpr flag is off).
    kpm_arg = kpm if kpm is not None else q
    _launch(q, k, v, out, kpm_arg, q, q, lse, strides, q_len, k_len, q_len, batch,
            varlen=False, causal=causal, window=window, scale=scale, head_dim=head_dim,
            block_m=block_m, block_n=block_n)
    return (out, lse) if return_lse else out


def attention_varlen_triton(q, k, v, cu_seqlens_q, cu_seqlens_k, *, max_seqlen_q=None,
                            max_seqlen_k=None, causal=False, window=None, scale=None,
                            block_m=None, block_n=None, return_lse=False):
    """Triton packed-layout attention; same contract as `attention_varlen_reference`.

    q: [Tq, Hq, D]; k, v: [Tk, Hkv, D]; cu_seqlens_q, cu_seqlens_k: [B + 1] int32.
    max_seqlen_q sizes the grid (computed from cu_seqlens_q, one device sync, when None).
    Returns [Tq, Hq, D], or with return_lse (out, lse [Hq, Tq] fp32) as `attention_triton`.
    """
    _check_masking(causal, window)
    q_heads, head_dim = q.shape[1], q.shape[2]
    kv_heads = k.shape[1]
    if q_heads % kv_heads != 0:
        raise ValueError(f"query heads ({q_heads}) must be a multiple of kv heads ({kv_heads})")
    batch = cu_seqlens_q.shape[0] - 1
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    out = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
    # Rows outside every sequence are never visited: +inf gives them zero gradients.
    lse = (torch.full((q_heads, q.shape[0]), float("inf"), dtype=torch.float32, device=q.device)
           if return_lse else None)
    if out.numel() == 0 or batch <= 0:
        return (out, lse) if return_lse else out
    cu_q = cu_seqlens_q.to(device=q.device, dtype=torch.int32).contiguous()
    cu_k = cu_seqlens_k.to(device=q.device, dtype=torch.int32).contiguous()
    if max_seqlen_q is None:
        max_seqlen_q = int((cu_q[1:] - cu_q[:-1]).max().item())
    strides = {
        "q_heads": q_heads, "kv_heads": kv_heads, "has_kpm": False,
        "values": (0, q.stride(1), q.stride(0), 0, k.stride(1), k.stride(0),
                   0, v.stride(1), v.stride(0), 0, out.stride(1), out.stride(0), 0,
                   0, lse.stride(0) if return_lse else 0),
    }
    _launch(q, k, v, out, q, cu_q, cu_k, lse, strides, 0, 0, max_seqlen_q, batch,
            varlen=True, causal=causal, window=window, scale=scale, head_dim=head_dim,
            block_m=block_m, block_n=block_n)
    return (out, lse) if return_lse else out


# ---------------------------------------------------------------------------------------------
# Custom ops (so torch.compile sees one opaque call each way), autograd, and the dispatching
# functions.
#
# Inference calls `attention_fwd` / `attention_varlen_fwd` (no LSE written). When a gradient is
# needed, `AttentionFunction` / `AttentionVarlenFunction` call the `*_fwd_lse` ops, save q, k,
# v, the output and the LSE, and their backward calls `attention_bwd` / `attention_varlen_bwd`
# (kernels/attention_backward.py). Masks and cumulative lengths get no gradient.
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("idefics2_mini::attention_fwd", mutates_args=())
def attention_fwd_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, window: Optional[int],
    key_padding_mask: Optional[torch.Tensor], scale: Optional[float],
) -> torch.Tensor:
    _triton.check_runnable(q)
    return attention_triton(q, k, v, causal=causal, window=window,
                            key_padding_mask=key_padding_mask, scale=scale)


@attention_fwd_op.register_fake
def _(q, k, v, causal, window, key_padding_mask, scale):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


@torch.library.custom_op("idefics2_mini::attention_varlen_fwd", mutates_args=())
def attention_varlen_fwd_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor, max_seqlen_q: Optional[int], max_seqlen_k: Optional[int],
    causal: bool, window: Optional[int], scale: Optional[float],
) -> torch.Tensor:
    _triton.check_runnable(q)
    return attention_varlen_triton(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=max_seqlen_q,
                                   max_seqlen_k=max_seqlen_k, causal=causal, window=window,
                                   scale=scale)


@attention_varlen_fwd_op.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, window, scale):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


@torch.library.custom_op("idefics2_mini::attention_fwd_lse", mutates_args=())
def attention_fwd_lse_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, window: Optional[int],
    key_padding_mask: Optional[torch.Tensor], scale: Optional[float],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Training forward, padded: (out [B, Hq, Lq, D], lse [B, Hq, Lq] fp32)."""
    _triton.check_runnable(q)
    return attention_triton(q, k, v, causal=causal, window=window, key_padding_mask=key_padding_mask,
                            scale=scale, return_lse=True)


@attention_fwd_lse_op.register_fake
def _(q, k, v, causal, window, key_padding_mask, scale):
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    return out, q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("idefics2_mini::attention_varlen_fwd_lse", mutates_args=())
def attention_varlen_fwd_lse_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor, max_seqlen_q: Optional[int], max_seqlen_k: Optional[int],
    causal: bool, window: Optional[int], scale: Optional[float],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Training forward, packed: (out [Tq, Hq, D], lse [Hq, Tq] fp32)."""
    _triton.check_runnable(q)
    return attention_varlen_triton(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=max_seqlen_q,
                                   max_seqlen_k=max_seqlen_k, causal=causal, window=window,
                                   scale=scale, return_lse=True)


@attention_varlen_fwd_lse_op.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, window, scale):
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    return out, q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


@torch.library.custom_op("idefics2_mini::attention_bwd", mutates_args=())
def attention_bwd_op(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
    lse: torch.Tensor, causal: bool, window: Optional[int], key_padding_mask: Optional[torch.Tensor],
    scale: Optional[float],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward, padded: (dq [B, Hq, Lq, D], dk, dv [B, Hkv, Lk, D])."""
    _triton.check_runnable(q)
    return attention_backward_triton(grad_out, q, k, v, out, lse, causal=causal, window=window,
                                     key_padding_mask=key_padding_mask, scale=scale)


@attention_bwd_op.register_fake
def _(grad_out, q, k, v, out, lse, causal, window, key_padding_mask, scale):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))


@torch.library.custom_op("idefics2_mini::attention_varlen_bwd", mutates_args=())
def attention_varlen_bwd_op(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
    lse: torch.Tensor, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
    max_seqlen_q: Optional[int], max_seqlen_k: Optional[int], causal: bool, window: Optional[int],
    scale: Optional[float],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward, packed: (dq [Tq, Hq, D], dk, dv [Tk, Hkv, D])."""
    _triton.check_runnable(q)
    return attention_varlen_backward_triton(grad_out, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k,
                                            max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k,
                                            causal=causal, window=window, scale=scale)


@attention_varlen_bwd_op.register_fake
def _(grad_out, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal,
      window, scale):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))


class AttentionFunction(torch.autograd.Function):
    """Autograd for the Triton padded-layout attention (gradients to q, k, v)."""

    @staticmethod
    def forward(ctx, q, k, v, causal, window, key_padding_mask, scale):
        out, lse = attention_fwd_lse_op(q, k, v, causal, window, key_padding_mask, scale)
        ctx.save_for_backward(q, k, v, out, lse, key_padding_mask)
        ctx.causal, ctx.window, ctx.scale = causal, window, scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, key_padding_mask = ctx.saved_tensors
        dq, dk, dv = attention_bwd_op(grad_out, q, k, v, out, lse, ctx.causal, ctx.window,
                                      key_padding_mask, ctx.scale)
        return dq, dk, dv, None, None, None, None


class AttentionVarlenFunction(torch.autograd.Function):
    """Autograd for the Triton packed-layout attention (gradients to q, k, v)."""

    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, window, scale):
        out, lse = attention_varlen_fwd_lse_op(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                               max_seqlen_k, causal, window, scale)
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k)
        ctx.max_seqlen_q, ctx.max_seqlen_k = max_seqlen_q, max_seqlen_k
        ctx.causal, ctx.window, ctx.scale = causal, window, scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k = ctx.saved_tensors
        dq, dk, dv = attention_varlen_bwd_op(grad_out, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k,
                                             ctx.max_seqlen_q, ctx.max_seqlen_k, ctx.causal, ctx.window,
                                             ctx.scale)
        return dq, dk, dv, None, None, None, None, None, None, None


def _triton_ok(q, k, v) -> bool:
    """The kernels cover fp16/bf16/fp32 (forward and backward) with head dim <= 256; other
    dtypes go to the reference."""
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return False
    if not (q.dtype == k.dtype == v.dtype) or q.shape[-1] > 256 or q.shape[-1] != v.shape[-1]:
        return False
    return use_triton(q)


def _needs_grad(q, k, v) -> bool:
    return torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)


def attention(q, k, v, *, causal=False, window=None, key_padding_mask=None, scale=None):
    """Dispatching padded-layout attention (same signature and result as `attention_reference`).

    q: [B, Hq, Lq, D]; k, v: [B, Hkv, Lk, D]; key_padding_mask: [B, Lk] bool. -> [B, Hq, Lq, D].
    On the Triton path a needed gradient runs the Triton backward (`AttentionFunction`).
    """
    if _triton_ok(q, k, v):
        _triton.check_runnable(q)
        if _needs_grad(q, k, v):
            return AttentionFunction.apply(q, k, v, bool(causal), window, key_padding_mask, scale)
        return attention_fwd_op(q, k, v, bool(causal), window, key_padding_mask, scale)
    return attention_reference(
        q, k, v, causal=causal, window=window, key_padding_mask=key_padding_mask, scale=scale
    )


def attention_varlen(
    q, k, v, cu_seqlens_q, cu_seqlens_k, *, max_seqlen_q=None, max_seqlen_k=None,
    causal=False, window=None, scale=None,
):
    """Dispatching packed-layout attention (same signature and result as the reference).

    q: [Tq, Hq, D]; k, v: [Tk, Hkv, D]; cu_seqlens_q, cu_seqlens_k: [B + 1] int32 -> [Tq, Hq, D].
    On the Triton path a needed gradient runs the Triton backward (`AttentionVarlenFunction`).
    """
    if _triton_ok(q, k, v):
        _triton.check_runnable(q)
        if _needs_grad(q, k, v):
            return AttentionVarlenFunction.apply(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                                 max_seqlen_k, bool(causal), window, scale)
        return attention_varlen_fwd_op(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                       max_seqlen_k, bool(causal), window, scale)
    return attention_varlen_reference(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=max_seqlen_q,
        max_seqlen_k=max_seqlen_k, causal=causal, window=window, scale=scale,
    )

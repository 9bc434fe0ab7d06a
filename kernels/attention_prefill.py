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
lengths); its launcher is registered as the torch custom ops `idefics2_mini::attention_fwd` and
`idefics2_mini::attention_varlen_fwd` (opaque to torch.compile). It is forward-only: when a
gradient is needed the dispatching functions use the reference (which autograd differentiates).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from . import _triton
from ._triton import online_softmax_step, tl, to_dtype, triton
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
# Masking is done per block: the launcher-independent key range [lo, hi) already skips blocks
# that are fully masked by causality or the sliding window, and inside that range the
# positional mask is only built for boundary blocks (a block fully visible to every row of
# the query block skips it).
#
# Head dims 72 and 96 are not powers of two, but `tl.arange` (hence a block) must be: the head
# dim is padded to BLOCK_D (128) with masked loads that read zeros. Zero columns add nothing
# to q·k, and the padded output columns are never stored.
#
# GQA: query head h reads kv head h // group through the strides: K/V are never copied.
# ---------------------------------------------------------------------------------------------

LOG2_E = 1.4426950408889634

if triton is not None:

    @triton.jit
    def _attention_fwd_kernel(
        q_ptr, k_ptr, v_ptr, o_ptr, kpm_ptr, cu_q_ptr, cu_k_ptr,
        sq_b, sq_h, sq_m, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, so_b, so_h, so_m, skpm_b,
        q_len_padded, k_len_padded, n_q_heads, group, head_dim, qk_scale, window,
        VARLEN: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
        HAS_KPM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_BF16: tl.constexpr,
        FIX_BF16: tl.constexpr,
    ):
        """Padded: q/o [B, Hq, Lq, D], k/v [B, Hkv, Lk, D], kpm [B, Lk] uint8 (1 = real key).
        Varlen: q/o [Tq, Hq, D], k/v [Tk, Hkv, D], cu_q/cu_k [B + 1] int32 (batch strides 0).
        Grid: (cdiv(max query length, BLOCK_M), B * Hq)."""
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // n_q_heads
        h = pid_bh % n_q_heads
        kv_h = h // group
        if VARLEN:
            q_start = tl.load(cu_q_ptr + b)
            q_len = tl.load(cu_q_ptr + b + 1) - q_start
            k_start = tl.load(cu_k_ptr + b)
            k_len = tl.load(cu_k_ptr + b + 1) - k_start
            q_off = q_start.to(tl.int64) * sq_m
            o_off = q_start.to(tl.int64) * so_m
            k_off = k_start.to(tl.int64) * sk_n
            v_off = k_start.to(tl.int64) * sv_n
        else:
            q_len = q_len_padded
            k_len = k_len_padded
            q_off = b.to(tl.int64) * sq_b
            o_off = b.to(tl.int64) * so_b
            k_off = b.to(tl.int64) * sk_b
            v_off = b.to(tl.int64) * sv_b
        # Programs past the end of a short sequence (the grid covers the longest) do nothing.
        if pid_m * BLOCK_M >= q_len:
            return
        q_base = q_ptr + q_off + h.to(tl.int64) * sq_h
        o_base = o_ptr + o_off + h.to(tl.int64) * so_h
        k_base = k_ptr + k_off + kv_h.to(tl.int64) * sk_h
        v_base = v_ptr + v_off + kv_h.to(tl.int64) * sv_h

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        d_in = offs_d < head_dim
        row_in = offs_m < q_len
        # Causal alignment: query i sits at key position i + (Lk - Lq).
        q_pos = offs_m + (k_len - q_len)

        q = tl.load(q_base + offs_m[:, None] * sq_m + offs_d[None, :],
                    mask=row_in[:, None] & d_in[None, :], other=0.0)
        if UPCAST_BF16:
            q = q.to(tl.float32)

        # Key range that can hold a visible key for some row of this block, and the sub-range
        # [full_lo, full_hi) visible to every row (no positional mask needed there).
        first_pos = pid_m * BLOCK_M + (k_len - q_len)
        last_pos = tl.minimum(pid_m * BLOCK_M + BLOCK_M, q_len) - 1 + (k_len - q_len)
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

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        for start_n in range(lo, hi, BLOCK_N):
            offs_kn = start_n + offs_n
            key_in = offs_kn < k_len
            # K is loaded transposed ([BLOCK_D, BLOCK_N]) so q @ kT is a plain dot.
            kt = tl.load(k_base + offs_kn[None, :] * sk_n + offs_d[:, None],
                         mask=d_in[:, None] & key_in[None, :], other=0.0)
            if UPCAST_BF16:
                kt = kt.to(tl.float32)
            s = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale
            if (start_n < full_lo) | (start_n + BLOCK_N > full_hi):
                visible = key_in[None, :] & row_in[:, None]
                if CAUSAL:
                    visible = visible & (offs_kn[None, :] <= q_pos[:, None])
                if HAS_WINDOW:
                    visible = visible & (offs_kn[None, :] > q_pos[:, None] - window)
                s = tl.where(visible, s, float("-inf"))
            if HAS_KPM:
                real = tl.load(kpm_ptr + b.to(tl.int64) * skpm_b + offs_kn, mask=key_in, other=0)
                s = tl.where(real[None, :] != 0, s, float("-inf"))
            v = tl.load(v_base + offs_kn[:, None] * sv_n + offs_d[None, :],
                        mask=key_in[:, None] & d_in[None, :], other=0.0)
            m_i, l_i, acc = online_softmax_step(s, v, m_i, l_i, acc, v_ptr.dtype.element_ty, DOT_PRECISION,
                                                UPCAST_BF16, FIX_BF16)
        # Rows that saw no key (l = 0) output zeros, like the reference.
        l_safe = tl.where(l_i == 0.0, 1.0, l_i)
        out = acc / l_safe[:, None]
        tl.store(o_base + offs_m[:, None] * so_m + offs_d[None, :],
                 to_dtype(out, o_ptr.dtype.element_ty, FIX_BF16), mask=row_in[:, None] & d_in[None, :])


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


def _launch(q, k, v, out, kpm, cu_q, cu_k, strides, q_len, k_len, grid_m, batch, *,
            varlen, causal, window, scale, head_dim, block_m=None, block_n=None):
    q_heads = strides["q_heads"]
    group = q_heads // strides["kv_heads"]
    block_d = max(16, _triton.next_power_of_2(head_dim))
    bm, bn, num_warps, num_stages = _block_sizes(block_d, q.dtype, q.device)
    bm, bn = block_m or bm, block_n or bn
    scale = head_dim**-0.5 if scale is None else scale
    grid = (triton.cdiv(max(grid_m, 1), bm), batch * q_heads)
    _attention_fwd_kernel[grid](
        q, k, v, out, kpm, cu_q, cu_k, *strides["values"],
        q_len, k_len, q_heads, group, head_dim, scale * LOG2_E, window or 0,
        VARLEN=varlen, CAUSAL=causal, HAS_WINDOW=window is not None,
        HAS_KPM=strides["has_kpm"], BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        UPCAST_BF16=_triton.upcast_bf16(q), FIX_BF16=_triton.interpreter_active(), num_warps=num_warps, num_stages=num_stages,
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
                     block_m=None, block_n=None):
    """Triton padded-layout attention; same contract as `attention_reference`.

    q: [B, Hq, Lq, D]; k, v: [B, Hkv, Lk, D] (any strides with unit stride on D, e.g. a
    transposed [B, L, H, D] view); key_padding_mask: [B, Lk] bool. Returns [B, Hq, Lq, D].
    block_m / block_n override the block sizes (tests).
    """
    _check_masking(causal, window)
    batch, q_heads, q_len, head_dim = q.shape
    kv_heads, k_len = k.shape[1], k.shape[2]
    if q_heads % kv_heads != 0:
        raise ValueError(f"query heads ({q_heads}) must be a multiple of kv heads ({kv_heads})")
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    if k_len == 0:
        return out.zero_()
    kpm = None
    if key_padding_mask is not None:
        kpm = key_padding_mask.to(device=q.device, dtype=torch.bool).contiguous().view(torch.uint8)
    strides = {
        "q_heads": q_heads, "kv_heads": kv_heads, "has_kpm": kpm is not None,
        "values": (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                   v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1),
                   out.stride(2), kpm.stride(0) if kpm is not None else 0),
    }
    # Unused pointer arguments get q (never dereferenced: their constexpr flag is off).
    kpm_arg = kpm if kpm is not None else q
    return _launch(q, k, v, out, kpm_arg, q, q, strides, q_len, k_len, q_len, batch,
                   varlen=False, causal=causal, window=window, scale=scale, head_dim=head_dim,
                   block_m=block_m, block_n=block_n)


def attention_varlen_triton(q, k, v, cu_seqlens_q, cu_seqlens_k, *, max_seqlen_q=None,
                            max_seqlen_k=None, causal=False, window=None, scale=None,
                            block_m=None, block_n=None):
    """Triton packed-layout attention; same contract as `attention_varlen_reference`.

    q: [Tq, Hq, D]; k, v: [Tk, Hkv, D]; cu_seqlens_q, cu_seqlens_k: [B + 1] int32.
    max_seqlen_q sizes the grid (computed from cu_seqlens_q, one device sync, when None).
    """
    _check_masking(causal, window)
    q_heads, head_dim = q.shape[1], q.shape[2]
    kv_heads = k.shape[1]
    if q_heads % kv_heads != 0:
        raise ValueError(f"query heads ({q_heads}) must be a multiple of kv heads ({kv_heads})")
    batch = cu_seqlens_q.shape[0] - 1
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    out = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
    if out.numel() == 0 or batch <= 0:
        return out
    cu_q = cu_seqlens_q.to(device=q.device, dtype=torch.int32).contiguous()
    cu_k = cu_seqlens_k.to(device=q.device, dtype=torch.int32).contiguous()
    if max_seqlen_q is None:
        max_seqlen_q = int((cu_q[1:] - cu_q[:-1]).max().item())
    strides = {
        "q_heads": q_heads, "kv_heads": kv_heads, "has_kpm": False,
        "values": (0, q.stride(1), q.stride(0), 0, k.stride(1), k.stride(0),
                   0, v.stride(1), v.stride(0), 0, out.stride(1), out.stride(0), 0),
    }
    return _launch(q, k, v, out, q, cu_q, cu_k, strides, 0, 0, max_seqlen_q, batch,
                   varlen=True, causal=causal, window=window, scale=scale, head_dim=head_dim,
                   block_m=block_m, block_n=block_n)


# ---------------------------------------------------------------------------------------------
# Custom ops (so torch.compile sees one opaque call) and the dispatching functions
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


def _triton_ok(q, k, v) -> bool:
    """The kernel covers fp16/bf16/fp32 forward with head dim <= 256; anything else (a
    gradient needed, other dtypes) goes to the reference."""
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return False
    if not (q.dtype == k.dtype == v.dtype) or q.shape[-1] > 256 or q.shape[-1] != v.shape[-1]:
        return False
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return False
    return use_triton(q)


def attention(q, k, v, *, causal=False, window=None, key_padding_mask=None, scale=None):
    """Dispatching padded-layout attention (same signature and result as `attention_reference`).

    q: [B, Hq, Lq, D]; k, v: [B, Hkv, Lk, D]; key_padding_mask: [B, Lk] bool. -> [B, Hq, Lq, D].
    """
    if _triton_ok(q, k, v):
        _triton.check_runnable(q)
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
    """
    if _triton_ok(q, k, v):
        _triton.check_runnable(q)
        return attention_varlen_fwd_op(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                       max_seqlen_k, bool(causal), window, scale)
    return attention_varlen_reference(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=max_seqlen_q,
        max_seqlen_k=max_seqlen_k, causal=causal, window=window, scale=scale,
    )

"""Attention for one new query per sequence against a KV cache (the decode step).

The cache may be a rolling buffer (sliding-window decoder): slots hold keys in any order, and
softmax does not care about order, so the kernel only needs to know *which* slots are valid:
slots [0, cache_seqlens[b]) of sequence b, minus those where `key_mask` is False (left padding).

The Triton path is Flash-Decoding (Dao, Haziza, Massa and Sizov, "Flash-Decoding for
long-context inference", PyTorch blog, 2023), on the online softmax of FlashAttention (Dao et
al., arXiv:2205.14135; Milakov and Gimelshein, arXiv:1805.02867). One query per sequence is
too little work for one program per (sequence, head) to fill a GPU when the batch is small, so
the key axis is split into chunks processed by separate programs (`_decode_split_kernel`), each
producing a partial softmax (its log-sum-exp and normalised partial output), and a second small
kernel (`_decode_reduce_kernel`) merges the partials. All query heads of one kv head (the GQA group)
share a program, so each K/V byte is read from memory once. Registered as the custom op
`idefics2_mini::attention_decode_fwd`; forward only (a gradient request uses the reference).
"""

from __future__ import annotations

from typing import Optional

import torch

from . import _triton
from ._triton import computable, online_softmax_step, tl, to_dtype, triton
from .dispatch import use_triton


def attention_decode_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    *,
    key_mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """q: [B, Hq, D]; k_cache, v_cache: [B, Hkv, S, D]; cache_seqlens: [B] int (valid leading
    slots); key_mask: [B, S] bool (True = attend). Returns [B, Hq, D] in q's dtype; a sequence
    with no valid slot gets zeros.
    """
    batch, q_heads, head_dim = q.shape
    kv_heads, slots = k_cache.shape[1], k_cache.shape[2]
    group = q_heads // kv_heads
    valid = torch.arange(slots, device=q.device)[None, :] < cache_seqlens.to(q.device)[:, None]
    if key_mask is not None:
        valid = valid & key_mask.to(torch.bool)
    # Group the query heads by their kv head: the G heads of a group are G "query positions"
    # against that kv head's keys, so K/V are used as they are (no repeat). One fused SDPA call
    # keeps the per-step cost of this reference small on CPU, where decode is overhead-bound.
    q_grouped = q.view(batch, kv_heads, group, head_dim)
    out = torch.nn.functional.scaled_dot_product_attention(
        q_grouped, k_cache, v_cache, attn_mask=valid[:, None, None, :], scale=scale
    )
    # A sequence with no valid slot: SDPA gives zeros or NaN depending on the backend; make it zeros.
    return out.nan_to_num_(0.0).view(batch, q_heads, head_dim)


def attention_decode_math(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    *,
    key_mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """The reference's contract and result, written out as elementwise math, reductions and a
    softmax instead of one SDPA call: what `attention_decode` runs inside a compiled decode step
    for a small cache, where Inductor fuses it with the neighbouring ops into its loops (SDPA
    would stay an opaque call, ~20-45 us each for a few dozen keys)."""
    batch, q_heads, head_dim = q.shape
    kv_heads, slots = k_cache.shape[1], k_cache.shape[2]
    valid = torch.arange(slots, device=q.device)[None, :] < cache_seqlens.to(q.device)[:, None]
    if key_mask is not None:
        valid = valid & key_mask.to(torch.bool)
    scale = head_dim**-0.5 if scale is None else scale
    q_grouped = q.view(batch, kv_heads, q_heads // kv_heads, head_dim)
    # fp32 scores and sums whatever the cache dtype, as SDPA's CPU kernels accumulate.
    keys, values = k_cache.float()[:, :, None], v_cache.float()[:, :, None]  # [B, Hkv, 1, S, D]
    scores = (q_grouped.float()[:, :, :, None, :] * keys).sum(-1) * scale  # [B, Hkv, G, S]
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    out = (scores.softmax(dim=-1)[..., None] * values).sum(-2)  # [B, Hkv, G, D]
    return out.nan_to_num(0.0).to(q.dtype).view(batch, q_heads, head_dim)



# ---------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------

LOG2_E = 1.4426950408889634

if triton is not None:

    @triton.jit
    def _decode_split_kernel(
        q_ptr, k_ptr, v_ptr, seqlens_ptr, key_mask_ptr, part_out_ptr, part_lse_ptr,
        sq_b, sq_h, sk_b, sk_h, sk_s, sv_b, sv_h, sv_s, skm_b,
        kv_heads, group, head_dim, slots, chunk, num_splits, qk_scale,
        HAS_KEY_MASK: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ):
        """q [B, Hq, D]; k/v cache [B, Hkv, S, D]; seqlens [B]; key_mask [B, S] uint8.
        Writes part_out [B, Hq, splits, D] (fp32, normalised within the chunk) and
        part_lse [B, Hq, splits] (fp32, log2-sum-exp2 of the chunk's scaled scores; -inf
        when the chunk has no valid key). Grid: (splits, B * Hkv)."""
        pid_s = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // kv_heads
        kv_h = pid_bh % kv_heads
        b64 = b.to(tl.int64)
        seqlen = tl.minimum(tl.load(seqlens_ptr + b).to(tl.int32), slots)
        start = pid_s * chunk
        end = tl.minimum(start + chunk, seqlen)

        # The group's query heads are the rows of a [BLOCK_G, D] tile (padded to >= 16 rows,
        # the smallest tl.dot shape; padded rows are masked and never stored).
        offs_g = tl.arange(0, BLOCK_G)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        g_in = offs_g < group
        d_in = offs_d < head_dim
        heads = kv_h * group + offs_g
        q = tl.load(q_ptr + b64 * sq_b + heads[:, None].to(tl.int64) * sq_h + offs_d[None, :],
                    mask=g_in[:, None] & d_in[None, :], other=0.0)
        q = computable(q)
        k_base = k_ptr + b64 * sk_b + kv_h.to(tl.int64) * sk_h
        v_base = v_ptr + b64 * sv_b + kv_h.to(tl.int64) * sv_h

        m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
        for start_n in range(start, end, BLOCK_N):
            offs_kn = start_n + offs_n
            key_in = offs_kn < end
            kt = tl.load(k_base + offs_kn[None, :].to(tl.int64) * sk_s + offs_d[:, None],
                         mask=d_in[:, None] & key_in[None, :], other=0.0)
            kt = computable(kt)
            s = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale
            valid = key_in
            if HAS_KEY_MASK:
                real = tl.load(key_mask_ptr + b64 * skm_b + offs_kn, mask=key_in, other=0)
                valid = valid & (real != 0)
            s = tl.where(valid[None, :], s, float("-inf"))
            v = tl.load(v_base + offs_kn[:, None].to(tl.int64) * sv_s + offs_d[None, :],
                        mask=key_in[:, None] & d_in[None, :], other=0.0)
            # Online softmax across this chunk's blocks.
            m_i, l_i, acc = online_softmax_step(s, v, m_i, l_i, acc, v_ptr.dtype.element_ty, DOT_PRECISION)
        has_key = l_i > 0.0
        out = acc / tl.where(has_key, l_i, 1.0)[:, None]
        lse = tl.where(has_key, m_i + tl.log2(tl.where(has_key, l_i, 1.0)), float("-inf"))
        row = (b64 * kv_heads * group + heads) * num_splits + pid_s  # [B, Hq, splits] index
        tl.store(part_lse_ptr + row, lse, mask=g_in)
        tl.store(part_out_ptr + row[:, None] * head_dim + offs_d[None, :], out,
                 mask=g_in[:, None] & d_in[None, :])

    @triton.jit
    def _decode_reduce_kernel(
        part_out_ptr, part_lse_ptr, out_ptr, q_heads, head_dim, num_splits, so_b, so_h,
        BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """Merge the splits of one (sequence, query head): with chunk log-sum-exps L_s and
        normalised chunk outputs O_s, out = sum_s exp2(L_s - M) O_s / sum_s exp2(L_s - M),
        M = max_s L_s. Splits without keys (L_s = -inf) weigh 0; all empty -> zeros.
        Grid: (B * Hq,)."""
        row = tl.program_id(0).to(tl.int64)
        b = row // q_heads
        h = row % q_heads
        offs_s = tl.arange(0, BLOCK_S)
        offs_d = tl.arange(0, BLOCK_D)
        s_in = offs_s < num_splits
        d_in = offs_d < head_dim
        lse = tl.load(part_lse_ptr + row * num_splits + offs_s, mask=s_in, other=float("-inf"))
        m = tl.max(lse, 0)
        m_use = tl.where(m == float("-inf"), 0.0, m)
        weight = tl.exp2(lse - m_use)
        part = tl.load(part_out_ptr + (row * num_splits + offs_s[:, None]) * head_dim + offs_d[None, :],
                       mask=s_in[:, None] & d_in[None, :], other=0.0)
        total = tl.sum(weight, 0)
        out = tl.sum(weight[:, None] * part, 0) / tl.where(total > 0.0, total, 1.0)
        tl.store(out_ptr + b * so_b + h * so_h + offs_d, to_dtype(out, out_ptr.dtype.element_ty), mask=d_in)


def _decode_config(q, batch, kv_heads, slots, num_splits):
    """(BLOCK_N, num_splits, num_warps, num_stages).

    GPU: 64-key blocks (a 64 x 128 bf16 K tile is 16 KiB, 3 stages fit easily). The key axis
    is split until batch x kv_heads x splits gives about two programs per SM, but each split
    keeps at least 256 keys so the partial writes and the reduce stay small next to the K/V
    reads. Interpreter: 16-key blocks and up to 4 splits, so small tests cover the merge.
    """
    if q.device.type != "cuda" or _triton.interpreter_active():
        block_n, warps, stages = 16, 4, 1
        default_splits = min(4, max(1, triton.cdiv(slots, block_n)))
    else:
        block_n, warps, stages = 64, 4, 3
        want = triton.cdiv(2 * _triton.multiprocessor_count(q.device), max(1, batch * kv_heads))
        default_splits = max(1, min(want, triton.cdiv(slots, 256)))
    splits = default_splits if num_splits is None else max(1, int(num_splits))
    return block_n, splits, warps, stages


def attention_decode_triton(q, k_cache, v_cache, cache_seqlens, *, key_mask=None, scale=None,
                            num_splits=None):
    """Triton flash-decoding; same contract as `attention_decode_reference`.

    q: [B, Hq, D]; k_cache, v_cache: [B, Hkv, S, D] (unit stride on D); cache_seqlens: [B]
    int; key_mask: [B, S] bool. num_splits overrides the split count (tests, benchmarks).
    Returns [B, Hq, D] in q's dtype.
    """
    batch, q_heads, head_dim = q.shape
    kv_heads, slots = k_cache.shape[1], k_cache.shape[2]
    if q_heads % kv_heads != 0:
        raise ValueError(f"query heads ({q_heads}) must be a multiple of kv heads ({kv_heads})")
    q, k_cache, v_cache = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k_cache, v_cache))
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    if slots == 0:
        return out.zero_()
    group = q_heads // kv_heads
    block_n, splits, warps, stages = _decode_config(q, batch, kv_heads, slots, num_splits)
    # Each split covers a whole number of key blocks.
    chunk = triton.cdiv(triton.cdiv(slots, splits), block_n) * block_n
    splits = triton.cdiv(slots, chunk)
    block_d = max(16, _triton.next_power_of_2(head_dim))
    block_g = max(16, _triton.next_power_of_2(group))
    seqlens = cache_seqlens.to(device=q.device, dtype=torch.int32).contiguous()
    kmask = None
    if key_mask is not None:
        kmask = key_mask.to(device=q.device, dtype=torch.bool).contiguous().view(torch.uint8)
    part_out = torch.empty(batch, q_heads, splits, head_dim, dtype=torch.float32, device=q.device)
    part_lse = torch.empty(batch, q_heads, splits, dtype=torch.float32, device=q.device)
    scale = head_dim**-0.5 if scale is None else scale
    _decode_split_kernel[(splits, batch * kv_heads)](
        q, k_cache, v_cache, seqlens, kmask if kmask is not None else seqlens, part_out, part_lse,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        kmask.stride(0) if kmask is not None else 0,
        kv_heads, group, head_dim, slots, chunk, splits, scale * LOG2_E,
        HAS_KEY_MASK=kmask is not None, BLOCK_G=block_g, BLOCK_N=block_n, BLOCK_D=block_d,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=warps, num_stages=stages,
    )
    _decode_reduce_kernel[(batch * q_heads,)](
        part_out, part_lse, out, q_heads, head_dim, splits, out.stride(0), out.stride(1),
        BLOCK_S=max(2, _triton.next_power_of_2(splits)), BLOCK_D=block_d, num_warps=4,
    )
    return out


@torch.library.custom_op("idefics2_mini::attention_decode_fwd", mutates_args=())
def attention_decode_fwd_op(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_seqlens: torch.Tensor,
    key_mask: Optional[torch.Tensor], scale: Optional[float],
) -> torch.Tensor:
    _triton.check_runnable(q)
    return attention_decode_triton(q, k_cache, v_cache, cache_seqlens, key_mask=key_mask, scale=scale)


@attention_decode_fwd_op.register_fake
def _(q, k_cache, v_cache, cache_seqlens, key_mask, scale):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


def _triton_ok(q, k_cache, v_cache) -> bool:
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return False
    if not (q.dtype == k_cache.dtype == v_cache.dtype) or q.shape[-1] > 256:
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k_cache, v_cache)):
        return False
    return use_triton(q)


# Inside torch.compile, `attention_decode` runs the math form while one kv head's cache holds at
# most this many elements (keys x head dim: 128 x 32, 32 x 128; 16 KB of fp32 keys), else SDPA:
# at the 8B head size (128) SDPA's blocked kernel is 1.1-2x faster from 128 keys on (both
# compiled forms side by side: benchmarks/decode_ops.py, results/<machine>/decode_ops.md).
COMPILED_MATH_MAX_KV_ELEMENTS = 64 * 64


def attention_decode(q, k_cache, v_cache, cache_seqlens, *, key_mask=None, scale=None):
    """Dispatching decode attention (same signature and result as the reference): Triton (see
    dispatch.py), else the reference, or inside torch.compile for a small cache its math form.

    q: [B, Hq, D]; k_cache, v_cache: [B, Hkv, S, D]; cache_seqlens: [B]; key_mask: [B, S]
    bool -> [B, Hq, D].
    """
    if _triton_ok(q, k_cache, v_cache):
        _triton.check_runnable(q)
        return attention_decode_fwd_op(q, k_cache, v_cache, cache_seqlens, key_mask, scale)
    if torch.compiler.is_compiling() and k_cache.shape[2] * q.shape[-1] <= COMPILED_MATH_MAX_KV_ELEMENTS:
        return attention_decode_math(q, k_cache, v_cache, cache_seqlens, key_mask=key_mask, scale=scale)
    return attention_decode_reference(q, k_cache, v_cache, cache_seqlens, key_mask=key_mask, scale=scale)

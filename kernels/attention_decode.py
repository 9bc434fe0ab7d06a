"""Attention for one new query per sequence against a KV cache (the decode step).

The cache may be a rolling buffer (sliding-window decoder): slots hold keys in any order, and
softmax does not care about order, so the kernel only needs to know *which* slots are valid:
slots [0, cache_seqlens[b]) of sequence b, minus those where `key_mask` is False (left padding).
"""

from __future__ import annotations

import torch

from .dispatch import use_triton  # noqa: F401


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
    scale = head_dim**-0.5 if scale is None else scale
    valid = torch.arange(slots, device=q.device)[None, :] < cache_seqlens.to(q.device)[:, None]
    if key_mask is not None:
        valid = valid & key_mask.to(torch.bool)
    # Group the query heads by their kv head so K/V are used as they are (no repeat).
    q_grouped = q.view(batch, kv_heads, group, head_dim)
    scores = torch.matmul(q_grouped.float(), k_cache.float().transpose(-1, -2)) * scale
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    out = torch.matmul(probs, v_cache.float())
    return out.view(batch, q_heads, head_dim).to(q.dtype)


def attention_decode(q, k_cache, v_cache, cache_seqlens, *, key_mask=None, scale=None):
    """Dispatching decode attention (same signature and result as the reference)."""
    return attention_decode_reference(q, k_cache, v_cache, cache_seqlens, key_mask=key_mask, scale=scale)

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
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .dispatch import use_triton  # noqa: F401


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


def attention(q, k, v, *, causal=False, window=None, key_padding_mask=None, scale=None):
    """Dispatching padded-layout attention (same signature and result as `attention_reference`)."""
    # The Triton kernel lands here (issue 5); until then every device runs the reference.
    return attention_reference(
        q, k, v, causal=causal, window=window, key_padding_mask=key_padding_mask, scale=scale
    )


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


def attention_varlen(
    q, k, v, cu_seqlens_q, cu_seqlens_k, *, max_seqlen_q=None, max_seqlen_k=None,
    causal=False, window=None, scale=None,
):
    """Dispatching packed-layout attention (same signature and result as the reference)."""
    return attention_varlen_reference(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=max_seqlen_q,
        max_seqlen_k=max_seqlen_k, causal=causal, window=window, scale=scale,
    )

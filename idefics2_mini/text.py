"""Text decoder: Mistral-7B (RMSNorm, half-split RoPE, GQA with a causal sliding window, SwiGLU).

Follows Mistral 7B (Jiang et al., arXiv:2310.06825): rotary position embedding (Su et al.,
RoFormer, arXiv:2104.09864) in the half-split layout of the Llama/Mistral checkpoints,
grouped-query attention (Ainslie et al., arXiv:2305.13245), a sliding attention window, SwiGLU
and RMSNorm (layers.py); the reference implementation is transformers' `MistralModel`.

Attention mask rule (the reference's): query token i sees key token j when
i - W < j <= i (W = sliding window, counted in tokens of the padded batch) and j is not padding.
"""

from __future__ import annotations

import torch
from torch import nn

import kernels

from .cache import KVCache
from .config import TextConfig
from .layers import RMSNorm, SwiGLU, eager_attention, embedding


class RotaryEmbedding(nn.Module):
    """Half-split RoPE: channel pairs (i, i + D/2) rotate by position × inv_freq[i].

    The cos and sin tables are computed once in fp32 for positions 0..n-1 (grown on demand,
    recomputed if the model moves) and looked up per step: the same numbers as computing them
    from each step's positions, without redoing the trigonometry for every token.
    """

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        # Computed on the CPU even while the loader builds the model on the meta device (math on
        # meta tensors imports torch._dynamo: over a second of load time); moved with the model.
        exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim
        self.register_buffer("inv_freq", 1.0 / (theta**exponents), persistent=False)
        self._cos: torch.Tensor | None = None  # [n, D] fp32
        self._signed_sin: torch.Tensor | None = None  # [n, D] fp32: (-sin, +sin) halves

    def _build(self, length: int) -> None:
        positions = torch.arange(length, device=self.inv_freq.device).float()
        freqs = positions[:, None] * self.inv_freq.float()[None, :]  # [n, D/2]
        angles = torch.cat([freqs, freqs], dim=-1)
        half = freqs.shape[-1]
        sin = angles.sin()
        self._cos = angles.cos()
        self._signed_sin = torch.cat([-sin[:, :half], sin[:, half:]], dim=-1)

    def forward(
        self, position_ids: torch.Tensor, max_position: int, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids [B, T] (all < max_position, a host-side bound so no device sync is
        needed) -> cos, signed_sin [B, T, 1, D] in `dtype` (broadcast over heads)."""
        table = self._cos
        if table is None or table.shape[0] < max_position or table.device != self.inv_freq.device:
            self._build(max(max_position, 2 * (0 if table is None else table.shape[0])))
        cos = self._cos[position_ids].to(dtype)[:, :, None]
        signed_sin = self._signed_sin[position_ids].to(dtype)[:, :, None]
        return cos, signed_sin


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x [B, T, H, D] -> x rotated: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin), where
    x1, x2 are the two halves of D. With the sign folded into the sin table this is
    x * cos + swap_halves(x) * signed_sin. (The halves are swapped by slicing and concatenating:
    in a compiled decode step that runs faster than `x.roll(D // 2, -1)`.)"""
    half = x.shape[-1] // 2
    swapped = torch.cat([x[..., half:], x[..., :half]], dim=-1)
    return torch.addcmul(x * cos, swapped, signed_sin)


class TextAttention(nn.Module):
    def __init__(self, config: TextConfig, layer_index: int):
        super().__init__()
        self.layer_index = layer_index
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.sliding_window = config.sliding_window
        width = config.hidden_size
        self.q_proj = nn.Linear(width, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(width, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(width, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, width, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        token_mask: torch.Tensor | None,
        cache: KVCache | None,
        attentions_out: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """x [B, T, C]; cos/sin [B, T, 1, D]; token_mask [B, T] bool (None = no padding) -> [B, T, C].

        If `attentions_out` is a list, attention runs as written-out math (`eager_attention`
        below) and its probabilities [B, heads, T, K] are appended, K = every token so far (the
        cache's and these T): column j is token j of the batch's clock, zero where query i may
        not see it (padding, j > i, or j <= i - window)."""
        if attentions_out is not None:
            return self.eager_attention(x, cos, sin, token_mask, cache, attentions_out)
        batch, length, _ = x.shape
        q, k, v = self.heads(x, cos, sin)  # q [B, Hq, T, D]; k, v [B, Hkv, T, D]
        scale = self.head_dim**-0.5

        if cache is not None and cache.decoding:
            # Decode: one query against the cache (its own key written first).
            cache.write(self.layer_index, k, v)
            cache_seqlens, key_mask = cache.decode_visible()
            out = kernels.attention_decode(
                q[:, :, 0], cache.keys[self.layer_index], cache.values[self.layer_index], cache_seqlens,
                key_mask=key_mask, scale=scale,
            )[:, :, None]
        else:
            # Prefill (of a whole prompt, or of a new chunk after earlier turns).
            keys, values, key_mask = k, v, token_mask
            if cache is not None and cache.num_tokens > 0:
                past_k, past_v, past_real = cache.past(self.layer_index)
                keys, values = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)
                new_real = token_mask if token_mask is not None else past_real.new_ones(batch, length)
                key_mask = torch.cat([past_real, new_real], dim=1)
            out = kernels.attention(
                q, keys, values, causal=True, window=self.sliding_window, key_padding_mask=key_mask, scale=scale
            )
            if cache is not None:
                cache.write(self.layer_index, k, v)
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, -1))

    def heads(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """x [B, T, C] -> q [B, Hq, T, D], k, v [B, Hkv, T, D]: the projections, q and k rotated.
        q and k turn by the same angles, so they are rotated as one tensor of Hq + Hkv heads."""
        batch, length, _ = x.shape
        q, k, v = self.project_qkv(x)
        qk = torch.cat([q, k], dim=-1).view(batch, length, self.num_heads + self.num_kv_heads, self.head_dim)
        q, k = apply_rotary(qk, cos, sin).transpose(1, 2).split([self.num_heads, self.num_kv_heads], dim=1)
        return q, k, v.view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, T, C] -> q [B, T, Hq*D], k, v [B, T, Hkv*D]; one method so that a backend can
        serve the three with one matmul (backends/fusion.py)."""
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def eager_attention(self, x, cos, sin, token_mask, cache, attentions_out: list[torch.Tensor]) -> torch.Tensor:
        """`forward` with the attention written out (layers.eager_attention), for its probabilities.
        The same projections, RoPE and cache writes; the mask spelled as the rule in the module
        docstring: query token i sees key token j when i - window < j <= i and j is real."""
        batch, length, _ = x.shape
        q, k, v = self.heads(x, cos, sin)
        before = 0 if cache is None else cache.num_tokens  # tokens of earlier steps (the clock)
        if cache is not None and cache.decoding:
            # One query against the cache's slots; slot s holds token t with t % capacity == s.
            cache.write(self.layer_index, k, v)
            keys, values = cache.keys[self.layer_index], cache.values[self.layer_index]  # [B, Hkv, S, D]
            cache_seqlens, key_mask = cache.decode_visible()
            slots = torch.arange(keys.shape[2], device=x.device)
            visible = ((slots[None, :] < cache_seqlens[:, None]) & key_mask)[:, None, None, :]  # [B, 1, 1, S]
            out, slot_probs = eager_attention(q, keys, values, visible, self.head_dim**-0.5)
            tokens = torch.arange(max(0, before + 1 - keys.shape[2]), before + 1, device=x.device)
            probs = slot_probs.new_zeros(batch, self.num_heads, 1, before + 1)
            probs[..., tokens] = slot_probs[..., tokens % keys.shape[2]]
        else:
            keys, values, key_real = k, v, token_mask  # key_real [B, K] bool or None (all real)
            if cache is not None and cache.num_tokens > 0:
                past_k, past_v, past_real = cache.past(self.layer_index)  # the last n_past tokens
                keys, values = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)
                new_real = token_mask if token_mask is not None else past_real.new_ones(batch, length)
                key_real = torch.cat([past_real, new_real], dim=1)
            visible = kernels.visible_keys_mask(
                length, keys.shape[2], causal=True, window=self.sliding_window, device=x.device
            )[None, None]  # [1, 1, T, K]: j <= i and j > i - window
            if key_real is not None:
                visible = visible & key_real[:, None, None, :]
            out, probs = eager_attention(q, keys, values, visible, self.head_dim**-0.5)
            # Tokens older than the cache's buffer are out of every query's window: zero columns.
            probs = torch.nn.functional.pad(probs, (before + length - keys.shape[2], 0))
            if cache is not None:
                cache.write(self.layer_index, k, v)
        attentions_out.append(probs)
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, -1))


class TextDecoderLayer(nn.Module):
    def __init__(self, config: TextConfig, layer_index: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = TextAttention(config, layer_index)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = SwiGLU(config.hidden_size, config.intermediate_size, config.hidden_size)

    def forward(self, x, cos, sin, token_mask, cache, attentions_out=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, token_mask, cache, attentions_out)
        return x + self.mlp(self.post_attention_layernorm(x))


class TextDecoder(nn.Module):
    """Token embeddings -> N decoder layers -> final RMSNorm (the lm_head lives in the model)."""

    def __init__(self, config: TextConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.layers = nn.ModuleList(TextDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = RotaryEmbedding(config.head_dim, config.rope_theta)

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        hidden_states_out: list[torch.Tensor] | None = None,
        attentions_out: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """inputs_embeds [B, T, C]; attention_mask [B, T] for these T tokens (1 = real, 0 = left
        padding; None = all real). With a cache, the tokens continue what it holds.

        Returns the final-norm hidden states [B, T, C]. If `hidden_states_out` is a list, every
        layer's input and the last layer's output are appended to it; if `attentions_out` is a
        list, every layer's attention probabilities (see `TextAttention.forward`).
        """
        batch, length, _ = inputs_embeds.shape
        token_mask = None if attention_mask is None else attention_mask.to(torch.bool)
        if token_mask is not None and bool(token_mask.all()):
            token_mask = None  # no padding: attention can skip the key mask
        if cache is not None:
            position_ids = cache.begin_step(length, token_mask)
            max_position = cache.num_tokens + length  # positions never exceed the token clock
        else:
            position_ids = position_ids_from_mask(token_mask, batch, length, inputs_embeds.device)
            max_position = length
        cos, sin = self.rotary(position_ids, max_position, inputs_embeds.dtype)
        hidden = self.run_layers(inputs_embeds, cos, sin, token_mask, cache, hidden_states_out, attentions_out)
        if cache is not None:
            cache.end_step()
        return hidden

    def run_layers(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        token_mask: torch.Tensor | None,
        cache: KVCache | None,
        hidden_states_out: list[torch.Tensor] | None = None,
        attentions_out: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """x [B, T, C] through every layer and the final norm -> [B, T, C]; cos/sin [B, T, 1, D]
        from `rotary`; with a cache, between its `begin_step` and `end_step`."""
        for layer in self.layers:
            if hidden_states_out is not None:
                hidden_states_out.append(x)
            x = layer(x, cos, sin, token_mask, cache, attentions_out)
        if hidden_states_out is not None:
            hidden_states_out.append(x)
        return self.norm(x)


def position_ids_from_mask(token_mask: torch.Tensor | None, batch: int, length: int, device) -> torch.Tensor:
    """RoPE positions that skip left padding: real tokens count 0, 1, 2, ...; padding gets 0
    (what the reference's generate uses). token_mask [B, T] bool or None -> [B, T] long."""
    if token_mask is None:
        return torch.arange(length, device=device)[None].expand(batch, length)
    return (token_mask.long().cumsum(dim=1) - 1).masked_fill(~token_mask, 0)

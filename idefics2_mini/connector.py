"""Connector: vision features -> 64 decoder-width tokens per image.

Follows Idefics2 (Laurençon et al., "What matters when building vision-language models?",
arXiv:2405.02246): a modality projection, then a perceiver resampler (Jaegle et al., Perceiver,
arXiv:2103.03206; as a resampler in Flamingo, Alayrac et al., arXiv:2204.14198) whose attention
is grouped-query (Ainslie et al., arXiv:2305.13245) with RMSNorm; the reference implementation
is transformers' `Idefics2Connector`.

1. modality projection: SwiGLU 1152 -> 14336 -> 4096, applied to every patch;
2. perceiver resampler: 64 learned latents attend (GQA 16 q-heads / 4 kv-heads × 96) over
   [projected patches ; latents] for 3 layers, then a final RMSNorm. The patches are the fixed
   "context" (normalised afresh in each layer, never updated); only the latents evolve.
   No causal mask, no RoPE; padded patches are masked out as keys.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

import kernels

from .config import Idefics2Config, PerceiverConfig
from .layers import RMSNorm, SwiGLU, eager_attention
from .packing import PackedImages


@dataclass
class PerceiverPacking:
    """How packed latents meet their own image's packed patches.

    key_order: [P + I*n] index into cat(context [P], latents [I*n]) giving, image after image,
    that image's patches then its n latents; cu_seqlens_q / cu_seqlens_k: [I + 1] int32."""

    key_order: torch.Tensor
    cu_seqlens_q: torch.Tensor
    cu_seqlens_k: torch.Tensor
    latents_per_image: int
    max_keys: int

    @classmethod
    def for_images(cls, packed: PackedImages, latents_per_image: int) -> PerceiverPacking:
        device = packed.patches.device
        lengths = packed.patches_per_image
        total_patches = sum(lengths)
        pieces, start = [], 0
        for image, length in enumerate(lengths):
            pieces.append(torch.arange(start, start + length, device=device))
            first_latent = total_patches + image * latents_per_image
            pieces.append(torch.arange(first_latent, first_latent + latents_per_image, device=device))
            start += length
        cu_seqlens_q = torch.arange(0, len(lengths) + 1, device=device, dtype=torch.int32) * latents_per_image
        return cls(torch.cat(pieces), cu_seqlens_q, packed.cu_seqlens(latents_per_image), latents_per_image,
                   max(lengths) + latents_per_image)


class PerceiverAttention(nn.Module):
    def __init__(self, config: PerceiverConfig):
        super().__init__()
        self.num_heads = config.resampler_n_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.resampler_head_dim
        width = config.hidden_size
        self.q_proj = nn.Linear(width, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(width, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(width, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, width, bias=False)

    def forward(
        self,
        latents: torch.Tensor,
        context: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        packing: PerceiverPacking | None = None,
        attentions_out: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Padded: latents [N, n_latents, C], context [N, L, C], key_padding_mask [N, L + n_latents]
        bool -> [N, n_latents, C]. Packed: latents [I*n, C], context [P, C] -> [I*n, C].

        If `attentions_out` is a list (padded layout only), attention runs as written-out math
        (`layers.eager_attention`) and its probabilities [N, heads, n_latents, L + n_latents] are
        appended: keys are the L patches then the n latents, padded patches' columns zero."""
        if packing is not None:
            if attentions_out is not None:
                raise ValueError("attention probabilities are computed in the padded layout; run the images padded")
            keys_in = torch.cat([context, latents]).index_select(0, packing.key_order)
            k, v = self.project_kv(keys_in)
            q = self.q_proj(latents).view(latents.shape[0], self.num_heads, self.head_dim)
            k = k.view(keys_in.shape[0], self.num_kv_heads, self.head_dim)
            v = v.view(keys_in.shape[0], self.num_kv_heads, self.head_dim)
            out = kernels.attention_varlen(
                q, k, v, packing.cu_seqlens_q, packing.cu_seqlens_k, max_seqlen_q=packing.latents_per_image,
                max_seqlen_k=packing.max_keys, scale=self.head_dim**-0.5,
            )
            return self.o_proj(out.reshape(latents.shape[0], -1))
        num_images, num_latents, _ = latents.shape
        keys_in = torch.cat([context, latents], dim=1)  # [N, L + n_latents, C]
        num_keys = keys_in.shape[1]
        k, v = self.project_kv(keys_in)
        q = self.q_proj(latents).view(num_images, num_latents, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.view(num_images, num_keys, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(num_images, num_keys, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if attentions_out is None:
            out = kernels.attention(q, k, v, key_padding_mask=key_padding_mask, scale=self.head_dim**-0.5)
        else:
            visible = None if key_padding_mask is None else key_padding_mask[:, None, None, :]  # [N, 1, 1, L + n]
            out, probs = eager_attention(q, k, v, visible, self.head_dim**-0.5)
            attentions_out.append(probs)
        return self.o_proj(out.transpose(1, 2).reshape(num_images, num_latents, -1))

    def project_kv(self, keys_in: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """keys_in [..., C] -> k, v [..., Hkv*D]; one method so that a backend can serve both
        with one matmul (backends/fusion.py)."""
        return self.k_proj(keys_in), self.v_proj(keys_in)


class PerceiverLayer(nn.Module):
    def __init__(self, config: PerceiverConfig):
        super().__init__()
        width, eps = config.hidden_size, config.rms_norm_eps
        self.input_latents_norm = RMSNorm(width, eps)
        self.input_context_norm = RMSNorm(width, eps)
        self.self_attn = PerceiverAttention(config)
        self.post_attention_layernorm = RMSNorm(width, eps)
        self.mlp = SwiGLU(width, 4 * width, width)

    def forward(self, latents, context, key_padding_mask=None, packing: PerceiverPacking | None = None,
                attentions_out=None):
        """latents [N, n_latents, C], context [N, L, C] -> latents [N, n_latents, C]
        (packed: latents [I*n, C], context [P, C] -> [I*n, C])."""
        latents = latents + self.self_attn(
            self.input_latents_norm(latents), self.input_context_norm(context), key_padding_mask, packing,
            attentions_out,
        )
        return latents + self.mlp(self.post_attention_layernorm(latents))


class PerceiverResampler(nn.Module):
    def __init__(self, config: PerceiverConfig):
        super().__init__()
        self.latents = nn.Parameter(torch.ones(config.resampler_n_latents, config.hidden_size))
        self.layers = nn.ModuleList(PerceiverLayer(config) for _ in range(config.resampler_depth))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self, context: torch.Tensor, context_mask: torch.Tensor | None, attentions_out: list | None = None
    ) -> torch.Tensor:
        """context [N, L, C], context_mask [N, L] bool (True = real patch) -> [N, n_latents, C];
        `attentions_out`: see `PerceiverAttention.forward`."""
        num_images = context.shape[0]
        latents = self.latents[None].expand(num_images, -1, -1)
        key_padding_mask = None
        if context_mask is not None:
            latent_mask = context_mask.new_ones(num_images, latents.shape[1])
            key_padding_mask = torch.cat([context_mask.to(torch.bool), latent_mask.to(torch.bool)], dim=1)
        for layer in self.layers:
            latents = layer(latents, context, key_padding_mask, None, attentions_out)
        return self.norm(latents)

    def forward_packed(self, context: torch.Tensor, packed: PackedImages) -> torch.Tensor:
        """context [P, C] (packed patches of I images) -> [I, n_latents, C]."""
        num_latents = self.latents.shape[0]
        packing = PerceiverPacking.for_images(packed, num_latents)
        latents = self.latents.repeat(packed.num_images, 1)  # [I*n, C]
        for layer in self.layers:
            latents = layer(latents, context, packing=packing)
        return self.norm(latents).view(packed.num_images, num_latents, -1)


class Connector(nn.Module):
    def __init__(self, config: Idefics2Config):
        super().__init__()
        self.modality_projection = SwiGLU(
            config.vision.hidden_size, config.text.intermediate_size, config.text.hidden_size
        )
        self.perceiver_resampler = PerceiverResampler(config.perceiver)

    def forward(
        self, vision_features: torch.Tensor, patch_mask: torch.Tensor | None, attentions_out: list | None = None
    ) -> torch.Tensor:
        """vision_features [N, L, vision width], patch_mask [N, L] bool -> [N, n_latents, text width];
        `attentions_out`: the perceiver's attention probabilities (`PerceiverAttention.forward`)."""
        return self.perceiver_resampler(self.modality_projection(vision_features), patch_mask, attentions_out)

    def forward_packed(self, vision_features: torch.Tensor, packed: PackedImages) -> torch.Tensor:
        """vision_features [P, vision width] (packed) -> [I, n_latents, text width]."""
        return self.perceiver_resampler.forward_packed(self.modality_projection(vision_features), packed)

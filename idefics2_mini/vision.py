"""Vision tower: SigLIP ViT with NaViT-style positions for images of any aspect ratio.

Follows: SigLIP-so400m (Zhai et al., "Sigmoid Loss for Language Image Pre-Training", 2023,
arXiv:2303.15343; the shape-optimised "so400m" of Alabdulmohsin et al., arXiv:2305.13035), a
pre-LayerNorm ViT (Dosovitskiy et al., arXiv:2010.11929) with GELU (tanh) MLPs; positions as in
NaViT (Dehghani et al., "Patch n' Pack", arXiv:2307.06304), as Idefics2 adapted them (Laurençon
et al., arXiv:2405.02246, §3); the reference implementation is transformers'
`Idefics2VisionTransformer`.

Each image arrives padded to the batch's largest H×W; `patch_attention_mask` says which
14×14 patches are real. A real patch gets a position id on the 70×70 table by bucketing its
*fractional* coordinate within its own image's patch grid, so a 378×980 image spreads its
27×70 patches over the whole table instead of using its top-left corner. Padded patches get
position 0 and are masked out as keys in every attention layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import kernels

from .config import VisionConfig
from .layers import eager_attention, embedding
from .packing import PackedImages


def patch_mask_from_pixel_mask(pixel_attention_mask: torch.Tensor, patch_size: int) -> torch.Tensor:
    """pixel_attention_mask [N, H, W] (1 = real pixel) -> patch_attention_mask [N, H//p, W//p] bool.

    A patch is real only when all its p*p pixels are real. With this rule an image padded in a
    batch gets exactly the patches it gets alone (its partial edge patches are dropped either way).
    """
    num_images, height, width = pixel_attention_mask.shape
    rows, cols = height // patch_size, width // patch_size
    pixels = pixel_attention_mask[:, : rows * patch_size, : cols * patch_size].to(torch.bool)
    pixels = pixels.reshape(num_images, rows, patch_size, cols, patch_size)
    return pixels.all(dim=4).all(dim=2)


def patch_token_grid(patch_attention_mask: torch.Tensor) -> torch.Tensor:
    """patch_attention_mask [N, R, C] bool -> [N, R, C] long: the token index (0..R*C-1, row-major,
    the vision tower's sequence axis) of each patch, -1 where the patch is padding. A map over an
    image's tokens, values [L], becomes a picture as values[grid.clamp(min=0)] where grid >= 0."""
    rows, cols = patch_attention_mask.shape[1:]
    index = torch.arange(rows * cols, device=patch_attention_mask.device).view(1, rows, cols)
    return index.expand_as(patch_attention_mask).masked_fill(~patch_attention_mask.to(torch.bool), -1)


def navit_position_ids(patch_attention_mask: torch.Tensor, num_patches_per_side: int) -> torch.Tensor:
    """patch_attention_mask [N, h, w] bool -> position ids [N, h*w] long into the side×side table.

    Computed in float32 with the same operations as the reference so that the bucket
    boundaries (which fall exactly on multiples of 1/side) round identically.
    """
    num_images, max_rows, max_cols = patch_attention_mask.shape
    device = patch_attention_mask.device
    boundaries = torch.arange(1 / num_patches_per_side, 1.0, 1 / num_patches_per_side, device=device)
    # Real rows/cols of each image: real patches form a top-left rectangle.
    rows_per_image = patch_attention_mask[:, :, 0].sum(dim=1)  # [N]
    cols_per_image = patch_attention_mask[:, 0, :].sum(dim=1)  # [N]
    row_step = 1.0 / rows_per_image
    col_step = 1.0 / cols_per_image
    row_coords = torch.arange(max_rows, device=device, dtype=torch.float32)[None, :] * row_step[:, None]
    col_coords = torch.arange(max_cols, device=device, dtype=torch.float32)[None, :] * col_step[:, None]
    row_buckets = torch.bucketize(row_coords.clamp(max=1.0 - 1e-6), boundaries, right=True)  # [N, h]
    col_buckets = torch.bucketize(col_coords.clamp(max=1.0 - 1e-6), boundaries, right=True)  # [N, w]
    position_ids = row_buckets[:, :, None] * num_patches_per_side + col_buckets[:, None, :]
    position_ids = position_ids.reshape(num_images, -1)
    return torch.where(patch_attention_mask.reshape(num_images, -1), position_ids, 0)


class VisionEmbeddings(nn.Module):
    """Conv patchify (kernel = stride = patch size) + learned NaViT position embedding."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.patch_size = config.patch_size
        self.num_patches_per_side = config.num_patches_per_side
        self.patch_embedding = nn.Conv2d(
            config.num_channels, config.hidden_size, kernel_size=config.patch_size, stride=config.patch_size
        )
        self.position_embedding = embedding(self.num_patches_per_side**2, config.hidden_size)

    def forward(self, pixel_values: torch.Tensor, patch_attention_mask: torch.Tensor) -> torch.Tensor:
        """pixel_values [N, 3, H, W], patch_attention_mask [N, H//p, W//p] -> [N, (H//p)*(W//p), C]."""
        patches = self.patch_embedding(pixel_values)  # [N, C, H//p, W//p]
        embeddings = patches.flatten(2).transpose(1, 2)  # [N, L, C]
        position_ids = navit_position_ids(patch_attention_mask, self.num_patches_per_side)
        return embeddings + self.position_embedding(position_ids)

    def forward_packed(self, packed: PackedImages) -> torch.Tensor:
        """Packed patches [P, 3, p, p] -> [P, C]. The conv with stride = kernel is a linear map
        of each flattened patch; position ids come from each image's own grid."""
        weight = self.patch_embedding.weight
        embeddings = F.linear(packed.patches.flatten(1), weight.flatten(1), self.patch_embedding.bias)
        ids_by_grid: dict[tuple[int, int], torch.Tensor] = {}
        position_ids = []
        for rows, cols in packed.grid_sizes.tolist():
            if (rows, cols) not in ids_by_grid:
                full_grid = torch.ones(1, rows, cols, dtype=torch.bool, device=weight.device)
                ids_by_grid[rows, cols] = navit_position_ids(full_grid, self.num_patches_per_side)[0]
            position_ids.append(ids_by_grid[rows, cols])
        return embeddings + self.position_embedding(torch.cat(position_ids))


class VisionAttention(nn.Module):
    """Bidirectional multi-head attention; padded patches are masked out as keys."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.q_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.k_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.v_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.out_proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(
        self,
        x: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        packed: PackedImages | None = None,
        attentions_out: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Padded: x [N, L, C], key_padding_mask [N, L] bool (True = real patch) -> [N, L, C].
        Packed: x [P, C] with `packed` giving each image's length -> [P, C].

        If `attentions_out` is a list (padded layout only), attention runs as written-out math
        (`layers.eager_attention`) and its probabilities [N, heads, L, L] are appended, the rows
        and columns of padded patches zero."""
        q, k, v = self.project_qkv(x)
        if packed is not None:
            if attentions_out is not None:
                raise ValueError("attention probabilities are computed in the padded layout; run the images padded")
            heads_shape = (x.shape[0], self.num_heads, self.head_dim)
            cu_seqlens = packed.cu_seqlens()
            out = kernels.attention_varlen(
                q.view(heads_shape), k.view(heads_shape), v.view(heads_shape),
                cu_seqlens, cu_seqlens, max_seqlen_q=max(packed.patches_per_image),
                max_seqlen_k=max(packed.patches_per_image), scale=self.head_dim**-0.5,
            )
            return self.out_proj(out.reshape(x.shape))
        num_images, length, width = x.shape
        heads_shape = (num_images, length, self.num_heads, self.head_dim)
        q = q.view(heads_shape).transpose(1, 2)  # [N, heads, L, head_dim]
        k = k.view(heads_shape).transpose(1, 2)
        v = v.view(heads_shape).transpose(1, 2)
        if attentions_out is None:
            out = kernels.attention(q, k, v, key_padding_mask=key_padding_mask, scale=self.head_dim**-0.5)
        else:
            visible = None if key_padding_mask is None else key_padding_mask[:, None, None, :]  # [N, 1, 1, L]
            out, probs = eager_attention(q, k, v, visible, self.head_dim**-0.5)
            if key_padding_mask is not None:  # a padded patch's own row is noise: zero it
                probs = probs * key_padding_mask[:, None, :, None]
            attentions_out.append(probs)
        return self.out_proj(out.transpose(1, 2).reshape(num_images, length, width))

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [..., C] -> q, k, v [..., C]; one method so that a backend can serve the three with
        one matmul (backends/fusion.py)."""
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)


class VisionMLP(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class VisionEncoderLayer(nn.Module):
    """Pre-LayerNorm transformer block."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = VisionAttention(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = VisionMLP(config)

    def forward(
        self, x: torch.Tensor, key_padding_mask=None, packed: PackedImages | None = None, attentions_out=None
    ) -> torch.Tensor:
        """x [N, L, C] (padded) or [P, C] (packed) -> same shape."""
        x = x + self.self_attn(self.layer_norm1(x), key_padding_mask, packed, attentions_out)
        return x + self.mlp(self.layer_norm2(x))


class VisionTransformer(nn.Module):
    """pixels [N, 3, H, W] + patch mask [N, H//14, W//14] -> patch features [N, L, 1152]."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        self.embeddings = VisionEmbeddings(config)
        self.layers = nn.ModuleList(VisionEncoderLayer(config) for _ in range(config.num_hidden_layers))
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(
        self,
        pixel_values: torch.Tensor,
        patch_attention_mask: torch.Tensor | None = None,
        hidden_states_out: list[torch.Tensor] | None = None,
        attentions_out: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """pixel_values [N, 3, H, W]; patch_attention_mask [N, H//p, W//p] bool (None: all real).

        Returns the post-layernorm features [N, (H//p)*(W//p), C]. If `hidden_states_out` is a
        list, the input of every layer and the last layer's output are appended to it; if
        `attentions_out` is a list, every layer's attention probabilities [N, heads, L, L]
        (see `VisionAttention.forward`). Token l of an image is patch (l // (W//p), l % (W//p)).
        """
        num_images, _, height, width = pixel_values.shape
        patch = self.config.patch_size
        if patch_attention_mask is None:
            patch_attention_mask = torch.ones(
                num_images, height // patch, width // patch, dtype=torch.bool, device=pixel_values.device
            )
        x = self.embeddings(pixel_values, patch_attention_mask)
        key_padding_mask = patch_attention_mask.reshape(num_images, -1)
        if bool(key_padding_mask.all()):
            key_padding_mask = None  # nothing padded: let attention skip the mask entirely
        for layer in self.layers:
            if hidden_states_out is not None:
                hidden_states_out.append(x)
            x = layer(x, key_padding_mask, None, attentions_out)
        if hidden_states_out is not None:
            hidden_states_out.append(x)
        return self.post_layernorm(x)

    def forward_packed(self, packed: PackedImages, hidden_states_out: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Packed patches of I images -> post-layernorm features [P, C] (image after image)."""
        x = self.embeddings.forward_packed(packed)
        for layer in self.layers:
            if hidden_states_out is not None:
                hidden_states_out.append(x)
            x = layer(x, packed=packed)
        if hidden_states_out is not None:
            hidden_states_out.append(x)
        return self.post_layernorm(x)

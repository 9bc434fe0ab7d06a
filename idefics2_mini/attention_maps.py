"""From attention probabilities to "where did the answer look": flows through the decoder and the
perceiver, and the geometry that puts a patch back on the picture.

The method is attention rollout with the residual (Abnar & Zuidema, "Quantifying Attention Flow
in Transformers", ACL 2020, arXiv:2005.00928), applied twice:

1. Decoder. Each layer's attention, averaged over heads, A [T, T], becomes Ã = ½A + ½I (the
   residual connection carries half of each token's state forward unchanged), rows renormalised.
   The flow from the inputs to the output at position q is row q of Ã_N ⋯ Ã_1. Answer token j
   was produced at the position before it, so its row is that position's. Its entries at the
   64·I <image> positions say how much of that output came from each image token, i.e. each
   perceiver latent of each image: `text_flow`.

2. Perceiver. Latents are updated, context patches are not (they are re-read in every layer).
   A layer's attention, averaged over heads, splits into A_ctx [n, L] (to patches) and
   A_lat [n, n] (to latents); with the residual, Ã = ½[A_ctx | A_lat] + ½[0 | I]. Carried
   through the layers, each latent's state is a mix of patches P [n, L] and of the learned
   initial latents Q [n, n]:  P ← Ã_ctx + Ã_lat·P,  Q ← Ã_lat·Q  (from P = 0, Q = I), rows of
   [P | Q] summing to 1. Row k of P is latent k's map over the image: `perceiver_flow`.

The answer's map over image i's patches is then  text_flow[q, image i's tokens] · P_i: the mass
of the answer token's output that came from each patch (the part that came from the learned
latents or from text is not drawn). `method="mean"` replaces each rollout by the plain average
of the layers' head-averaged attention, for comparison.

The vision tower is not rolled back: its 27 layers of L×L attention (L up to 4900) would cost
more than the whole answer; a patch's features stay mostly its own in SigLIP's upper layers,
and maps here place patch l at its own grid cell. (Abnar & Zuidema, and Dosovitskiy et al.'s
ViT paper, roll out through a ViT's layers; `rollout` below does that for any [L, L] list.)

Geometry: an image (or one of its 5 crops when splitting) was resized to (h', w') by the image
processor and cut into R×C whole 14-pixel patches from its top-left corner; the right and bottom
strips narrower than a patch have no token. `CropLayout` keeps, for each crop, its box in the
original picture and its patch grid, so a [R, C] map is drawn back onto the original pixels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from .image_processing import resized_height_width

METHODS = ("rollout", "mean")


# ----------------------------------------------------------------------------- flows


def residual_attention(attention: torch.Tensor) -> torch.Tensor:
    """Head-averaged attention [..., Lq, Lk] of a square layer -> ½A + ½I with rows renormalised
    (a zero row, a padding query, becomes the identity row)."""
    mixed = 0.5 * attention + 0.5 * torch.eye(attention.shape[-1], dtype=attention.dtype, device=attention.device)
    return mixed / mixed.sum(dim=-1, keepdim=True)


def rollout(attentions: Sequence[torch.Tensor], rows: torch.Tensor | None = None) -> torch.Tensor:
    """Attention rollout of square layers, first layer first: each [heads, T, T] (one sequence)
    -> flow [T, T] (or [len(rows), T] for the query positions `rows`): entry (q, j) is how much
    of the last layer's output at q comes from the input at j. Rows sum to 1. fp32."""
    size = attentions[0].shape[-1]
    flow = torch.eye(size) if rows is None else torch.eye(size)[rows]
    for attention in reversed(list(attentions)):  # flow · Ã_N ⋯ Ã_1, applied from the output side
        flow = flow @ residual_attention(attention.float().mean(dim=0).cpu())
    return flow


def text_flow(text_attentions: Sequence[torch.Tensor], positions: Sequence[int], method: str = "rollout",
              row: int = 0) -> torch.Tensor:
    """Decoder attentions (layers of [B, heads, T, T]) -> [len(positions), T]: how much of the
    output at each of `positions` (of batch row `row`) comes from each input token."""
    _check_method(method)
    index = torch.tensor(list(positions), dtype=torch.long)
    layers = [attention[row] for attention in text_attentions]
    if method == "rollout":
        return rollout(layers, index)
    return torch.stack([a.float().mean(dim=0).cpu()[index] for a in layers]).mean(dim=0)


def perceiver_flow(perceiver_attentions: Sequence[torch.Tensor], method: str = "rollout") -> torch.Tensor:
    """Perceiver attentions (layers of [I, heads, n, L + n]; keys = L patches then n latents)
    -> P [I, n, L]: how much of each latent's final state comes from each patch (see the module
    docstring; the rest, 1 - P.sum(-1), comes from the learned initial latents)."""
    _check_method(method)
    layers = [attention.float().mean(dim=1).cpu() for attention in perceiver_attentions]  # [I, n, L + n]
    num_latents = layers[0].shape[1]
    num_patches = layers[0].shape[2] - num_latents
    if method == "mean":
        return torch.stack([layer[..., :num_patches] for layer in layers]).mean(dim=0)
    patches = torch.zeros(layers[0].shape[0], num_latents, num_patches)
    identity = torch.eye(num_latents)
    for layer in layers:
        to_patches = 0.5 * layer[..., :num_patches]  # Ã_ctx
        to_latents = 0.5 * layer[..., num_patches:] + 0.5 * identity  # Ã_lat
        patches = to_patches + to_latents @ patches
    return patches


def image_token_positions(input_ids: torch.Tensor, image_token_id: int, tokens_per_image: int) -> torch.Tensor:
    """input_ids [T] (one sequence) -> [I, tokens_per_image] long: the positions of each image's
    <image> tokens, image after image in reading order (the order the features are spliced in)."""
    positions = (input_ids == image_token_id).nonzero()[:, 0]
    if positions.numel() % tokens_per_image:
        raise ValueError(f"{positions.numel()} <image> tokens is not a multiple of {tokens_per_image} per image")
    return positions.view(-1, tokens_per_image)


def answer_patch_mass(
    text_attentions: Sequence[torch.Tensor],
    perceiver_attentions: Sequence[torch.Tensor],
    input_ids: torch.Tensor,
    query_positions: Sequence[int],
    image_token_id: int,
    method: str = "rollout",
) -> torch.Tensor:
    """One sequence's maps: -> [len(query_positions), I, L], the mass of each query position's
    output that came from each patch of each image (through its image tokens and the perceiver).
    input_ids [T]; the images of this sequence are all of the perceiver's I images."""
    patches = perceiver_flow(perceiver_attentions, method)  # [I, n, L]
    tokens = image_token_positions(input_ids.cpu(), image_token_id, patches.shape[1])  # [I, n]
    if tokens.shape[0] != patches.shape[0]:
        raise ValueError(f"the sequence has {tokens.shape[0]} images' tokens but the perceiver saw {patches.shape[0]}")
    to_tokens = text_flow(text_attentions, query_positions, method)[:, tokens]  # [Q, I, n]
    return torch.einsum("qin,inl->qil", to_tokens, patches)


def grid_values(values: torch.Tensor, patch_grid: torch.Tensor) -> torch.Tensor:
    """values [L] over an image's tokens, patch_grid [R, C] (token index, -1 = padding; from
    `Idefics2Output.patch_grid`) -> [rows, cols] over the image's real patches."""
    rows = int((patch_grid[:, 0] >= 0).sum())
    cols = int((patch_grid[0] >= 0).sum())
    return values[patch_grid[:rows, :cols]]


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")


# ----------------------------------------------------------------------------- geometry


@dataclass(frozen=True)
class CropLayout:
    """Where one model image (a whole picture or one of its crops) lies in the original picture.

    box: (left, top, right, bottom) in the original's pixels; resized: (h', w') the processor
    resized the crop to; rows, cols: its whole 14-pixel patches (the token grid)."""

    image: int  # which original picture
    crop: int  # 0 when not split; else 0..3 quarters (TL, TR, BL, BR), 4 whole
    box: tuple[int, int, int, int]
    resized: tuple[int, int]
    rows: int
    cols: int
    patch_size: int

    def patch_box(self, row: int, col: int) -> tuple[float, float, float, float]:
        """(left, top, right, bottom) of patch (row, col) in the original's pixels."""
        left, top, right, bottom = self.box
        scale_y = (bottom - top) / self.resized[0]
        scale_x = (right - left) / self.resized[1]
        p = self.patch_size
        return (left + col * p * scale_x, top + row * p * scale_y, left + (col + 1) * p * scale_x,
                top + (row + 1) * p * scale_y)


def crop_layouts(image_sizes: Sequence[tuple[int, int]], split: bool, longest_edge: int = 980,
                 shortest_edge: int = 378, patch_size: int = 14) -> list[CropLayout]:
    """Original picture sizes (width, height) -> the layout of every model image, in the order the
    image processor makes them (per picture: the 4 quarters cut at H//2, W//2, then the whole)."""
    layouts = []
    for index, (width, height) in enumerate(image_sizes):
        mid_w, mid_h = width // 2, height // 2
        boxes = [(0, 0, mid_w, mid_h), (mid_w, 0, width, mid_h), (0, mid_h, mid_w, height),
                 (mid_w, mid_h, width, height), (0, 0, width, height)] if split else [(0, 0, width, height)]
        for crop, box in enumerate(boxes):
            resized = resized_height_width(box[3] - box[1], box[2] - box[0], longest_edge, shortest_edge)
            layouts.append(CropLayout(index, crop if split else 0, box, resized, resized[0] // patch_size,
                                      resized[1] // patch_size, patch_size))
    return layouts


def display_size(width: int, height: int, longest: int = 448) -> tuple[int, int]:
    """(width, height) scaled so the longest side is `longest` (the image's aspect ratio kept)."""
    scale = longest / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def paint(mass: np.ndarray, layout: CropLayout, image_size: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
    """A crop's patch mass [rows, cols] -> its density on the original picture drawn at `size`
    (width, height): [height, width] float32, each patch's mass spread evenly over the original
    pixels it covers (so crops of different scales add up in the same unit), 0 elsewhere."""
    width, height = size
    scale_x, scale_y = width / image_size[0], height / image_size[1]
    left, top, _, _ = layout.patch_box(0, 0)
    right, bottom = layout.patch_box(layout.rows - 1, layout.cols - 1)[2:]
    box = [round(left * scale_x), round(top * scale_y), round(right * scale_x), round(bottom * scale_y)]
    canvas = np.zeros((height, width), dtype=np.float32)
    if box[2] <= box[0] or box[3] <= box[1]:
        return canvas
    patch_area = (right - left) * (bottom - top) / (layout.rows * layout.cols)  # original pixels
    density = Image.fromarray(np.ascontiguousarray(mass, dtype=np.float32) / patch_area)  # mode "F"
    density = density.resize((box[2] - box[0], box[3] - box[1]), Image.Resampling.NEAREST)
    canvas[box[1]:box[3], box[0]:box[2]] = np.asarray(density)
    return canvas


def normalised(values: np.ndarray) -> np.ndarray:
    """Scale to [0, 1] by the maximum (all zeros stay zero)."""
    values = np.clip(values, 0.0, None).astype(np.float32)
    top = float(values.max()) if values.size else 0.0
    return values / top if top > 0 else values

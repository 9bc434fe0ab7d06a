"""NaViT "Patch n' Pack": the patches of every image of a batch on one axis, no padding
(Dehghani et al., arXiv:2307.06304; the variable-length attention layout of FlashAttention's
`varlen` functions, cumulative sequence lengths).

The reference pads every image to the batch's largest H×W and masks the padding, so one
980×980 photo next to three 378×378 ones costs four 980×980 images of compute. Packed, the
same batch is 4900 + 3·729 = 7087 patch rows instead of 19600, and each image attends within
its own patches only (block-diagonal attention through cumulative lengths).

    PackedImages.patches     [P, 3, p, p]   every real patch, image after image, row-major
    PackedImages.grid_sizes  [I, 2]         (rows, cols) of each image's patch grid
    PackedImages.images_per_sample          how many of the I images belong to each prompt

Both forms give the same features: a padded patch never influences a real one (it is masked
as a key everywhere), and a real patch's position id depends only on its own image's grid.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class PackedImages:
    patches: torch.Tensor  # [P, 3, p, p]
    grid_sizes: torch.Tensor  # [I, 2] long: patch rows, patch cols per image
    images_per_sample: list[int]  # len B, sums to I

    @property
    def num_images(self) -> int:
        return self.grid_sizes.shape[0]

    @property
    def patches_per_image(self) -> list[int]:
        return (self.grid_sizes[:, 0] * self.grid_sizes[:, 1]).tolist()

    def cu_seqlens(self, extra_per_image: int = 0) -> torch.Tensor:
        """[I + 1] int32 cumulative lengths of the images' sequences (+ `extra_per_image` each)."""
        lengths = self.grid_sizes[:, 0] * self.grid_sizes[:, 1] + extra_per_image
        return torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32).to(self.patches.device)

    def to_padded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (pixel_values [I, 3, R*p, C*p], patch_attention_mask [I, R, C] bool): each image's
        patches put back on the largest grid (R, C = the most rows, cols), zero-padded at the
        bottom and right: the padded layout the reference runs (attention maps use it)."""
        num_images = self.num_images
        rows, cols = (int(n) for n in self.grid_sizes.max(dim=0).values)
        channels, patch = self.patches.shape[1], self.patches.shape[2]
        grid = torch.zeros(num_images, rows, cols, channels, patch, patch, dtype=self.patches.dtype,
                           device=self.patches.device)
        patch_mask = torch.zeros(num_images, rows, cols, dtype=torch.bool, device=self.patches.device)
        start = 0
        for image, (image_rows, image_cols) in enumerate(self.grid_sizes.tolist()):
            count = image_rows * image_cols
            grid[image, :image_rows, :image_cols] = self.patches[start : start + count].view(
                image_rows, image_cols, channels, patch, patch)
            patch_mask[image, :image_rows, :image_cols] = True
            start += count
        # [I, R, C, 3, p, p] -> [I, 3, R, p, C, p] -> [I, 3, R*p, C*p]
        pixel_values = grid.permute(0, 3, 1, 4, 2, 5).reshape(num_images, channels, rows * patch, cols * patch)
        return pixel_values, patch_mask

    def to(self, device=None, dtype=None) -> PackedImages:
        return PackedImages(self.patches.to(device=device, dtype=dtype), self.grid_sizes.to(device),
                            list(self.images_per_sample))


def patchify(image: torch.Tensor, patch_size: int) -> tuple[torch.Tensor, int, int]:
    """image [3, H, W] -> (patches [rows*cols, 3, p, p] row-major, rows, cols).

    Partial patches at the right and bottom edges are dropped: a patch is real only when all
    its pixels are (the padded path's rule)."""
    channels, height, width = image.shape
    rows, cols = height // patch_size, width // patch_size
    cropped = image[:, : rows * patch_size, : cols * patch_size]
    patches = cropped.reshape(channels, rows, patch_size, cols, patch_size).permute(1, 3, 0, 2, 4)
    return patches.reshape(rows * cols, channels, patch_size, patch_size), rows, cols


def pack_images(images_per_sample: Sequence[Sequence[torch.Tensor]], patch_size: int) -> PackedImages:
    """Per-sample lists of unpadded images [3, h, w] -> PackedImages."""
    patches, grids, counts = [], [], []
    for sample in images_per_sample:
        counts.append(len(sample))
        for image in sample:
            if image.dim() != 3:
                raise ValueError(f"each image must be [3, height, width], got shape {list(image.shape)}")
            image_patches, rows, cols = patchify(image, patch_size)
            if rows == 0 or cols == 0:
                raise ValueError(f"an image of {image.shape[1]}x{image.shape[2]} pixels has no whole {patch_size}x"
                                 f"{patch_size} patch")
            patches.append(image_patches)
            grids.append((rows, cols))
    if not patches:
        raise ValueError("no images to pack")
    return PackedImages(torch.cat(patches), torch.tensor(grids, dtype=torch.long), counts)


def pack_padded(
    pixel_values: torch.Tensor, patch_mask: torch.Tensor, images_per_sample: list[int], patch_size: int
) -> PackedImages | None:
    """Real padded images [I, 3, H, W] with their patch mask [I, H/p, W/p] -> PackedImages, or
    None when a mask is not a top-left rectangle of patches (then only the padded path is exact)."""
    rows = patch_mask[:, :, 0].sum(dim=1)
    cols = patch_mask[:, 0, :].sum(dim=1)
    grid_rows = torch.arange(patch_mask.shape[1], device=patch_mask.device)
    grid_cols = torch.arange(patch_mask.shape[2], device=patch_mask.device)
    rectangle = (grid_rows[None, :, None] < rows[:, None, None]) & (grid_cols[None, None, :] < cols[:, None, None])
    if not torch.equal(rectangle, patch_mask):
        return None
    images = [
        image[:, : r * patch_size, : c * patch_size] for image, r, c in zip(pixel_values, rows.tolist(), cols.tolist())
    ]
    patches = [patchify(image, patch_size)[0] for image in images]
    return PackedImages(torch.cat(patches), torch.stack([rows, cols], dim=1).cpu(), list(images_per_sample))

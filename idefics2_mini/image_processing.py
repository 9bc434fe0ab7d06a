"""Images -> the pixel tensors Idefics2 was trained on.

Per image (PIL, uint8 until the rescale):

    load_image        open + fully decode the file (clear errors), apply the EXIF orientation
    to_rgb            any mode -> RGB; transparency is composited onto white
    split (optional)  4 quarter crops (top-left, top-right, bottom-left, bottom-right) + the whole image
    resize            longest edge <= 980 keeping the aspect ratio, then each edge >= 378; PIL bilinear
    rescale           * 1/255 computed in float64, stored as float32
    normalize         (x - 0.5) / 0.5 in float32

Per batch: every image is zero-padded at the bottom/right to the largest H and W of the batch,
samples with fewer images get all-zero images, and `pixel_attention_mask` marks real pixels:

    pixel_values          [B, N, 3, H, W] float32   N = most images in one sample (x5 with splitting)
    pixel_attention_mask  [B, N, H, W]    int64     1 on real pixels, 0 on padding

The arithmetic follows the reference (transformers' PIL image processor) operation by operation,
so the tensors are bit-identical to it, not merely close.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, Union

import numpy as np
import PIL.Image
import PIL.ImageOps
import torch

from .packing import pack_images

# The vision tower's patch side (Idefics2-8B: 14); packed output is cut into patches of this size.
PATCH_SIZE = 14

ImageLike = Union[str, Path, PIL.Image.Image]


def load_image(path_or_image: ImageLike) -> PIL.Image.Image:
    """Open an image file (or check a PIL image) and return it fully decoded, in its own mode.

    Files get their EXIF orientation applied (so phone photos come out upright); a PIL image
    that is passed in is used as it is. Raises FileNotFoundError for a missing path and
    ValueError for a file that is not an image, is truncated/corrupt, or has zero width/height.
    """
    if isinstance(path_or_image, PIL.Image.Image):
        image = path_or_image
        source = f"PIL image (mode {image.mode})"
        try:
            image.load()  # a lazily opened file is decoded here; a no-op for in-memory images
        except (OSError, SyntaxError, ValueError) as error:
            raise ValueError(f"PIL image could not be decoded (truncated or corrupt file?): {error}") from error
    elif isinstance(path_or_image, (str, Path)):
        path = Path(path_or_image)
        source = str(path)
        if not path.exists():
            raise FileNotFoundError(f"Image file not found: {path}")
        if not path.is_file():
            raise ValueError(f"Image path is not a file: {path}")
        try:
            image = PIL.Image.open(path)
            # open() reads only the header; load() decodes the pixels, which is where a truncated
            # or corrupt file fails. Fail here, with the file's name, rather than deep in a resize.
            image.load()
        except PIL.UnidentifiedImageError as error:
            raise ValueError(f"Not a readable image file (unknown or invalid format): {path}") from error
        except (OSError, SyntaxError, ValueError) as error:
            raise ValueError(f"Image file is truncated or corrupt: {path} ({error})") from error
        image = PIL.ImageOps.exif_transpose(image)
    else:
        raise TypeError(
            f"Expected an image as a file path (str or pathlib.Path) or a PIL.Image.Image, "
            f"got {type(path_or_image).__name__}"
        )
    if image.width == 0 or image.height == 0:
        raise ValueError(f"Image has zero size ({image.width}x{image.height}): {source}")
    return image


def to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    """Any PIL mode -> RGB. Images with an alpha band or a transparent palette colour are
    composited onto white (as the released model was trained); everything else (L, P, CMYK,
    16-bit I;16 / I, ...) uses PIL's own conversion (which clips 16-bit values above 255)."""
    has_transparency = "A" in image.getbands() or image.info.get("transparency") is not None
    if not has_transparency:
        return image.convert("RGB")
    white = PIL.Image.new("RGBA", image.size, (255, 255, 255, 255))
    return PIL.Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")


def resized_height_width(height: int, width: int, longest_edge: int = 980, shortest_edge: int = 378) -> tuple[int, int]:
    """Target (height, width): scale the longest edge down to `longest_edge` if it is longer,
    truncating the other edge to an int, then raise each edge to at least `shortest_edge`
    (this second step stretches very thin images; it does not keep the aspect ratio)."""
    if height <= 0 or width <= 0:
        raise ValueError(f"Cannot resize an image of size {height}x{width} (height x width)")
    # Same float expressions as the reference, so the int truncation lands on the same pixel.
    aspect_ratio = width / height
    if width >= height and width > longest_edge:
        width = longest_edge
        height = int(width / aspect_ratio)
    elif height > width and height > longest_edge:
        height = longest_edge
        width = int(height * aspect_ratio)
    return max(height, shortest_edge), max(width, shortest_edge)


def split_into_quarters_and_whole(rgb: np.ndarray) -> list[np.ndarray]:
    """[H, W, 3] -> [top-left, top-right, bottom-left, bottom-right, whole]; the quarters are
    cut at H // 2 and W // 2 (the bottom/right ones get the odd row/column)."""
    height, width = rgb.shape[:2]
    if height < 2 or width < 2:
        raise ValueError(
            f"Image splitting needs an image at least 2x2 pixels to cut into quarters, got "
            f"{width}x{height} (width x height); turn do_image_splitting off for this image."
        )
    mid_h, mid_w = height // 2, width // 2
    return [rgb[:mid_h, :mid_w], rgb[:mid_h, mid_w:], rgb[mid_h:, :mid_w], rgb[mid_h:, mid_w:], rgb]


@dataclass
class Idefics2ImageProcessor:
    """Images -> `pixel_values` [B, N, 3, H, W] float32 and `pixel_attention_mask` [B, N, H, W] int64.

    Defaults are the official Idefics2-8B preprocessing; `from_pretrained(dir)` reads a
    `preprocessor_config.json` when the folder has one.
    """

    do_image_splitting: bool = False
    longest_edge: int = 980
    shortest_edge: int = 378
    rescale_factor: float = 1 / 255
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    def __post_init__(self):
        if not 0 < self.shortest_edge <= self.longest_edge:
            raise ValueError(
                f"Need 0 < shortest_edge <= longest_edge, got shortest_edge={self.shortest_edge}, "
                f"longest_edge={self.longest_edge}"
            )
        for name in ("image_mean", "image_std"):
            value = getattr(self, name)
            if isinstance(value, (int, float)):
                value = (value,) * 3
            if len(value) != 3:
                raise ValueError(f"{name} needs 3 values (R, G, B), got {value}")
            setattr(self, name, tuple(float(v) for v in value))

    @classmethod
    def from_pretrained(cls, directory: str | Path | None = None, **overrides) -> "Idefics2ImageProcessor":
        """Read `directory/preprocessor_config.json` if present (official key names); else defaults.
        Keyword `overrides` (e.g. do_image_splitting=True) win over the file."""
        options: dict = {}
        config_file = Path(directory) / "preprocessor_config.json" if directory is not None else None
        if config_file is not None and config_file.is_file():
            options = cls._options_from_config(json.loads(config_file.read_text()), config_file)
        options.update(overrides)
        return cls(**options)

    @staticmethod
    def _options_from_config(config: dict, source: Path) -> dict:
        # Steps this implementation always performs; a config that turns one off asks for
        # something else than what Idefics2 was trained with, so say so instead of ignoring it.
        for flag in ("do_convert_rgb", "do_resize", "do_rescale", "do_normalize", "do_pad"):
            if config.get(flag, True) is not True:
                raise ValueError(f"{source}: {flag}={config[flag]!r} is not supported (Idefics2 always uses True)")
        if config.get("resample", 2) != 2:
            raise ValueError(f"{source}: resample={config['resample']!r} is not supported (only 2 = PIL bilinear)")
        options = {}
        if "do_image_splitting" in config:
            options["do_image_splitting"] = bool(config["do_image_splitting"])
        size = config.get("size") or {}
        if "longest_edge" in size:
            options["longest_edge"] = int(size["longest_edge"])
        if "shortest_edge" in size:
            options["shortest_edge"] = int(size["shortest_edge"])
        for key in ("rescale_factor", "image_mean", "image_std"):
            if key in config:
                options[key] = config[key]
        return options

    # ------------------------------------------------------------------ one image

    def preprocess_image(self, image: ImageLike) -> list[np.ndarray]:
        """One image -> its normalized crops, each [3, h, w] float32 (1 crop, or 5 when splitting)."""
        rgb = np.asarray(to_rgb(load_image(image)))  # [H, W, 3] uint8
        crops = split_into_quarters_and_whole(rgb) if self.do_image_splitting else [rgb]
        return [self._resize_rescale_normalize(crop) for crop in crops]

    def _resize_rescale_normalize(self, rgb: np.ndarray) -> np.ndarray:
        """[h, w, 3] uint8 -> [3, h', w'] float32."""
        height, width = rgb.shape[:2]
        new_height, new_width = resized_height_width(height, width, self.longest_edge, self.shortest_edge)
        # PIL bilinear on uint8, PIL's default reducing_gap (None), exactly as the reference.
        resized = np.asarray(
            PIL.Image.fromarray(np.ascontiguousarray(rgb)).resize(
                (new_width, new_height), resample=PIL.Image.Resampling.BILINEAR
            )
        )
        # Rescale in float64 then store float32; normalize in float32 (the reference's op order).
        pixels = (resized.astype(np.float64) * self.rescale_factor).astype(np.float32)
        mean = np.asarray(self.image_mean, dtype=np.float32)
        std = np.asarray(self.image_std, dtype=np.float32)
        pixels = (pixels - mean) / std
        return np.ascontiguousarray(pixels.transpose(2, 0, 1))  # [3, h', w']

    # ------------------------------------------------------------------ a batch

    def __call__(
        self, images: ImageLike | Sequence[ImageLike] | Sequence[Sequence[ImageLike]], packed: bool = False
    ) -> dict[str, torch.Tensor]:
        """Process a batch.

        `images`: one image (-> B=1, N=1), a flat list of images (one sample with all of them,
        B=1), or a list with one list of images per sample (B = len(images); a sample may have
        fewer images, or none, and is padded with all-zero images). An image is a file path or
        a PIL image.

        Returns {"pixel_values": [B, N, 3, H, W] float32, "pixel_attention_mask": [B, N, H, W] int64};
        with `packed=True`, {"pixel_values": PackedImages} instead: every image's own 14×14
        patches on one axis, no padding (see packing.py; the model accepts both forms).
        """
        per_sample = self.as_nested_image_list(images)
        processed = [[crop for image in sample for crop in self.preprocess_image(image)] for sample in per_sample]
        if packed:
            tensors = [[torch.from_numpy(crop) for crop in sample] for sample in processed]
            return {"pixel_values": pack_images(tensors, PATCH_SIZE)}
        return self.pad_batch(processed)

    @staticmethod
    def as_nested_image_list(images) -> list[list[ImageLike]]:
        """image | flat list | list of lists -> one list of images per sample (validated)."""
        def is_image(item) -> bool:
            return isinstance(item, (str, Path, PIL.Image.Image))

        if is_image(images):
            return [[images]]
        if not isinstance(images, (list, tuple)) or len(images) == 0:
            raise ValueError(
                "images must be an image (path or PIL image), a non-empty list of images, "
                f"or a list of lists of images; got {type(images).__name__} {images!r:.80}"
            )
        if all(is_image(item) for item in images):
            return [list(images)]
        if all(isinstance(item, (list, tuple)) and all(is_image(x) for x in item) for item in images):
            if sum(len(sample) for sample in images) == 0:
                raise ValueError("images: every sample's list of images is empty")
            return [list(sample) for sample in images]
        raise ValueError(
            "images must be an image, a flat list of images, or a list of lists of images (paths or "
            "PIL images), not a mix"
        )

    @staticmethod
    def pad_batch(processed: list[list[np.ndarray]]) -> dict[str, torch.Tensor]:
        """Per-sample lists of [3, h, w] float32 arrays -> padded tensors (see `__call__`)."""
        batch_size = len(processed)
        max_images = max(len(sample) for sample in processed)
        max_height = max(img.shape[1] for sample in processed for img in sample)
        max_width = max(img.shape[2] for sample in processed for img in sample)
        pixel_values = torch.zeros(batch_size, max_images, 3, max_height, max_width, dtype=torch.float32)
        pixel_attention_mask = torch.zeros(batch_size, max_images, max_height, max_width, dtype=torch.int64)
        for b, sample in enumerate(processed):
            for n, img in enumerate(sample):
                _, h, w = img.shape
                pixel_values[b, n, :, :h, :w] = torch.from_numpy(img)
                pixel_attention_mask[b, n, :h, :w] = 1
        return {"pixel_values": pixel_values, "pixel_attention_mask": pixel_attention_mask}

"""Image processing: bit-identical to the reference PIL image processor, and clear errors."""

from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from idefics2_mini.image_processing import Idefics2ImageProcessor, load_image, resized_height_width, to_rgb

IMAGES = Path(__file__).parent / "data" / "images"
SAMPLE_NAMES = [
    "astronaut.png",  # 512x512 RGB
    "chelsea.png",  # 451x300
    "coffee.png",  # 600x400
    "grace_hopper.jpg",  # 512x600
    "horse.png",  # 400x328 RGBA: composited onto white
    "hubble_deep_field.jpg",  # 1000x872: scaled down to 980
    "page.png",  # 384x191 grayscale
    "rocket.jpg",  # 427x640
]


def reference_image_processor(do_image_splitting: bool):
    transformers = pytest.importorskip("transformers")
    return transformers.Idefics2ImageProcessorPil(do_image_splitting=do_image_splitting)


def open_sample(name: str) -> PIL.Image.Image:
    image = PIL.Image.open(IMAGES / name)
    image.load()
    return image


def synthetic(width: int, height: int, mode: str = "RGB", seed: int = 0) -> PIL.Image.Image:
    """Random noise image (noise is the hardest case for bit-exact resampling)."""
    rng = np.random.default_rng(seed)
    rgb = PIL.Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8))
    return rgb if mode == "RGB" else rgb.convert(mode)


def assert_same_as_reference(nested_images, do_image_splitting: bool):
    ours = Idefics2ImageProcessor(do_image_splitting=do_image_splitting)(nested_images)
    reference = reference_image_processor(do_image_splitting)(nested_images, return_tensors="pt")
    assert set(ours) == {"pixel_values", "pixel_attention_mask"}
    for key in ours:
        assert ours[key].dtype == reference[key].dtype, key
        assert ours[key].shape == reference[key].shape, key
        assert torch.equal(ours[key], reference[key]), key
    return ours


@pytest.mark.parametrize("do_image_splitting", [False, True])
def test_sample_photos_bit_identical(do_image_splitting):
    # Each photo in a batch of its own (keeps memory small); padding is covered below.
    small = open_sample("chelsea.png").resize((150, 100))  # smaller than 378: scaled up
    for image in [open_sample(name) for name in SAMPLE_NAMES] + [small]:
        out = assert_same_as_reference([[image]], do_image_splitting)
        assert out["pixel_values"].shape[:2] == (1, 5 if do_image_splitting else 1)


def test_each_photo_alone_has_expected_size():
    processor = Idefics2ImageProcessor()
    expected_hw = {  # (H, W) after resizing, no padding
        "astronaut.png": (512, 512),
        "hubble_deep_field.jpg": (854, 980),  # int(980 / (1000 / 872)) = 854
        "page.png": (378, 384),  # 191 high -> raised to 378; aspect ratio not kept
        "rocket.jpg": (427, 640),  # 640 wide, 427 high
    }
    for name, hw in expected_hw.items():
        out = processor(IMAGES / name)
        assert out["pixel_values"].shape == (1, 1, 3, *hw), name
        assert out["pixel_attention_mask"].all()


@pytest.mark.parametrize("do_image_splitting", [False, True])
def test_synthetic_extremes_bit_identical(do_image_splitting):
    nested = [[synthetic(2000, 20)], [synthetic(20, 2000, seed=1)], [synthetic(1001, 999, seed=2)]]
    if not do_image_splitting:
        nested.append([synthetic(1, 1, seed=3)])
    assert_same_as_reference(nested, do_image_splitting)


def test_resize_rule():
    assert resized_height_width(20, 2000) == (378, 980)  # int(980 / 100) = 9 -> raised to 378
    assert resized_height_width(2000, 20) == (980, 378)
    assert resized_height_width(1, 1) == (378, 378)
    assert resized_height_width(600, 500) == (600, 500)  # already inside [378, 980]


@pytest.mark.parametrize("mode", ["L", "P", "CMYK", "LA", "RGBA", "1", "I;16", "I", "PA"])
def test_image_modes_bit_identical(mode):
    image = synthetic(64, 48, mode="RGB", seed=4)
    if mode in ("LA", "RGBA", "PA"):
        # Give it real transparency so the white compositing is exercised.
        rgba = image.convert("RGBA")
        alpha = PIL.Image.fromarray(np.tile(np.linspace(0, 255, 64, dtype=np.uint8), (48, 1)))
        rgba.putalpha(alpha)
        image = rgba.convert(mode)
    elif mode in ("I;16", "I"):
        values = np.random.default_rng(5).integers(0, 600, size=(48, 64)).astype(np.uint16)
        image = PIL.Image.fromarray(values)  # uint16 -> mode I;16
        image = image if mode == "I;16" else image.convert("I")
    else:
        image = image.convert(mode)
    assert image.mode == mode
    assert_same_as_reference([[image]], do_image_splitting=False)


def test_palette_with_transparent_colour_goes_to_white():
    image = PIL.Image.new("P", (40, 30), 0)
    image.putpalette([10, 20, 30] + [200, 100, 50] * 255)
    image.paste(1, (0, 0, 20, 30))
    image.info["transparency"] = 0  # colour 0 (right half) is transparent
    rgb = np.asarray(to_rgb(image))
    assert (rgb[:, 20:] == 255).all() and (rgb[:, :20] == [200, 100, 50]).all()
    assert_same_as_reference([[image]], do_image_splitting=False)


def test_transparent_pixels_become_white():
    # horse.png is RGBA but nearly opaque; make its left half fully transparent, the rest half.
    horse = open_sample("horse.png")
    assert horse.mode == "RGBA"
    rgba = np.array(horse)
    rgba[..., 3] = 128
    rgba[:, :200, 3] = 0
    see_through = PIL.Image.fromarray(rgba)
    rgb = np.asarray(to_rgb(see_through))
    assert (rgb[:, :200] == 255).all()
    assert_same_as_reference([[see_through], [horse]], do_image_splitting=False)


@pytest.mark.parametrize("do_image_splitting", [False, True])
def test_batches_with_different_image_counts(do_image_splitting):
    nested = [
        [open_sample("coffee.png"), open_sample("page.png")],
        [open_sample("chelsea.png")],
        [open_sample("rocket.jpg"), open_sample("horse.png")],
    ]
    out = assert_same_as_reference(nested, do_image_splitting)
    per_image = 5 if do_image_splitting else 1
    # The sample with one image is padded with all-zero images and an all-zero mask.
    assert (out["pixel_values"][1, per_image:] == 0).all()
    assert (out["pixel_attention_mask"][1, per_image:] == 0).all()
    # Real pixels of the smallest image: exactly its own H x W is marked.
    if not do_image_splitting:  # chelsea 451x300 -> 451 wide, raised to 378 high
        assert out["pixel_attention_mask"][1, 0].sum() == 378 * 451


def test_input_forms_paths_flat_list_single():
    processor = Idefics2ImageProcessor()
    path = IMAGES / "chelsea.png"
    single = processor(path)
    from_str = processor(str(path))
    from_pil = processor(open_sample("chelsea.png"))
    flat = processor([path, IMAGES / "page.png"])  # a flat list is one sample with two images
    assert torch.equal(single["pixel_values"], from_str["pixel_values"])
    assert torch.equal(single["pixel_values"], from_pil["pixel_values"])
    assert flat["pixel_values"].shape[:2] == (1, 2)


def test_from_pretrained_reads_preprocessor_config(tmp_path):
    (tmp_path / "preprocessor_config.json").write_text(
        '{"do_image_splitting": true, "size": {"longest_edge": 700, "shortest_edge": 100},'
        ' "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "rescale_factor": 0.00392156862745098,'
        ' "resample": 2, "do_pad": true}'
    )
    processor = Idefics2ImageProcessor.from_pretrained(tmp_path)
    assert processor.do_image_splitting and processor.longest_edge == 700 and processor.shortest_edge == 100
    defaults = Idefics2ImageProcessor.from_pretrained(tmp_path / "..")  # no config there: defaults
    assert (defaults.longest_edge, defaults.shortest_edge, defaults.do_image_splitting) == (980, 378, False)
    (tmp_path / "preprocessor_config.json").write_text('{"resample": 3}')
    with pytest.raises(ValueError, match="resample"):
        Idefics2ImageProcessor.from_pretrained(tmp_path)


# ---------------------------------------------------------------------- bad input


def test_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_image(tmp_path / "nope.png")
    with pytest.raises(FileNotFoundError):
        Idefics2ImageProcessor()([str(tmp_path / "nope.png")])


def test_truncated_file(tmp_path):
    data = (IMAGES / "grace_hopper.jpg").read_bytes()
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(data[: len(data) // 3])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_image(truncated)
    png = (IMAGES / "page.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(png[: len(png) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        Idefics2ImageProcessor()(tmp_path / "truncated.png")
    lazily_opened = PIL.Image.open(truncated)  # a PIL image whose pixels are not read yet
    with pytest.raises(ValueError, match="truncated or corrupt"):
        Idefics2ImageProcessor()([lazily_opened])


def test_non_image_bytes(tmp_path):
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_bytes(b"this is plain text, not a PNG\n" * 10)
    with pytest.raises(ValueError, match="Not a readable image"):
        load_image(not_an_image)
    with pytest.raises(ValueError, match="not a file"):
        load_image(tmp_path)


def test_zero_size_image():
    with pytest.raises(ValueError, match="zero size"):
        load_image(PIL.Image.new("RGB", (0, 10)))
    with pytest.raises(ValueError, match="zero size"):
        Idefics2ImageProcessor()([PIL.Image.new("RGB", (10, 0))])


def test_splitting_needs_two_pixels_each_side():
    tiny = synthetic(1, 1)
    with pytest.raises(ValueError, match="at least 2x2"):
        Idefics2ImageProcessor(do_image_splitting=True)(tiny)
    # The reference fails too (with a ZeroDivisionError deep inside its resize).
    with pytest.raises(Exception):
        reference_image_processor(True)([[tiny]], return_tensors="pt")


def test_bad_structures():
    processor = Idefics2ImageProcessor()
    with pytest.raises(TypeError):
        load_image(np.zeros((4, 4, 3), dtype=np.uint8))
    with pytest.raises(ValueError):
        processor([])
    with pytest.raises(ValueError):
        processor([IMAGES / "page.png", [IMAGES / "page.png"]])
    with pytest.raises(ValueError):
        Idefics2ImageProcessor(shortest_edge=1000, longest_edge=980)

"""NaViT packing: packed images give the padded path's output and the reference's."""

from __future__ import annotations

from pathlib import Path

import PIL.Image
import pytest
import torch
from reference_models import make_reference_checkpoint, reference_position_ids

import idefics2_mini as im
from idefics2_mini.packing import PackedImages, pack_images, pack_padded
from idefics2_mini.processor import Idefics2Processor
from idefics2_mini.vision import patch_mask_from_pixel_mask

IMAGES = Path(__file__).parent / "data" / "images"
N_LATENTS = 4


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A tiny model that takes real processor output: 980 px / 14 px patches = 70×70 positions."""
    path = tmp_path_factory.mktemp("packing")
    reference = make_reference_checkpoint(path, seed=21, image_size=980, vision_hidden=24, vision_heads=2,
                                          n_latents=N_LATENTS)
    return reference, im.Idefics2.from_pretrained(path)


def processor(split: bool) -> Idefics2Processor:
    base = Idefics2Processor.from_pretrained(None, do_image_splitting=split)
    return Idefics2Processor(tokenizer=base.tokenizer, image_processor=base.image_processor, image_seq_len=N_LATENTS)


def mixed_batch():
    """Sample 0: a 1000×872 photo (→ 980×854) and a small one (→ 378×...); sample 1: one
    portrait photo; sample 2: text only."""
    small = PIL.Image.open(IMAGES / "chelsea.png").convert("RGB").resize((150, 100))
    prompts = ["<image>Look.<image>Compare them.", "What is<image>this?", "No picture here."]
    images = [[str(IMAGES / "hubble_deep_field.jpg"), small], [str(IMAGES / "rocket.jpg")], []]
    return prompts, images


@pytest.mark.parametrize("split", [False, True], ids=["whole", "split"])
def test_packed_equals_padded_and_reference(pair, split):
    reference, ours = pair
    prompts, images = mixed_batch()
    padded = processor(split)(text=prompts, images=images)
    packed = processor(split)(text=prompts, images=images, packed=True)
    assert isinstance(packed["pixel_values"], PackedImages) and "pixel_attention_mask" not in packed
    assert torch.equal(packed["input_ids"], padded["input_ids"])
    real = padded["attention_mask"].bool()
    with torch.no_grad():
        ours.image_layout = "padded"
        logits_padded = ours(**padded)
        ours.image_layout = "auto"
        logits_packed = ours(**packed)
        logits_auto = ours(**padded)  # auto packs the padded form itself
        expected = reference(**padded, position_ids=reference_position_ids(padded["attention_mask"])).logits
    assert (logits_packed - logits_padded)[real].abs().max() <= 1e-5
    assert (logits_auto - logits_padded)[real].abs().max() <= 1e-5
    assert (logits_packed - expected)[real].abs().max() <= 1e-4


def test_packed_patch_count_has_no_padding(pair):
    prompts, images = mixed_batch()
    packed = processor(False)(text=prompts, images=images, packed=True)["pixel_values"]
    padded = processor(False)(text=prompts, images=images)
    sizes = [(h // 14, w // 14) for h, w in [(854, 980), (378, 567), (378, 566)]]
    assert packed.images_per_sample == [2, 1, 0]
    assert packed.grid_sizes.tolist()[0] == list(sizes[0])
    real = padded["pixel_values"].flatten(0, 1).flatten(1).any(dim=1)
    patch_mask = patch_mask_from_pixel_mask(padded["pixel_attention_mask"].flatten(0, 1)[real], 14)
    assert packed.patches.shape[0] == int(patch_mask.sum()) < patch_mask.numel()
    # Packing the padded form gives the same patches.
    again = pack_padded(padded["pixel_values"].flatten(0, 1)[real], patch_mask, [2, 1, 0], 14)
    assert torch.equal(again.patches, packed.patches) and torch.equal(again.grid_sizes, packed.grid_sizes)


def test_list_of_tensors_form(pair):
    _, ours = pair
    generator = torch.Generator().manual_seed(0)
    images = [[torch.rand(3, 378, 420, generator=generator) * 2 - 1], [torch.rand(3, 434, 378, generator=generator)]]
    ids = torch.tensor([[1] + [32000] + [32001] * N_LATENTS + [32000] + [5]] * 2)
    padded = torch.zeros(2, 1, 3, 434, 420)
    mask = torch.zeros(2, 1, 434, 420, dtype=torch.long)
    for b, (image,) in enumerate(images):
        padded[b, 0, :, : image.shape[1], : image.shape[2]] = image
        mask[b, 0, : image.shape[1], : image.shape[2]] = 1
    with torch.no_grad():
        from_list = ours(ids, None, images)
        ours.image_layout = "padded"
        from_padded = ours(ids, None, padded, mask)
        ours.image_layout = "auto"
    assert (from_list - from_padded).abs().max() <= 1e-5


def test_pack_images_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"\[3, height, width\]"):
        pack_images([[torch.zeros(378, 378)]], 14)
    with pytest.raises(ValueError, match="no whole 14x14 patch"):
        pack_images([[torch.zeros(3, 10, 378)]], 14)
    with pytest.raises(ValueError, match="no images"):
        pack_images([[]], 14)

"""Parity with the reference implementation (transformers Idefics2) on tiny random checkpoints:
vision hidden states, connector output and logits, fp32, max abs diff <= 1e-4."""

from __future__ import annotations

import pytest
import torch
from reference_models import image_prompt_ids, make_reference_checkpoint, reference_position_ids

import idefics2_mini as im

TOL = 1e-4


def left_pad(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(r) for r in rows)
    input_ids = torch.zeros(len(rows), length, dtype=torch.long)
    attention_mask = torch.zeros(len(rows), length, dtype=torch.long)
    for b, row in enumerate(rows):
        input_ids[b, length - len(row) :] = torch.tensor(row)
        attention_mask[b, length - len(row) :] = 1
    return input_ids, attention_mask


def random_images(sizes_per_sample: list[list[tuple[int, int]]], seed: int = 0):
    """Pixel tensors padded like the processor pads them: [B, N, 3, Hmax, Wmax] + pixel mask;
    samples with fewer images get all-zero images."""
    generator = torch.Generator().manual_seed(seed)
    num_images = max(len(s) for s in sizes_per_sample)
    height = max(h for s in sizes_per_sample for h, _ in s)
    width = max(w for s in sizes_per_sample for _, w in s)
    pixel_values = torch.zeros(len(sizes_per_sample), num_images, 3, height, width)
    pixel_mask = torch.zeros(len(sizes_per_sample), num_images, height, width, dtype=torch.long)
    for b, sizes in enumerate(sizes_per_sample):
        for i, (h, w) in enumerate(sizes):
            pixel_values[b, i, :, :h, :w] = torch.rand(3, h, w, generator=generator) * 2 - 1
            pixel_mask[b, i, :h, :w] = 1
    return pixel_values, pixel_mask


def compare(reference, ours, input_ids, attention_mask, pixel_values=None, pixel_mask=None):
    with torch.no_grad():
        out = ours(input_ids, attention_mask, pixel_values, pixel_mask, output_hidden_states=True)
        ref = reference(
            input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
            pixel_attention_mask=pixel_mask, position_ids=reference_position_ids(attention_mask),
        )
    real = attention_mask.bool()
    diff = (out.logits - ref.logits)[real].abs().max().item()
    assert diff <= TOL, f"logits differ by {diff}"
    if pixel_values is not None:
        ref_features = torch.cat(ref.image_outputs.pooler_output).reshape(out.image_features.shape)
        assert (out.image_features - ref_features).abs().max().item() <= TOL
    return out, ref


@pytest.fixture(scope="module")
def gqa_pair(tmp_path_factory):
    """GQA 2 in the decoder and perceiver, head dims 24 / 12 / 12 (not powers of two)."""
    path = tmp_path_factory.mktemp("gqa")
    reference = make_reference_checkpoint(path, seed=0)
    return reference, im.Idefics2.from_pretrained(path), path


@pytest.fixture(scope="module")
def mha_pair(tmp_path_factory):
    """GQA ratio 1 everywhere, tiny sliding window."""
    path = tmp_path_factory.mktemp("mha")
    reference = make_reference_checkpoint(
        path, seed=1, text_heads=2, text_kv_heads=2, text_head_dim=20, sliding_window=5,
        perceiver_heads=3, perceiver_kv_heads=3, perceiver_head_dim=10, vision_hidden=40, vision_heads=4,
    )
    return reference, im.Idefics2.from_pretrained(path), path


def test_text_only_left_padded_longer_than_window(gqa_pair):
    reference, ours, _ = gqa_pair
    generator = torch.Generator().manual_seed(3)
    rows = [torch.randint(3, 32000, (n,), generator=generator).tolist() for n in (40, 23, 1)]
    compare(reference, ours, *left_pad(rows))


def test_several_images_padding_image_and_sizes(gqa_pair):
    """Sample 0: two images (one 42 wide: not a multiple of 14 after the first 3 patches... and
    50 tall: partial patches dropped); sample 1: one image + an all-zero padding image."""
    reference, ours, _ = gqa_pair
    pixel_values, pixel_mask = random_images([[(56, 56), (50, 45)], [(28, 56)]])
    rows = [image_prompt_ids([1, 100, 200], 2, 4, [300, 400, 500]), image_prompt_ids([1, 7, 8, 9, 10, 11], 1, 4, [12])]
    out, ref = compare(reference, ours, *left_pad(rows), pixel_values, pixel_mask)
    # Vision tower alone, on the 3 real images with their patch masks.
    assert out.image_features.shape == (3, 4, 96)
    images = pixel_values.reshape(-1, 3, 56, 56)[[0, 1, 2]]
    patch_mask = im.vision.patch_mask_from_pixel_mask(pixel_mask.reshape(-1, 56, 56)[[0, 1, 2]], 14)
    with torch.no_grad():
        ours_vision = ours.vision(images, patch_mask)
        ref_vision = reference.model.vision_model(pixel_values=images, patch_attention_mask=patch_mask).last_hidden_state
    real_patches = patch_mask.flatten(1)
    assert (ours_vision - ref_vision)[real_patches].abs().max().item() <= TOL


def test_ratio_one_and_tiny_window(mha_pair):
    reference, ours, _ = mha_pair
    pixel_values, pixel_mask = random_images([[(56, 56)], [(42, 28), (56, 14)]], seed=5)
    rows = [image_prompt_ids([1, 5, 6], 1, 4, list(range(40, 60))), image_prompt_ids([1], 2, 4, [9, 10])]
    compare(reference, ours, *left_pad(rows), pixel_values, pixel_mask)


def test_hidden_states_exposed(gqa_pair):
    _, ours, _ = gqa_pair
    input_ids, attention_mask = left_pad([[1, 2, 3, 4]])
    with torch.no_grad():
        out = ours(input_ids, attention_mask, output_hidden_states=True)
    assert len(out.text_hidden_states) == ours.config.text.num_hidden_layers + 1
    assert out.logits.shape == (1, 4, 32003)


def test_bf16_close_to_fp32(gqa_pair):
    _, ours32, path = gqa_pair
    ours16 = im.Idefics2.from_pretrained(path, dtype=torch.bfloat16)
    assert ours16.lm_head.weight.dtype == torch.bfloat16
    pixel_values, pixel_mask = random_images([[(56, 56)]], seed=2)
    input_ids, attention_mask = left_pad([image_prompt_ids([1, 100], 1, 4, [300, 400])])
    with torch.no_grad():
        logits32 = ours32(input_ids, attention_mask, pixel_values, pixel_mask)
        logits16 = ours16(input_ids, attention_mask, pixel_values, pixel_mask)
    assert logits16.dtype == torch.bfloat16
    relative = (logits16.float() - logits32).norm() / logits32.norm()
    assert relative < 0.05, relative
    assert (logits16.float().argmax(-1) == logits32.argmax(-1)).float().mean() > 0.8


def test_image_token_count_must_match(gqa_pair):
    _, ours, _ = gqa_pair
    pixel_values, pixel_mask = random_images([[(56, 56)]])
    too_many_tokens = torch.tensor([image_prompt_ids([1], 2, 4, [5])])
    with pytest.raises(im.InputError, match="8 <image> tokens .* 1 image"):
        ours(too_many_tokens, None, pixel_values, pixel_mask)
    with pytest.raises(im.InputError, match="<image> tokens"):
        ours(torch.tensor([image_prompt_ids([1], 1, 4, [5])]))  # image tokens, no pixels
    with pytest.raises(im.InputError, match="<image> tokens"):
        ours(torch.tensor([[1, 5, 6]]), None, pixel_values, pixel_mask)  # pixels, no image tokens


def test_bad_text_inputs(gqa_pair):
    _, ours, _ = gqa_pair
    with pytest.raises(im.InputError, match="at most 512"):
        ours(torch.ones(1, 513, dtype=torch.long))
    with pytest.raises(im.InputError, match="outside"):
        ours(torch.tensor([[1, 40000]]))
    with pytest.raises(im.InputError, match="attention_mask has shape"):
        ours(torch.tensor([[1, 2]]), torch.ones(1, 3))
    with pytest.raises(im.InputError, match=r"\[batch, tokens\]"):
        ours(torch.tensor([1, 2]))
    with pytest.raises(im.InputError, match="pixel_values must be"):
        ours(torch.tensor([[1, 2]]), None, torch.zeros(3, 28, 28))

"""output_attentions: every vision, perceiver and decoder layer's attention probabilities equal
the reference's eager attention (<= 1e-5, fp32, tiny random checkpoints), padded and packed
images, left padding, a window shorter than the sequence; the same per generate step; the
default path never runs the written-out attention; forward hooks on the stable module names."""

from __future__ import annotations

import pytest
import torch
from reference_models import image_prompt_ids, make_reference_checkpoint, reference_position_ids
from test_model_parity import left_pad, random_images

import idefics2_mini as im
from idefics2_mini import connector, text, vision
from idefics2_mini.packing import pack_images

TOL = 1e-5


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """GQA 2 in the decoder and the perceiver, a sliding window of 6 tokens (the prompts are longer)."""
    path = tmp_path_factory.mktemp("attn")
    reference = make_reference_checkpoint(path, seed=3, sliding_window=6)
    return reference, im.Idefics2.from_pretrained(path)


def reference_attentions(reference, input_ids, attention_mask, pixel_values, pixel_mask):
    """The reference's eager attention probabilities: decoder from output_attentions, vision and
    perceiver read with forward hooks (its get_image_features does not pass output_attentions on)."""
    captured = {"vision": [], "perceiver": []}
    modules = [(layer.self_attn, "vision") for layer in reference.model.vision_model.encoder.layers]
    modules += [(layer.self_attn, "perceiver") for layer in reference.model.connector.perceiver_resampler.layers]
    hooks = [m.register_forward_hook(lambda _m, _i, out, key=key: captured[key].append(out[1])) for m, key in modules]
    try:
        with torch.no_grad():
            out = reference(
                input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                pixel_attention_mask=pixel_mask, position_ids=reference_position_ids(attention_mask),
                output_attentions=True,
            )
    finally:
        for hook in hooks:
            hook.remove()
    return captured["vision"], captured["perceiver"], list(out.attentions), out.logits


def batch_with_images():
    """Sample 0: a 56x56 and a 50x45 image (partial patches); sample 1: a 28x56 image and an
    all-zero padding image; left-padded prompts longer than the window."""
    pixel_values, pixel_mask = random_images([[(56, 56), (50, 45)], [(28, 56)]], seed=11)
    rows = [image_prompt_ids([1, 100, 200], 2, 4, [300, 400, 500]),
            image_prompt_ids([1, 7, 8, 9, 10, 11], 1, 4, [12])]
    return (*left_pad(rows), pixel_values, pixel_mask)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def test_forward_attentions_equal_reference_padded_images(pair):
    reference, ours = pair
    input_ids, attention_mask, pixel_values, pixel_mask = batch_with_images()
    ref_vision, ref_perceiver, ref_text, ref_logits = reference_attentions(
        reference, input_ids, attention_mask, pixel_values, pixel_mask)
    with torch.no_grad():
        out = ours(input_ids, attention_mask, pixel_values, pixel_mask, output_attentions=True)
    config = ours.config
    assert len(out.vision_attentions) == config.vision.num_hidden_layers
    assert len(out.perceiver_attentions) == config.perceiver.resampler_depth
    assert len(out.text_attentions) == config.text.num_hidden_layers
    assert (out.logits - ref_logits)[attention_mask.bool()].abs().max() <= 1e-4

    # Which patch of which image is which token: 3 real images on a 4x4 grid of patches.
    patch_mask = vision.patch_mask_from_pixel_mask(pixel_mask.reshape(-1, 56, 56)[[0, 1, 2]], 14)
    assert out.image_index.tolist() == [[0, 0], [0, 1], [1, 0]]
    assert out.patch_grid.shape == (3, 4, 4)
    assert out.patch_grid[1].tolist() == [[0, 1, 2, -1], [4, 5, 6, -1], [8, 9, 10, -1], [-1, -1, -1, -1]]
    real_patch = patch_mask.flatten(1)  # [3, 16]

    for ours_layer, ref_layer in zip(out.vision_attentions, ref_vision):
        assert ours_layer.shape == ref_layer.shape == (3, config.vision.num_attention_heads, 16, 16)
        rows = real_patch[:, None, :, None]
        assert max_diff(ours_layer * rows, ref_layer * rows) <= TOL
        # padding rows and columns are zero; real rows sum to one
        assert not ours_layer.masked_select(~rows).any()
        assert not ours_layer.masked_select(~real_patch[:, None, None, :]).any()
        assert torch.allclose(ours_layer.sum(-1)[real_patch[:, None, :].expand(-1, ours_layer.shape[1], -1)],
                              torch.tensor(1.0))
    for ours_layer, ref_layer in zip(out.perceiver_attentions, ref_perceiver):
        assert ours_layer.shape == ref_layer.shape == (3, 4, 4, 16 + 4)
        assert max_diff(ours_layer, ref_layer) <= TOL
        assert not ours_layer[..., :16].masked_select(~real_patch[:, None, None, :]).any()
    real_token = attention_mask.bool()
    for ours_layer, ref_layer in zip(out.text_attentions, ref_text):
        assert ours_layer.shape == ref_layer.shape == (2, 4, *input_ids.shape[1:], input_ids.shape[1])
        rows = real_token[:, None, :, None]
        assert max_diff(ours_layer * rows, ref_layer * rows) <= TOL
        assert not ours_layer.masked_select(~rows).any()  # a padding query: zero (the reference: uniform)
        assert not ours_layer.masked_select(~real_token[:, None, None, :]).any()
        # outside the window of 6 tokens: zero
        assert not ours_layer[..., 10, :4].any() and ours_layer[0, :, 10, 5:11].sum(-1).allclose(torch.tensor(1.0))


def test_packed_images_give_the_padded_maps(pair):
    _, ours = pair
    input_ids, attention_mask, pixel_values, pixel_mask = batch_with_images()
    unpadded = [[pixel_values[0, 0], pixel_values[0, 1, :, :50, :45]], [pixel_values[1, 0, :, :28, :]]]
    with torch.no_grad():
        padded = ours(input_ids, attention_mask, pixel_values, pixel_mask, output_attentions=True)
        for images in (unpadded, pack_images(unpadded, 14)):
            packed = ours(input_ids, attention_mask, images, output_attentions=True)
            assert torch.equal(packed.patch_grid, padded.patch_grid)
            assert torch.equal(packed.image_index, padded.image_index)
            for name in ("vision_attentions", "perceiver_attentions", "text_attentions"):
                for a, b in zip(getattr(packed, name), getattr(padded, name)):
                    assert a.shape == b.shape and max_diff(a, b) <= TOL, name
            assert max_diff(packed.logits, padded.logits) <= 1e-4


def test_parts_labels_and_default_path(pair, monkeypatch):
    _, ours = pair
    input_ids, attention_mask, pixel_values, pixel_mask = batch_with_images()
    with torch.no_grad():
        full = ours(input_ids, attention_mask, pixel_values, pixel_mask, output_attentions=True)
        some = ours(input_ids, attention_mask, pixel_values, pixel_mask, output_attentions=("perceiver", "text"))
        labels = input_ids.masked_fill(attention_mask == 0, -100)
        trained = ours(input_ids, attention_mask, pixel_values, pixel_mask, labels=labels, output_attentions=["text"])
        plain_loss = ours(input_ids, attention_mask, pixel_values, pixel_mask, labels=labels).loss
    assert some.vision_attentions == [] and len(some.perceiver_attentions) == 2
    for a, b in zip(some.text_attentions + some.perceiver_attentions, full.text_attentions + full.perceiver_attentions):
        assert max_diff(a, b) <= TOL
    assert len(trained.text_attentions) == 2 and trained.perceiver_attentions == []
    assert abs(trained.loss.item() - plain_loss.item()) <= 1e-5
    with pytest.raises(ValueError, match="unknown part"):
        ours(input_ids, attention_mask, output_attentions=("decoder",))

    # Unless asked, the written-out attention never runs: forward and generate use the kernels.
    def forbidden(*args, **kwargs):
        raise AssertionError("eager attention ran on the default path")

    for module in (vision, connector, text):
        monkeypatch.setattr(module, "eager_attention", forbidden)
    with torch.no_grad():
        logits = ours(input_ids, attention_mask, pixel_values, pixel_mask)
        ours.generate(input_ids, attention_mask, pixel_values, pixel_mask, max_new_tokens=3)
    assert isinstance(logits, torch.Tensor) and max_diff(logits, full.logits) <= 1e-4


def test_generate_attentions_per_step_equal_reference(pair):
    """Prefill [B, heads, T, T], then each step [B, heads, 1, T + s] over every token so far; the
    reference keeps only the window's 6 keys once past it: our last 6 columns, the rest zero."""
    reference, ours = pair
    input_ids, attention_mask, pixel_values, pixel_mask = batch_with_images()
    new = 4
    with torch.no_grad():
        ref = reference.generate(
            input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
            pixel_attention_mask=pixel_mask, max_new_tokens=new, do_sample=False, output_attentions=True,
            return_dict_in_generate=True, bad_words_ids=[[32000], [32001]], eos_token_id=None,
        )
        out = ours.generate(input_ids, attention_mask, pixel_values, pixel_mask, max_new_tokens=new,
                            eos_token_id=[], output_attentions=True)
        fast = ours.generate(input_ids, attention_mask, pixel_values, pixel_mask, max_new_tokens=new, eos_token_id=[])
    assert torch.equal(out.sequences, fast) and torch.equal(out.sequences, ref.sequences)
    assert len(out.steps) == len(ref.attentions) == new
    assert len(out.steps[0].perceiver_attentions) == 2 and out.steps[0].patch_grid.shape == (3, 4, 4)
    prompt_len = input_ids.shape[1]
    real = attention_mask.bool()
    for step, (ours_step, ref_step) in enumerate(zip(out.steps, ref.attentions)):
        for ours_layer, ref_layer in zip(ours_step.text_attentions, ref_step):
            if step == 0:
                rows = real[:, None, :, None]
                assert max_diff(ours_layer * rows, ref_layer * rows) <= TOL
                continue
            assert ours_layer.shape == (2, 4, 1, prompt_len + step)
            window = ref_layer.shape[-1]
            assert max_diff(ours_layer[..., -window:], ref_layer) <= TOL
            assert not ours_layer[..., :-window].any()


def test_forward_hooks_read_and_replace_blocks(pair):
    """The documented way to read or replace a block's output: a forward hook on a module named
    as in the checkpoint (text.layers.N, connector, vision.layers.N.mlp, ...)."""
    _, ours = pair
    input_ids, attention_mask, pixel_values, pixel_mask = batch_with_images()
    seen = {}
    read = ours.get_submodule("vision.layers.0").register_forward_hook(
        lambda module, args, output: seen.setdefault("vision.layers.0", output))
    with torch.no_grad():
        out = ours(input_ids, attention_mask, pixel_values, pixel_mask, output_hidden_states=True)
    read.remove()
    # the tower ran packed (the images differ in size): the hook saw [P, C] rows of real patches
    assert max_diff(seen["vision.layers.0"], out.vision_hidden_states[1]) == 0

    # (`vision` and `connector` themselves run through forward_packed for packed images, so hooks
    # go on their blocks, which are always called as modules)
    replace = ours.get_submodule("connector.perceiver_resampler.norm").register_forward_hook(
        lambda module, args, output: output * 0)
    try:
        with torch.no_grad():
            zeroed = ours(input_ids, attention_mask, pixel_values, pixel_mask, output_hidden_states=True)
    finally:
        replace.remove()
    assert not zeroed.image_features.any() and max_diff(zeroed.logits, out.logits) > 1e-3
    names = {name for name, _ in ours.named_modules()}
    assert {"vision.layers.1.self_attn", "connector.perceiver_resampler.layers.1.self_attn",
            "text.layers.1.self_attn", "text.layers.1.mlp", "lm_head"} <= names

"""The whole model run through the Triton kernels (Triton's interpreter on CPU) equals the
model run through the torch references: the kernels are wired into vision, perceiver and decoder."""

from __future__ import annotations

import pytest
import torch
from reference_models import image_prompt_ids, make_reference_checkpoint
from test_model_parity import left_pad, random_images

import idefics2_mini as im
import kernels


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("kernels-model")
    make_reference_checkpoint(path, seed=5, scale=3.0, sliding_window=4)
    return im.Idefics2.from_pretrained(path)


def run(model, monkeypatch, mode, image_features, **batch):
    """-> (image features, logits given `image_features`, greedy tokens) with the kernels of `mode`."""
    monkeypatch.setenv(kernels.KERNELS_ENV, mode)
    with torch.no_grad():
        features = model.get_image_features(batch["pixel_values"], batch["pixel_attention_mask"])
        logits = model(batch["input_ids"], batch["attention_mask"], image_features=image_features)
        tokens = model.generate(**batch, max_new_tokens=6, eos_token_id=[])
    return features, logits, tokens


def assert_close(got: torch.Tensor, expected: torch.Tensor) -> None:
    # Weights scaled x3 give attention scores in the hundreds, where one fp32 ulp is ~3e-5:
    # the kernels' different (online-softmax) summation order shows up at that relative size.
    scale = expected.abs().max()
    assert (got - expected).abs().max() <= 3e-5 * scale, ((got - expected).abs().max(), scale)


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_model_through_triton_equals_reference(model, monkeypatch, layout):
    """Vision tower + connector (image features), decoder (logits, both given the same image
    features) and the whole generation (greedy tokens) through the kernels. The decoder gets
    the same features in both runs because this peaked model amplifies a rounding-level
    difference of the features (~1e-5 relative) about tenfold per layer: judged end to end,
    the tolerance would depend on the CPU's rounding (it did: AMD EPYC in, Intel Xeon out)."""
    pixel_values, pixel_mask = random_images([[(28, 42)], [(42, 28), (28, 28)]], seed=3)
    input_ids, attention_mask = left_pad(
        [image_prompt_ids([1, 5, 6], 1, 4, [7, 8, 9, 10, 11]), image_prompt_ids([1], 2, 4, [12, 13])]
    )
    batch = dict(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                 pixel_attention_mask=pixel_mask)
    model.image_layout = layout
    try:
        with torch.no_grad():
            features = model.get_image_features(pixel_values, pixel_mask)
        features_torch, logits_torch, tokens_torch = run(model, monkeypatch, "torch", features, **batch)
        features_triton, logits_triton, tokens_triton = run(model, monkeypatch, "triton", features, **batch)
    finally:
        model.image_layout = "auto"
    assert_close(features_triton, features_torch)
    real = attention_mask.bool()
    assert_close(logits_triton[real], logits_torch[real])
    assert torch.equal(tokens_triton, tokens_torch)

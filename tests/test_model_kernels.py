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


def run(model, monkeypatch, mode, **batch):
    monkeypatch.setenv(kernels.KERNELS_ENV, mode)
    with torch.no_grad():
        logits = model(**batch)
        tokens = model.generate(**batch, max_new_tokens=6, eos_token_id=[])
    return logits, tokens


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_model_through_triton_equals_reference(model, monkeypatch, layout):
    pixel_values, pixel_mask = random_images([[(28, 42)], [(42, 28), (28, 28)]], seed=3)
    input_ids, attention_mask = left_pad(
        [image_prompt_ids([1, 5, 6], 1, 4, [7, 8, 9, 10, 11]), image_prompt_ids([1], 2, 4, [12, 13])]
    )
    batch = dict(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                 pixel_attention_mask=pixel_mask)
    model.image_layout = layout
    try:
        logits_torch, tokens_torch = run(model, monkeypatch, "torch", **batch)
        logits_triton, tokens_triton = run(model, monkeypatch, "triton", **batch)
    finally:
        model.image_layout = "auto"
    real = attention_mask.bool()
    # Weights scaled x3 give attention scores in the hundreds, where one fp32 ulp is ~3e-5:
    # the kernels' different (online-softmax) summation order shows up at that relative size.
    scale = logits_torch[real].abs().max()
    assert (logits_triton - logits_torch)[real].abs().max() <= 3e-5 * scale, scale
    assert torch.equal(tokens_triton, tokens_torch)

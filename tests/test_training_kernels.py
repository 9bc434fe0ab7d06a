"""Training through the Triton kernels (attention forward + backward, RMSNorm forward +
backward; Triton's interpreter on the CPU) equals the reference: loss and every gradient, for
padded and packed images, with a sliding window shorter than the sequence."""

from __future__ import annotations

import pytest
import torch
from reference_models import image_prompt_ids, make_reference_checkpoint
from test_model_parity import left_pad, random_images
from test_training_parity import run_both

import idefics2_mini as im
import kernels


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    path = tmp_path_factory.mktemp("train-kernels")
    reference = make_reference_checkpoint(path, seed=6, sliding_window=6)
    return reference, im.Idefics2.from_pretrained(path)


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_loss_and_gradients_through_triton(pair, monkeypatch, layout):
    reference, ours = pair
    monkeypatch.setenv(kernels.KERNELS_ENV, "triton")
    pixel_values, pixel_mask = random_images([[(28, 42)], [(42, 28), (28, 28)]], seed=4)
    rows = [image_prompt_ids([1, 5, 6], 1, 4, [7, 8, 9, 10, 11]), image_prompt_ids([1], 2, 4, [12, 13])]
    run_both(reference, ours, *left_pad(rows), pixel_values, pixel_mask, layout=layout)


def test_the_kernels_ran_both_ways(pair, monkeypatch):
    """Guard against a silent fallback to the references: count the Triton launches of a
    training step (attention forward and backward: every vision, perceiver and decoder layer;
    RMSNorm backward: every norm of the decoder and the perceiver)."""
    _, ours = pair
    monkeypatch.setenv(kernels.KERNELS_ENV, "triton")
    calls = {"forward": 0, "backward": 0, "rms_norm_backward": 0}

    def counting(module, name, key):
        launch = getattr(module, name)

        def counted(*args, **kwargs):
            calls[key] += 1
            return launch(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)

    counting(kernels.attention_prefill, "_launch", "forward")
    counting(kernels.attention_backward, "_launch_backward", "backward")
    counting(kernels.rmsnorm, "_rms_norm_bwd_launch", "rms_norm_backward")
    pixel_values, pixel_mask = random_images([[(28, 28)]], seed=1)
    input_ids, attention_mask = left_pad([image_prompt_ids([1, 5, 6], 1, 4, [7, 8, 9])])
    labels = input_ids.masked_fill(input_ids >= 32000, -100)
    ours.requires_grad_(True)
    ours.zero_grad(set_to_none=True)
    ours(input_ids, attention_mask, pixel_values, pixel_mask, labels=labels).loss.backward()
    config = ours.config
    layers = config.vision.num_hidden_layers + config.perceiver.resampler_depth + config.text.num_hidden_layers
    norms = 2 * config.text.num_hidden_layers + 1 + 3 * config.perceiver.resampler_depth + 1
    assert calls == {"forward": layers, "backward": layers, "rms_norm_backward": norms}
    assert all(p.grad is not None for n, p in ours.named_parameters() if ".self_attn." in n and "vision" not in n)

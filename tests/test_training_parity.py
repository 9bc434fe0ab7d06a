"""Training parity with the reference (transformers Idefics2) on tiny random checkpoints, fp32:
the loss (<= 1e-5 relative) and the gradient of every parameter and of pixel_values
(max |Δ| <= 1e-4 of the gradient's own scale), for padded and packed image layouts, several
images per sample (as image splitting makes them), left padding, and a sliding window shorter
than the sequence."""

from __future__ import annotations

import pytest
import torch
from reference_models import image_prompt_ids, make_reference_checkpoint, reference_position_ids
from test_model_parity import left_pad, random_images

import idefics2_mini as im
from idefics2_mini.loading import ours_to_official

LOSS_RTOL = 1e-5
GRAD_RTOL = 1e-4


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    path = tmp_path_factory.mktemp("train")
    reference = make_reference_checkpoint(path, seed=4, sliding_window=12)
    ours = im.Idefics2.from_pretrained(path)
    return reference, ours


def labels_like(input_ids: torch.Tensor, attention_mask: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Counted tokens: random text positions (never padding, image tokens or a row's first token,
    which is BOS in a real batch and is predicted by nothing), the rest -100."""
    generator = torch.Generator().manual_seed(seed)
    keep = torch.rand(input_ids.shape, generator=generator) < 0.6
    keep &= attention_mask.bool() & (input_ids != 32001) & (input_ids != 32000)
    keep &= attention_mask.cumsum(dim=1) > 1
    return input_ids.masked_fill(~keep, -100)


def grads_of(model: torch.nn.Module, official: bool) -> dict[str, torch.Tensor]:
    return {
        (ours_to_official(n) if official else n): p.grad.clone()
        for n, p in model.named_parameters()
        if p.grad is not None
    }


def assert_grads_match(ours_grads: dict, ref_grads: dict) -> None:
    """max |Δ| <= GRAD_RTOL × the gradient's own max |g|, floored at 1e-3 of the model's largest
    gradient: the key projection's bias has a gradient that is mathematically zero (softmax
    ignores a shift common to all keys), rounding noise of ~1e-9 in both implementations."""
    assert set(ours_grads) == set(ref_grads), set(ours_grads) ^ set(ref_grads)
    floor = 1e-3 * max(g.abs().max().item() for g in ref_grads.values())
    worst = max(
        ((ours_grads[n] - ref_grads[n]).abs().max().item() / max(ref_grads[n].abs().max().item(), floor), n)
        for n in ref_grads
    )
    assert worst[0] <= GRAD_RTOL, f"gradient of {worst[1]} differs by {worst[0]:.2e} of its scale"


def run_both(reference, ours, input_ids, attention_mask, pixel_values=None, pixel_mask=None, layout="auto"):
    labels = labels_like(input_ids, attention_mask)
    ours.image_layout = layout
    for model in (reference, ours):
        model.zero_grad(set_to_none=True)
        model.requires_grad_(True)
        model.train()
    ours_pixels = None if pixel_values is None else pixel_values.clone().requires_grad_(True)
    ref_pixels = None if pixel_values is None else pixel_values.clone().requires_grad_(True)
    out = ours(input_ids, attention_mask, ours_pixels, pixel_mask, labels=labels)
    ref = reference(
        input_ids=input_ids, attention_mask=attention_mask, pixel_values=ref_pixels, pixel_attention_mask=pixel_mask,
        position_ids=reference_position_ids(attention_mask), labels=labels,
    )
    assert abs(out.loss.item() - ref.loss.item()) <= LOSS_RTOL * abs(ref.loss.item()), (out.loss.item(), ref.loss.item())
    out.loss.backward()
    ref.loss.backward()
    assert_grads_match(grads_of(ours, official=True), grads_of(reference, official=False))
    if pixel_values is not None:
        scale = ref_pixels.grad.abs().max().item()
        assert scale > 0
        assert (ours_pixels.grad - ref_pixels.grad).abs().max().item() <= GRAD_RTOL * scale
    ours.image_layout = "auto"
    return out, ref


def test_text_only_left_padded_past_the_window(pair):
    reference, ours = pair
    generator = torch.Generator().manual_seed(1)
    rows = [torch.randint(3, 32000, (n,), generator=generator).tolist() for n in (30, 17)]
    out, _ = run_both(reference, ours, *left_pad(rows))
    assert out.logits.shape == (2, 30, 32003)


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_images_of_different_sizes(pair, layout):
    """Sample 0: two images of different sizes (partial patches); sample 1: one image and an
    all-zero padding image. Packed: no padded patch is computed; padded: masked out."""
    reference, ours = pair
    pixel_values, pixel_mask = random_images([[(56, 56), (42, 45)], [(28, 56)]], seed=2)
    rows = [image_prompt_ids([1, 100, 200], 2, 4, [300, 400, 500]), image_prompt_ids([1, 7, 8, 9], 1, 4, [12, 13])]
    run_both(reference, ours, *left_pad(rows), pixel_values, pixel_mask, layout=layout)


def test_five_images_per_sample_like_splitting(pair):
    """Image splitting turns one image into 4 crops + the whole: 5 images, 5 blocks of tokens."""
    reference, ours = pair
    crops = [(28, 28), (28, 28), (28, 14), (28, 14), (56, 42)]
    pixel_values, pixel_mask = random_images([crops], seed=3)
    rows = [image_prompt_ids([1, 50, 60], 5, 4, [70, 80, 90])]
    run_both(reference, ours, *left_pad(rows), pixel_values, pixel_mask)


def test_loss_with_logits_dropped_is_the_same(pair):
    """keep_logits=False runs the lm_head on counted positions only: same loss, same gradients."""
    _, ours = pair
    ours.requires_grad_(True)
    input_ids, attention_mask = left_pad([[1, 5, 6, 7, 8, 9], [1, 10, 11]])
    labels = labels_like(input_ids, attention_mask, seed=2)
    grads = []
    for keep in (True, False):
        ours.zero_grad(set_to_none=True)
        out = ours(input_ids, attention_mask, labels=labels, keep_logits=keep)
        out.loss.backward()
        grads.append((out.loss.detach(), grads_of(ours, official=False)))
    assert out.logits is None
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-6, atol=0)
    assert_grads_match(grads[1][1], grads[0][1])


def test_num_counted_weighs_tokens_across_micro_batches(pair):
    """Two micro-batches with num_counted = the whole batch's count add up to the loss of the
    whole batch, however the counted tokens fall into them."""
    _, ours = pair
    input_ids, attention_mask = left_pad([[1, 5, 6, 7, 8, 9, 10], [1, 10, 11]])
    labels = labels_like(input_ids, attention_mask, seed=5)
    total = int((labels[:, 1:] != -100).sum())
    with torch.no_grad():
        whole = ours(input_ids, attention_mask, labels=labels).loss
        parts = sum(
            ours(input_ids[i : i + 1], attention_mask[i : i + 1], labels=labels[i : i + 1], num_counted=total).loss
            for i in range(2)
        )
    torch.testing.assert_close(parts, whole, rtol=1e-6, atol=1e-7)


def test_labels_shape_must_match(pair):
    _, ours = pair
    with pytest.raises(im.InputError, match="labels has shape"):
        ours(torch.tensor([[1, 2, 3]]), labels=torch.tensor([[1, 2]]))


@pytest.mark.parametrize("split", [False, True], ids=["whole", "split"])
def test_chat_batch_from_the_processor(pair, split):
    """The processor's training batch (labels from the chat rule) of two chats with photos of
    different aspect ratios, image splitting off and on: loss and gradients equal the reference's."""
    from pathlib import Path

    from idefics2_mini.image_processing import Idefics2ImageProcessor

    reference, ours = pair
    images = Path(__file__).parent / "data" / "images"
    processor = im.Idefics2Processor(
        image_processor=Idefics2ImageProcessor(do_image_splitting=split, longest_edge=56, shortest_edge=28),
        image_seq_len=4,
    )
    chats = [
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
         {"role": "assistant", "content": "A rocket."}],
        [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Compare."}]},
         {"role": "assistant", "content": "A cat; a coffee."},
         {"role": "user", "content": "Sure?"},
         {"role": "assistant", "content": "Yes."}],
    ]
    batch = processor.training_batch(
        chats, [[images / "rocket.jpg"], [images / "chelsea.png", images / "coffee.png"]]
    )
    assert batch["pixel_values"].shape[1] == (10 if split else 2)
    labels = batch.pop("labels")
    for model in (reference, ours):
        model.zero_grad(set_to_none=True)
        model.requires_grad_(True)
    out = ours(**batch, labels=labels)
    ref = reference(**batch, position_ids=reference_position_ids(batch["attention_mask"]), labels=labels)
    assert abs(out.loss.item() - ref.loss.item()) <= LOSS_RTOL * abs(ref.loss.item())
    out.loss.backward()
    ref.loss.backward()
    assert_grads_match(grads_of(ours, official=True), grads_of(reference, official=False))

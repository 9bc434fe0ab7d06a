"""The plain model and the speed backends applied from outside (idefics2_mini/backends): the
plain model is nn.Linear layers and nothing else; the backends keep every name, give the same
results, and step aside whenever the plain path is what is asked for (a gradient, a replaced
linear)."""

from __future__ import annotations

import pytest
import torch
from reference_models import make_reference_checkpoint
from test_generation import image_batch
from torch import nn

import idefics2_mini as im
from idefics2_mini.backends import cpu, fusion

LINEAR_NAMES = {"q_proj", "k_proj", "v_proj", "o_proj", "out_proj", "gate_proj", "up_proj", "down_proj",
                "fc1", "fc2", "lm_head"}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("backends")
    make_reference_checkpoint(path, seed=6, scale=3.0)
    return path


def linears(model: nn.Module) -> dict[str, nn.Module]:
    return {name: module for name, module in model.named_modules() if isinstance(module, nn.Linear)}


def test_the_plain_model_is_plain_linears(checkpoint):
    built = im.Idefics2(im.Idefics2Config.from_pretrained(checkpoint))
    loaded = im.Idefics2.from_pretrained(checkpoint, backends=False)
    for model in (built, loaded):
        assert {type(module) for module in linears(model).values()} == {nn.Linear}
        assert {name.rsplit(".", 1)[-1] for name in linears(model)} == LINEAR_NAMES
        assert fusion.fused_groups(model) == []


def test_backends_keep_names_and_results(checkpoint):
    plain = im.Idefics2.from_pretrained(checkpoint, backends=False)
    fast = im.Idefics2.from_pretrained(checkpoint)
    assert linears(fast).keys() == linears(plain).keys()
    assert {type(module) for module in linears(fast).values()} == {cpu.CpuLinear}
    assert [name for name, _ in fast.named_parameters()] == [name for name, _ in plain.named_parameters()]
    assert len(fusion.fused_groups(fast)) > 0
    batch = image_batch()
    with torch.no_grad():
        expected = plain(**batch)
        assert (fast(**batch) - expected).abs().max() <= 1e-5 * expected.abs().max()  # rounding order only
    assert torch.equal(fast.generate(**batch, max_new_tokens=8, eos_token_id=[]),
                       plain.generate(**batch, max_new_tokens=8, eos_token_id=[]))
    # Built another way, then sped up: the same.
    built = im.apply_backends(im.Idefics2.from_pretrained(checkpoint, backends=False))
    assert len(fusion.fused_groups(built)) == len(fusion.fused_groups(fast))
    with torch.no_grad():
        assert (built(**batch) - expected).abs().max() <= 1e-5 * expected.abs().max()


def test_training_through_the_backends_is_the_plain_models(checkpoint):
    """Gradients wanted: fused projections and oneDNN step aside, so the loss and every
    gradient equal the plain model's."""
    batch = image_batch()
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    grads = []
    for backends in (False, True):
        model = im.Idefics2.from_pretrained(checkpoint, mmap=False, backends=backends).requires_grad_(True)
        model(**batch, labels=labels).loss.backward()
        grads.append({name: param.grad for name, param in model.named_parameters()})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_a_replaced_linear_runs_instead_of_the_fusion(checkpoint):
    """A wrapper put in place of a fused linear (as LoRA does) is what runs: the fused matrix
    would skip it."""
    model = im.Idefics2.from_pretrained(checkpoint)
    attention = model.text.layers[0].self_attn
    group = fusion.fused_group(attention)
    assert group is not None and group.current()
    calls = []

    class Counting(nn.Linear):
        def forward(self, x):
            calls.append(1)
            return super().forward(x)

    wrapped = Counting(attention.k_proj.in_features, attention.k_proj.out_features, bias=False)
    wrapped.weight = attention.k_proj.weight
    attention.k_proj = wrapped
    assert not group.current()
    with torch.no_grad():
        model(torch.tensor([[1, 5, 6, 7]]))
    assert calls == [1]


def test_fusion_is_undone_and_redone():
    config = im.Idefics2Config.from_dict({})
    with torch.device("meta"):
        model = im.Idefics2(config)
    assert fusion.fused_groups(model) == []
    fusible = len(fusion.fusible_modules(model))
    assert fusible == 27 + 3 + 32 + 3 + 32 + 1  # attentions and SwiGLUs of vision, perceiver, decoder, projector
    with pytest.raises(ValueError, match="fusion mode"):
        fusion.fuse_projections(model, "nonsense")
    fusion.unfuse_projections(model)
    assert fusion.fused_groups(model) == []

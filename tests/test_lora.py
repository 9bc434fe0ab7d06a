"""LoRA (lora.py) and the training levers (training.py): targets, freezing, merge/unmerge,
the adapter file in PEFT's layout (loaded into the reference with peft: same logits and
gradients), checkpointing with a frozen base, fp32 master weights for a bf16 model."""

from __future__ import annotations

import pytest
import torch
from reference_models import image_prompt_ids, make_reference_checkpoint, reference_position_ids
from test_model_parity import left_pad, random_images

import idefics2_mini as im
from idefics2_mini import lora
from idefics2_mini.training import (
    OptimizerStep,
    enable_checkpointing,
    learning_rate,
    parameter_counts,
    set_trainable,
    trainable_parameters,
)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("lora")
    reference = make_reference_checkpoint(path, seed=7)
    return path, reference


def batch_with_images(seed: int = 0):
    pixel_values, pixel_mask = random_images([[(56, 56)], [(42, 28), (28, 56)]], seed=seed)
    rows = [image_prompt_ids([1, 5, 6], 1, 4, [7, 8, 9, 10]), image_prompt_ids([1], 2, 4, [11, 12])]
    input_ids, attention_mask = left_pad(rows)
    labels = input_ids.masked_fill((attention_mask == 0) | (input_ids >= 32000), -100)
    labels[:, :2] = -100
    return dict(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                pixel_attention_mask=pixel_mask), labels


def randomize_adapters(model, seed: int = 0) -> None:
    """B starts at zero (a no-op adapter); give it values so that tests can see it."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in lora.lora_modules(model).values():
            module.lora_B.weight.copy_(torch.randn(module.lora_B.weight.shape, generator=generator) * 0.1)


def test_default_targets_are_the_recipes(checkpoint):
    model = im.Idefics2.from_pretrained(checkpoint[0])
    names = lora.apply(model, rank=4)
    assert all(n.startswith(("text.layers.", "connector.")) for n in names)
    per_text_layer = [n for n in names if n.startswith("text.layers.0.")]
    assert sorted(n.rsplit(".", 1)[1] for n in per_text_layer) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    assert "connector.modality_projection.gate_proj" in names
    assert any(".perceiver_resampler.layers.1.self_attn.o_proj" in n for n in names)
    assert not any(n.startswith("vision.") or n == "lm_head" for n in names)
    trainable = trainable_parameters(model)
    assert trainable and all(".lora_" in n for n in trainable)
    assert all(p.dtype == torch.float32 for p in trainable.values())
    # Official names work as targets too (the model's recipe regex is written for them).
    other = im.Idefics2.from_pretrained(checkpoint[0])
    official = lora.apply(other, [r".*(text_model|modality_projection|perceiver_resampler).*(down|gate|up|k|q|v|o)_proj"])
    assert official == names


def test_fresh_adapter_is_a_no_op_and_merge_round_trips(checkpoint):
    path, _ = checkpoint
    base = im.Idefics2.from_pretrained(path)
    model = im.Idefics2.from_pretrained(path)
    batch, _ = batch_with_images()
    with torch.no_grad():
        expected = base(**batch)
        lora.apply(model, rank=4)
        # Equal up to rounding: the adapted linears run unfused, on F.linear.
        torch.testing.assert_close(model(**batch), expected, rtol=1e-5, atol=1e-5)
        randomize_adapters(model)
        adapted = model(**batch)
        assert (adapted - expected).abs().max() > 1e-3
        lora.merge(model)
        torch.testing.assert_close(model(**batch), adapted, rtol=1e-5, atol=1e-4)
        lora.unmerge(model)
        torch.testing.assert_close(model(**batch), adapted, rtol=1e-5, atol=1e-5)
        lora.remove(model, merge=False)
        assert not lora.lora_modules(model)
        torch.testing.assert_close(model(**batch), expected, rtol=1e-5, atol=1e-5)


def test_adapter_loads_into_the_reference_with_peft(checkpoint, tmp_path):
    """Our adapter file in PEFT's layout: the reference + peft gives our logits, our loss and
    our adapters' gradients; and loading it back here restores the same model."""
    peft = pytest.importorskip("peft")
    path, _ = checkpoint
    ours = im.Idefics2.from_pretrained(path)
    lora.apply(ours, rank=4, alpha=8)
    randomize_adapters(ours, seed=1)
    lora.save_adapter(ours, tmp_path / "adapter")

    from transformers import Idefics2ForConditionalGeneration

    reference = Idefics2ForConditionalGeneration.from_pretrained(path, attn_implementation="eager")
    reference = peft.PeftModel.from_pretrained(reference, tmp_path / "adapter", is_trainable=True)
    batch, labels = batch_with_images(seed=3)
    out = ours(**batch, labels=labels)
    ref = reference(**batch, labels=labels, position_ids=reference_position_ids(batch["attention_mask"]))
    real = batch["attention_mask"].bool()
    assert (out.logits - ref.logits)[real].abs().max().item() <= 1e-4
    assert abs(out.loss.item() - ref.loss.item()) <= 1e-5 * ref.loss.item()
    out.loss.backward()
    ref.loss.backward()
    ref_grads = {
        n.replace("base_model.model.", "").replace(".default", ""): p.grad
        for n, p in reference.named_parameters() if p.grad is not None
    }
    ours_grads = {k.replace("base_model.model.", ""): v for k, v in _grads_by_official(ours).items()}
    assert set(ours_grads) == set(ref_grads)
    for name, grad in ref_grads.items():
        assert (ours_grads[name] - grad).abs().max() <= 1e-4 * grad.abs().max(), name

    again = im.Idefics2.from_pretrained(path)
    assert lora.load_adapter(again, tmp_path / "adapter") == list(lora.lora_modules(ours))
    with torch.no_grad():
        torch.testing.assert_close(again(**batch), out.logits.detach(), rtol=0, atol=0)


def _grads_by_official(model) -> dict[str, torch.Tensor]:
    from idefics2_mini.loading import ours_to_official

    grads = {}
    for name, module in lora.lora_modules(model).items():
        for part in ("lora_A", "lora_B"):
            grads[f"{ours_to_official(name)}.{part}.weight"] = getattr(module, part).weight.grad
    return grads


def test_checkpointing_with_frozen_base_gives_the_same_gradients(checkpoint):
    """The frozen embeddings' output does not require grad; the adapters must still get their
    gradients through checkpointed layers (the pitfall of transformers #30301)."""
    path, _ = checkpoint
    batch, labels = batch_with_images(seed=4)
    grads = []
    for checkpointed in (False, True):
        model = im.Idefics2.from_pretrained(path)
        torch.manual_seed(0)
        lora.apply(model, rank=4, dropout=0.1)
        randomize_adapters(model)
        model.train()
        if checkpointed:
            assert enable_checkpointing(model) == 7  # 2 vision, projector, 2 perceiver, 2 decoder
        torch.manual_seed(1)  # dropout masks: the recomputation must draw the same ones
        model(**batch, labels=labels).loss.backward()
        grads.append({n: p.grad.clone() for n, p in trainable_parameters(model).items()})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        assert grads[1][name].abs().max() > 0, name
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7)


def test_set_trainable_by_name_and_counts(checkpoint):
    model = im.Idefics2.from_pretrained(checkpoint[0])
    lora.apply(model, rank=2)
    names = set_trainable(model, [r"connector\.perceiver_resampler\.norm\..*", r"model\.text_model\.norm\.weight"])
    assert names == ["connector.perceiver_resampler.norm.weight", "text.norm.weight"]
    trainable, total = parameter_counts(model)
    assert 0 < trainable < total
    with pytest.raises(ValueError, match="no parameter name matches"):
        set_trainable(model, [r"nothing\.here"])
    with pytest.raises(ValueError, match="rank must be a positive integer"):
        lora.apply(model, rank=0)
    with pytest.raises(ValueError, match="matches the LoRA targets"):
        lora.apply(im.Idefics2.from_pretrained(checkpoint[0]), [r"no_such_module"])


def test_bf16_parameters_train_through_fp32_master_copies():
    """An update far below bf16's resolution at 1.0 (2^-8) is lost if applied to the bf16 value
    directly; with the fp32 master copy 100 of them add up to ~1e-2."""
    weight = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    step = OptimizerStep({"w": weight}, lr=1e-4, clip_norm=None)
    for _ in range(100):
        weight.grad = torch.ones_like(weight)
        step()
    assert weight.dtype == torch.bfloat16
    assert 0.985 < float(weight.detach()[0]) < 0.995
    assert abs(float(step.master["w"][0]) - 0.99) < 1e-4


def test_learning_rate_schedules():
    assert learning_rate(0, 10, 1.0, warmup_steps=2) == 0.5
    assert learning_rate(1, 10, 1.0, warmup_steps=2) == 1.0
    assert learning_rate(5, 10, 1.0, schedule="constant") == 1.0
    assert learning_rate(5, 10, 1.0, schedule="linear") == 0.5
    assert abs(learning_rate(5, 10, 1.0, schedule="cosine") - 0.5) < 1e-12
    with pytest.raises(ValueError, match="unknown learning-rate schedule"):
        learning_rate(0, 10, 1.0, schedule="step")

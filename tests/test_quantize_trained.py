"""Weight-only quantization on a *trained* model (a random network's argmax flips under any
small perturbation, so agreement with fp32 only means something on a trained, confident one):

- the quantization benchmark's `trained` part in its --quick form (a tiny LM trained for a few
  steps on the Python help topics, then int8 / int4 g32 against it) runs and reports sane figures;
- a tiny decoder trained here in a few seconds to memorize a text (so it is confident: top-1 probability
  near 1) keeps its predictions under int8 and int4: top-1 agreement, KL and greedy tokens
  (decode steps of <= 8 rows: qmatmul.c where it builds) against fp32, and each layer's weight
  error equals what uniform rounding predicts from the stored scales. The same checks fail on a
  deliberately wrong dequantization (int4 nibble halves swapped: KL jumps; int8 scales of the
  wrong rows: this confident model's logits barely move, KL ~0.03, but the weight error is ~30x
  the rounding's), so they would catch one in the format or the kernels."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import idefics2_mini as im
from idefics2_mini.quantize import QuantizedLinear, QuantSpec, quantize, quantize_gptq
from idefics2_mini.training import OptimizerStep, learning_rate, set_trainable, trainable_parameters

ROOT = Path(__file__).resolve().parents[1]


def test_trained_part_of_the_quantize_benchmark_quick(tmp_path):
    out = tmp_path / "results"
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.quantize", "--quick", "--parts", "trained", "--out", str(out),
         "--weights", str(tmp_path / "weights"), "--threads", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = (out / "quantize.md").read_text()
    assert "## Accuracy against ours fp32 (a trained small LM: stdlib docstrings)" in report
    assert (out / "quantize-trained-loss.png").stat().st_size > 1000
    data = json.loads((out / "quantize.json").read_text())["trained"]["quick"]
    training = data["training"]
    assert training["eval_loss"][-1] < training["eval_loss"][0] - 2  # it learned something (10.4 -> ~7)
    variants = data["variants"]
    assert {"int8", "int4 g32"} <= set(variants) and any(name.startswith("fp32 + noise") for name in variants)
    int8, int4 = variants["int8"], variants["int4 g32"]
    assert int8["top1_agreement"] >= 0.95 and int8["kl"] < 1e-3
    assert 0 <= int4["kl"] < 0.1 and int4["top1_agreement"] >= 0.8
    bins = int4["top1_agreement_by_confidence"]  # every position in one bin of fp32's confidence
    assert sum(b["positions"] for b in bins) == data["text_tokens"] and "Where the top-1 flips are" in report
    for v in (int8, int4):
        for kind, error in v["weight_error"].items():
            assert error == pytest.approx(v["weight_error_predicted"][kind], rel=0.1), kind
        assert v["kernel_vs_dequantized_max"] < 1e-3


# ---------------------------------------------------------------------------- a memorizing model

VOCAB, SEQ, ROWS = 256, 48, 6


@pytest.fixture(scope="module")
def trained():
    """A 64-wide, 2-layer decoder trained to memorize ROWS sequences of SEQ tokens of English
    (the project's tokenizer on its own README, ids renumbered into a vocabulary of VOCAB)."""
    torch.manual_seed(0)
    config = im.Idefics2Config(
        vision=im.VisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2),
        perceiver=im.PerceiverConfig(hidden_size=64, resampler_n_latents=4, resampler_depth=1, resampler_n_heads=2,
                                     resampler_head_dim=32, num_key_value_heads=1),
        text=im.TextConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=32, sliding_window=None,
                           max_position_embeddings=256),
        image_token_id=VOCAB - 1)
    from idefics2_mini.tokenizer import Idefics2Tokenizer

    ids = Idefics2Tokenizer.from_pretrained(None).encode((ROOT / "README.md").read_text()[:20000], add_bos=False)
    renumber: dict[int, int] = {}
    dense = [renumber.setdefault(i, len(renumber) + 1) for i in ids]  # 0 stays the pad id
    dense = [i for i in dense if i < VOCAB - 1][: ROWS * SEQ]
    data = torch.tensor(dense).view(ROWS, SEQ)
    model = im.Idefics2(config)
    model.requires_grad_(False)
    set_trainable(model, [r"text\..*", r"lm_head\..*"])
    step = OptimizerStep(trainable_parameters(model), lr=1e-2)
    model.train()
    steps = 150
    for i in range(steps):
        step.lr = learning_rate(i, steps, 1e-2, 10, "cosine")
        model(data, labels=data).loss.backward()
        step()
    model.eval().requires_grad_(False)
    with torch.no_grad():
        logits = model(data).float()
    return model, data, logits


def compare(model, reference, data, ref_logits):
    """(top-1 agreement, KL per token, greedy tokens equal, max weight error / predicted)."""
    with torch.no_grad():
        logits = model(data).float()
        prompts = data[:4, :8]  # decode steps of 4 rows: qmatmul.c where built
        mine = model.generate(prompts, max_new_tokens=16, do_sample=False, eos_token_id=[])
        theirs = reference.generate(prompts, max_new_tokens=16, do_sample=False, eos_token_id=[])
    kl = torch.nn.functional.kl_div(logits.flatten(0, 1).log_softmax(-1), ref_logits.flatten(0, 1).log_softmax(-1),
                                    log_target=True, reduction="batchmean").item()
    agreement = (logits.argmax(-1) == ref_logits.argmax(-1)).float().mean().item()
    ratios = []
    for name, layer in model.named_modules():
        if isinstance(layer, QuantizedLinear):
            weight = reference.get_submodule(name).weight.float()
            error = (layer.dequantized_weight(torch.float32) - weight).norm() / weight.norm()
            predicted = (layer.scales.float().square().sum() * layer.group_size / 12).sqrt() / weight.norm()
            ratios.append((error / predicted).item())
    return agreement, kl, (mine == theirs).float().mean().item(), max(ratios)


@pytest.mark.parametrize("spec, min_agreement, max_kl", [
    (QuantSpec(8), 0.99, 1e-3),
    (QuantSpec(4, 32), 0.95, 0.05),
    (QuantSpec(4, 64, symmetric=True), 0.9, 0.1),
])
def test_a_trained_model_keeps_its_predictions_when_quantized(trained, spec, min_agreement, max_kl):
    reference, data, ref_logits = trained
    confidence = ref_logits.softmax(-1).max(-1).values.median().item()
    assert confidence > 0.8  # the premise: a confident model (a random one has ~1 / VOCAB)
    model = quantize(copy.deepcopy(reference), spec)
    agreement, kl, greedy, ratio = compare(model, reference, data, ref_logits)
    assert agreement >= min_agreement and kl < max_kl and greedy >= 0.9, (agreement, kl, greedy)
    assert 0.85 < ratio < 1.1  # the weight error is the rounding's, no more


@pytest.mark.parametrize("spec, corrupt, min_kl", [
    (QuantSpec(4, 32), "swap nibbles", 0.5),
    (QuantSpec(8), "scales of the wrong rows", 0.01),  # logits move little (KL ~0.03): the weight check sees it
])
def test_the_checks_catch_a_wrong_dequantization(trained, spec, corrupt, min_kl):
    """The weight error is many times the rounding's; KL at least 10x the correct format's bound."""
    reference, data, ref_logits = trained
    model = quantize(copy.deepcopy(reference), spec)
    for layer in model.modules():
        if isinstance(layer, QuantizedLinear):
            if corrupt == "swap nibbles":
                layer.qweight.copy_((layer.qweight >> 4) | (layer.qweight << 4))
            else:
                layer.scales.copy_(layer.scales.roll(1, dims=0))
    agreement, kl, greedy, ratio = compare(model, reference, data, ref_logits)
    assert ratio > 3 and kl > min_kl, (agreement, kl, greedy, ratio)


@pytest.mark.parametrize("spec", [QuantSpec(4, 64, symmetric=True), QuantSpec(4, 32)])
def test_gptq_keeps_a_trained_model_closer_than_rounding(trained, spec):
    """GPTQ calibrated on the model's own text (all 288 tokens of it: fewer leave H of the 192-wide
    down_proj too poorly sampled): a KL to fp32 under 0.7x round-to-nearest's (measured ~0.45x),
    trading weight error for output error (its weight error is above the rounding's). Top-1 on
    a model this sure of itself is ~100% either way (one position is 0.35%)."""
    reference, data, ref_logits = trained
    rounded = compare(quantize(copy.deepcopy(reference), spec), reference, data, ref_logits)
    chosen = compare(quantize_gptq(copy.deepcopy(reference), spec, data), reference, data, ref_logits)
    assert chosen[1] < 0.7 * rounded[1] and chosen[0] >= 0.99 and chosen[3] > 1.05, (chosen, rounded)

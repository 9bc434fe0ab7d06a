"""The CPU backend (idefics2_mini/backends/cpu.py): oneDNN for big fp32 weights at inference,
F.linear otherwise, same results either way, and the whole model keeps parity through it; the
greedy argmax equals torch's."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_model_parity import compare, gqa_pair, left_pad, random_images  # noqa: F401  (gqa_pair: a fixture)
from reference_models import image_prompt_ids

from idefics2_mini.backends import cpu

needs_onednn = pytest.mark.skipif(not cpu.ONEDNN_LINEAR, reason="this torch has no oneDNN linear")


def close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-5) -> bool:
    return (a - b).abs().max().item() <= rtol * b.abs().max().item()


def runs_onednn(monkeypatch) -> list[int]:
    """Count the calls that take the oneDNN path."""
    calls = []
    real = torch.ops.mkldnn._linear_pointwise

    def counting(*args):
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(cpu, "_onednn_linear_op", counting)
    return calls


@needs_onednn
@pytest.mark.parametrize("rows", [1, 3, 70])
def test_big_weight_matches_f_linear(monkeypatch, rows):
    calls = runs_onednn(monkeypatch)
    generator = torch.Generator().manual_seed(rows)
    weight = torch.randn(1024, 600, generator=generator)  # 614k elements: above the threshold
    bias = torch.randn(1024, generator=generator)
    x = torch.randn(2, rows, 600, generator=generator)
    with torch.no_grad():
        assert close(cpu.linear(x, weight, bias), F.linear(x, weight, bias))
        # non-contiguous input, and a weight that is a row block of a bigger (fused) matrix
        fused = torch.randn(3000, 600, generator=generator)
        x_t = torch.randn(rows, 2, 600, generator=generator).transpose(0, 1)
        assert close(cpu.linear(x_t, fused[1000:2500]), F.linear(x_t, fused[1000:2500]))
    assert len(calls) == 2


def test_small_weights_grad_and_other_dtypes_use_f_linear(monkeypatch):
    calls = runs_onednn(monkeypatch)
    big = torch.randn(1024, 600)
    x = torch.randn(4, 600)
    with torch.no_grad():
        assert torch.equal(cpu.linear(x, big[:100]), F.linear(x, big[:100]))  # 60k elements: small
        assert torch.equal(cpu.linear(x.double(), big.double()), F.linear(x.double(), big.double()))
    # Training: oneDNN's op has no autograd formula, so the gradient path is F.linear's.
    weight = big.clone().requires_grad_(True)
    cpu.linear(x, weight).sum().backward()
    assert torch.allclose(weight.grad, x.sum(0).expand_as(weight))
    assert calls == []


@needs_onednn
def test_switch_off(monkeypatch):
    calls = runs_onednn(monkeypatch)
    monkeypatch.setattr(cpu, "ONEDNN_LINEAR", False)
    x, weight = torch.randn(2, 600), torch.randn(1024, 600)
    with torch.no_grad():
        assert torch.equal(cpu.linear(x, weight), F.linear(x, weight))
    assert calls == []


@needs_onednn
def test_model_parity_with_every_linear_on_onednn(monkeypatch, gqa_pair):
    """The tiny parity models' weights are below the threshold: lower it to zero so that every
    linear of vision tower, connector, decoder and lm_head runs through oneDNN."""
    calls = runs_onednn(monkeypatch)
    monkeypatch.setattr(cpu, "ONEDNN_MIN_WEIGHT_ELEMENTS", 0)
    reference, ours, _ = gqa_pair
    pixel_values, pixel_mask = random_images([[(56, 56), (50, 45)], [(28, 56)]])
    rows = [image_prompt_ids([1, 100, 200], 2, 4, [300, 400, 500]), image_prompt_ids([1, 7, 8, 9, 10, 11], 1, 4, [12])]
    compare(reference, ours, *left_pad(rows), pixel_values, pixel_mask)
    assert len(calls) > 20


@needs_onednn
@pytest.mark.parametrize("intel", [True, False], ids=["intel", "other-vendor"])
def test_row_counts_pick_the_backend_by_cpu_vendor(monkeypatch, intel):
    """On Intel CPUs a single input row (batch-1 decode) and 512+ rows (an image's patches) run
    on F.linear (MKL), 2-511 rows on oneDNN; elsewhere every row count runs on oneDNN. Same
    result either way."""
    calls = runs_onednn(monkeypatch)
    monkeypatch.setattr(cpu, "ONEDNN_ROWS", (2, 511) if intel else (1, None))
    generator = torch.Generator().manual_seed(7)
    weight = torch.randn(1024, 600, generator=generator)
    expected_onednn = {1: not intel, 2: True, 511: True, 512: not intel, 700: not intel}
    with torch.no_grad():
        for rows, onednn in expected_onednn.items():
            x = torch.randn(1, rows, 600, generator=generator)
            before = len(calls)
            assert close(cpu.linear(x, weight), F.linear(x, weight))
            assert len(calls) - before == int(onednn), rows
        vector = torch.randn(600, generator=generator)  # 1-D input: one row
        assert close(cpu.linear(vector, weight), F.linear(vector, weight))


def test_cpu_vendor_reads_proc_cpuinfo():
    vendor = cpu.cpu_vendor()
    assert isinstance(vendor, str)
    assert cpu.ONEDNN_ROWS == ((2, 511) if vendor == "GenuineIntel" else (1, None))


@pytest.mark.parametrize("batch,vocab", [(1, 32003), (8, 32003), (3, 129), (2, 256), (2, 100)])
def test_greedy_argmax_is_argmax(batch, vocab):
    """The two-level argmax of greedy decoding gives torch.argmax's answer, ties (first
    maximum), NaN (counts as the maximum), -inf rows and the padded last chunk included."""
    generator = torch.Generator().manual_seed(vocab + batch)
    logits = torch.randn(batch, vocab, generator=generator)
    cases = [logits, logits.round(), torch.zeros(batch, vocab), torch.full((batch, vocab), float("-inf"))]
    last = logits.clone()
    last[:, -1] = 50.0  # the maximum in the padded last chunk
    tied = logits.clone()
    tied[:, [3, vocab // 2, vocab - 1]] = 60.0
    nan = logits.clone()
    nan[0, [vocab // 3, vocab - 2]] = float("nan")
    cases += [last, tied, nan, logits[:, : vocab - 1]]  # a non-contiguous view too
    for case in cases:
        assert torch.equal(cpu.greedy_argmax(case), case.argmax(-1))

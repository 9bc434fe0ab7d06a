"""GPTQ (idefics2_mini/quantize/gptq.py): its math against round-to-nearest and against a
direct, unblocked implementation, its output error on correlated inputs, the model-level pass
(chunks, fused groups, what the text does not reach), checkpoints, the command and its errors.
Its effect on a trained model is in test_quantize_trained.py."""

from __future__ import annotations

import json

import pytest
import torch
from test_quantize import checkpoint, prompts, tiny_config  # noqa: F401  (fixtures)

import idefics2_mini as im
from idefics2_mini import cli
from idefics2_mini.backends import fusion
from idefics2_mini.quantize import (
    QuantizationError,
    QuantizedLinear,
    QuantSpec,
    dequantize_reference,
    gptq_weight,
    quantize,
    quantize_gptq,
    quantize_weight,
    save_quantized,
)
from idefics2_mini.quantize.formats import group_grid, round_to_grid
from idefics2_mini.quantize.gptq import _inverse_cholesky, calibration_windows

SPECS = [QuantSpec(8), QuantSpec(4, 32), QuantSpec(4, 64, symmetric=True)]


def correlated_inputs(tokens: int, width: int, seed: int, token_seed: int = 0) -> torch.Tensor:
    """x [tokens, width] with strongly correlated columns (a decaying spectrum: the mixing drawn
    from `seed`), as a layer's inputs are; the tokens drawn from `token_seed`."""
    mixing = torch.randn(width, width, generator=torch.Generator().manual_seed(seed)) * torch.logspace(0, -2, width)[:, None]
    return torch.randn(tokens, width, generator=torch.Generator().manual_seed(1000 + token_seed)) @ mixing


def dequantized(quantized, spec, k) -> torch.Tensor:
    return dequantize_reference(quantized.qweight, quantized.scales, quantized.zeros, spec.bits, spec.group_for(k))


@pytest.mark.parametrize("spec", SPECS)
def test_an_identity_hessian_is_round_to_nearest(spec):
    weight = torch.randn(48, 256, generator=torch.Generator().manual_seed(1))
    mine, rounded = gptq_weight(weight, 3 * torch.eye(256), spec), quantize_weight(weight, spec)
    assert torch.equal(mine.qweight, rounded.qweight) and torch.equal(mine.scales, rounded.scales)
    assert (mine.zeros is None) == (rounded.zeros is None) and (mine.zeros is None or torch.equal(mine.zeros, rounded.zeros))


def direct_gptq(weight: torch.Tensor, hessian: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """The paper's algorithm without blocks or lazy updates, in float64: every column's error
    onto all later columns at once. Returns the integers [N, K]."""
    w = weight.double().clone()
    k = w.shape[1]
    group = spec.group_for(k)
    u = _inverse_cholesky(hessian.double(), 0.01)
    q = torch.empty(w.shape, dtype=torch.int8)
    for column in range(k):
        if column % group == 0:
            s, z = group_grid(w[:, column : column + group].float(), spec)
        q[:, column] = round_to_grid(w[:, column].float(), s, z, spec)
        value = q[:, column].double() * s.double() + (0 if z is None else z.double())
        error = (w[:, column] - value) / u[column, column]
        w[:, column:] -= error[:, None] * u[column, column:][None, :]
    return q


@pytest.mark.parametrize("spec", SPECS)
def test_blocked_gptq_equals_the_direct_algorithm(spec):
    """Blocks of 128 columns, lazy updates, groups across a block's edge (int8: a row of 320 is
    one group over three blocks): the same integers as the direct loop, but for rare ties that
    fp32 and float64 round apart."""
    k = 320 if spec.bits == 8 else 256
    weight = torch.randn(40, k, generator=torch.Generator().manual_seed(2))
    x = correlated_inputs(1024, k, seed=3)
    hessian = x.T @ x / x.shape[0]
    mine = gptq_weight(weight, hessian, spec)
    ints = mine.qweight if spec.bits == 8 else unpacked(mine.qweight, spec.group_size)
    assert (ints == direct_gptq(weight, hessian, spec)).float().mean() > 0.995


def unpacked(packed: torch.Tensor, group: int) -> torch.Tensor:
    from idefics2_mini.quantize import unpack_int4  # noqa: PLC0415

    return unpack_int4(packed, group)


@pytest.mark.parametrize("spec", SPECS)
def test_gptq_lowers_the_output_error_on_correlated_inputs(spec):
    k = 256
    weight = torch.randn(64, k, generator=torch.Generator().manual_seed(4)) / k**0.5
    x = correlated_inputs(2048, k, seed=5)
    mine = dequantized(gptq_weight(weight, x.T @ x / x.shape[0], spec), spec, k)
    rounded = dequantized(quantize_weight(weight, spec), spec, k)
    exact = x @ weight.T
    error_gptq, error_rtn = (x @ mine.T - exact).norm(), (x @ rounded.T - exact).norm()
    assert error_gptq < 0.8 * error_rtn
    held = correlated_inputs(512, k, seed=5, token_seed=1)  # the same distribution, other tokens: it generalises
    assert (held @ mine.T - held @ weight.T).norm() < (held @ rounded.T - held @ weight.T).norm()


def test_calibration_windows():
    ids = list(range(3, 1003))  # 1000 tokens, no BOS
    windows = calibration_windows([1] + ids, 4, 101, bos=1)
    assert windows.shape == (4, 101) and (windows[:, 0] == 1).all() and (windows[:, 1:] != 1).all()
    assert windows[0, 1] == 3 and windows[-1, -1] == 1002  # evenly spaced over the whole text
    assert calibration_windows(ids, 50, 101, bos=1).shape == (10, 101)  # no more than fit without overlap
    with pytest.raises(QuantizationError, match="fewer than one window"):
        calibration_windows(ids[:50], 4, 101, bos=1)


# ----------------------------------------------------------------------------- the model


@pytest.fixture(scope="module")
def calibration():
    return torch.randint(3, 32000, (6, 24), generator=torch.Generator().manual_seed(7))


def test_quantize_gptq_in_chunks_fuses_and_saves(checkpoint, prompts, calibration, tmp_path):  # noqa: F811
    lines = []
    model = quantize_gptq(im.Idefics2.from_pretrained(checkpoint), QuantSpec(4, 32), calibration,
                          max_hessian_bytes=1, log=lines.append)
    text_modules = 2 * 2  # attention and MLP of 2 layers, one chunk each (and the rest)
    assert sum(line.startswith("gptq: ") and "linears" in line for line in lines) >= text_modules + 1
    assert "gptq: warning: 144 calibration tokens for inputs up to 512 wide" in lines[0]  # 6 x 24 < 4 x 512
    info = model.quantization_info
    assert info["method"] == "gptq" and info["calibration_tokens"] == calibration.numel()
    assert info["rounded_to_nearest"] and all(name.startswith("connector.") for name in info["rounded_to_nearest"])
    assert model.lm_head.bits == 8 and isinstance(model.text.layers[0].mlp.down_proj, QuantizedLinear)
    for module in (model.text.layers[0].self_attn, model.text.layers[1].mlp):
        assert fusion.fused_group(module) is None  # fused as quantized projections, not float ones
    from idefics2_mini.quantize.fusion import fused_quantized_groups  # noqa: PLC0415

    assert len(fused_quantized_groups(model)) >= 4
    rounded = quantize(im.Idefics2.from_pretrained(checkpoint), QuantSpec(4, 32))
    assert not torch.equal(model.text.layers[0].mlp.down_proj.qweight, rounded.text.layers[0].mlp.down_proj.qweight)
    assert torch.equal(model.connector.modality_projection.down_proj.qweight,
                       rounded.connector.modality_projection.down_proj.qweight)  # not reached: rounded
    save_quantized(model, tmp_path)
    block = json.loads((tmp_path / "config.json").read_text())["quantization"]
    assert block["how"]["method"] == "gptq" and block["bits"] == 4
    loaded = im.Idefics2.from_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(prompts), model(prompts))


def test_one_pass_and_chunked_passes_both_track_the_float_model(checkpoint, prompts, calibration):  # noqa: F811
    """One pass (all H from the float model) and one pass per module (each H behind the layers
    already quantized): both closer to the float model on the calibration text than rounding."""
    reference = im.Idefics2.from_pretrained(checkpoint)
    with torch.no_grad():
        expected = reference(calibration)
        errors = {}
        for name, model in (("one", quantize_gptq(im.Idefics2.from_pretrained(checkpoint), 4, calibration,
                                                  group_size=32)),
                            ("chunked", quantize_gptq(im.Idefics2.from_pretrained(checkpoint), 4, calibration,
                                                      group_size=32, max_hessian_bytes=1)),
                            ("rtn", quantize(im.Idefics2.from_pretrained(checkpoint), 4, group_size=32))):
            errors[name] = (model(calibration) - expected).norm().item()
    assert errors["one"] < errors["rtn"] and errors["chunked"] < errors["rtn"]


def test_gptq_errors(checkpoint):  # noqa: F811
    model = im.Idefics2.from_pretrained(checkpoint)
    with pytest.raises(QuantizationError, match="needs calibration token ids"):
        quantize_gptq(model, 4)
    with pytest.raises(QuantizationError, match="needs calibration token ids"):
        quantize_gptq(model, 4, torch.ones(2, 3))
    with pytest.raises(QuantizationError, match=r"must lie in \[0, 32003\)"):
        quantize_gptq(model, 4, torch.full((1, 4), 40000))
    with pytest.raises(QuantizationError, match="does not divide"):
        quantize_gptq(model, QuantSpec(4, 128), torch.ones(1, 4, dtype=torch.long))


def test_quantize_command_with_calibration(checkpoint, tmp_path, capsys):  # noqa: F811
    text = tmp_path / "calibration.txt"
    text.write_text("The lighthouse keeper climbed the steps every evening to light the lamp. " * 40)
    out = tmp_path / "gptq"
    assert cli.main(["quantize", "--weights", str(checkpoint), "--bits", "4", "--group-size", "32", "--out", str(out),
                     "--calibration", str(text), "--calibration-windows", "4", "--calibration-length", "64"]) == 0
    err = capsys.readouterr().err
    assert "with GPTQ: 4 calibration windows of 64 tokens" in err and "gptq: " in err and "wrote" in err
    assert json.loads((out / "config.json").read_text())["quantization"]["how"]["calibration_windows"] == 4
    assert cli.main(["check", str(out)]) == 0


@pytest.mark.parametrize("extra,fragment", [
    (["--calibration", "MISSING"], "no such file"),
    (["--calibration", "SHORT"], "fewer than one window"),
    (["--calibration", "BINARY"], "not UTF-8 text"),
    (["--calibration-windows", "8"], "go with --calibration FILE"),
])
def test_quantize_command_calibration_errors(extra, fragment, checkpoint, tmp_path, capsys):  # noqa: F811
    (tmp_path / "SHORT").write_text("Too short.")
    (tmp_path / "BINARY").write_bytes(b"\xff\xfe\x00binary")
    extra = [str(tmp_path / e) if e in ("MISSING", "SHORT", "BINARY") else e for e in extra]
    argv = ["quantize", "--weights", str(checkpoint), "--bits", "4", "--group-size", "32",
            "--out", str(tmp_path / "out"), *extra]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and fragment in err and "Traceback" not in err

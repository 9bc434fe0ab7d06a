"""Weight-only quantization (idefics2_mini/quantize/): the quantization math, the CPU paths
against the reference, the model's logits against the float model's within stated bounds,
quantized checkpoints (write, load, quantize on load, check), the commands, and the errors.

Bounds, on a tiny model whose linears are random N(0, 1/fan_in) (reference_models.randomize_):
int8 per channel moves the logits by <= 2% of their largest magnitude, int4 (groups of 32,
asymmetric) by <= 25%; a wrong dequantization (nibble halves swapped, a scale or zero
misapplied, a row offset) moves them by the size of the logits themselves."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from reference_models import randomize_
from torch import nn

import idefics2_mini as im
from idefics2_mini import cli, loading
from idefics2_mini.backends import cpu as cpu_backend
from idefics2_mini.backends import fusion
from idefics2_mini.demo import SHIPPED_TOKENIZER_MODEL
from idefics2_mini.quantize import (
    QuantizationError,
    QuantizedLinear,
    QuantSpec,
    cpu,
    dequantize_reference,
    pack_int4,
    quantize,
    quantize_weight,
    quantized_matmul_reference,
    save_quantized,
    unpack_int4,
)
from idefics2_mini.quantize.fusion import fused_quantized_groups

INT8_LOGIT_BOUND, INT4_LOGIT_BOUND = 0.02, 0.25


def tiny_config() -> im.Idefics2Config:
    """Every linear's input width a multiple of 32 (int4 groups of 32 fit everywhere)."""
    return im.Idefics2Config(
        vision=im.VisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                               image_size=56, patch_size=14),
        perceiver=im.PerceiverConfig(hidden_size=128, resampler_n_latents=4, resampler_depth=1, resampler_n_heads=4,
                                     resampler_head_dim=32, num_key_value_heads=2),
        text=im.TextConfig(vocab_size=32003, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=32, sliding_window=16,
                           max_position_embeddings=512),
    )


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("float")
    model = im.Idefics2(tiny_config())
    randomize_(model, seed=3)
    im.save_checkpoint(model, path)
    shutil.copyfile(SHIPPED_TOKENIZER_MODEL, path / "tokenizer.model")
    return path


@pytest.fixture(scope="module")
def float_model(checkpoint):
    return im.Idefics2.from_pretrained(checkpoint)


@pytest.fixture(scope="module")
def prompts():
    return torch.randint(3, 32000, (2, 10), generator=torch.Generator().manual_seed(0))


def relative_logit_error(model, reference, ids) -> float:
    with torch.no_grad():
        expected = reference(ids)
        return ((model(ids) - expected).abs().max() / expected.abs().max()).item()


# ----------------------------------------------------------------------------- the math


@pytest.mark.parametrize("spec", [QuantSpec(8), QuantSpec(8, symmetric=False), QuantSpec(4, 32),
                                  QuantSpec(4, 128, symmetric=True)])
def test_quantize_then_dequantize_is_within_half_a_step(spec):
    weight = torch.randn(24, 256, generator=torch.Generator().manual_seed(1)) * 0.05
    weight[3, 7] = 1.0  # an outlier: its group's step grows, the others' do not
    q = quantize_weight(weight, spec)
    group = spec.group_for(256)
    assert q.scales.shape == (24, 256 // group) and q.scales.dtype == spec.scale_dtype()
    assert (q.zeros is None) == spec.symmetric
    restored = dequantize_reference(q.qweight, q.scales, q.zeros, spec.bits, group)
    step = q.scales.float().repeat_interleave(group, dim=1)
    # Half a step, plus the rounding of a bf16 zero (int4) when asymmetric.
    slack = 0.0 if q.zeros is None else q.zeros.float().abs().repeat_interleave(group, dim=1) * 2**-8
    assert ((restored - weight).abs() <= 0.5 * step * (1 + 1e-5) + slack).all()
    integers = unpack_int4(q.qweight, group) if spec.bits == 4 else q.qweight
    top = 2 ** (spec.bits - 1)
    assert integers.min() >= -top and integers.max() <= top - 1


def test_zero_and_constant_groups_are_exact():
    """All-zero groups (any spec) and constant ones (asymmetric: s = 1, z = the value) come back exactly."""
    weight = torch.zeros(2, 64)
    weight[1] = 0.375
    for spec in (QuantSpec(8, symmetric=False), QuantSpec(4, 32), QuantSpec(4, 32, symmetric=True)):
        q = quantize_weight(weight, spec)
        restored = dequantize_reference(q.qweight, q.scales, q.zeros, spec.bits, spec.group_for(64))
        rows = 1 if spec.symmetric else 2
        assert torch.equal(restored[:rows], weight[:rows])


def test_int4_packing_round_trip():
    q = torch.randint(-8, 8, (5, 128), dtype=torch.int8)
    for group in (32, 64, 128):
        packed = pack_int4(q, group)
        assert packed.dtype == torch.uint8 and packed.shape == (5, 64)
        assert torch.equal(unpack_int4(packed, group), q)
    assert pack_int4(torch.tensor([[7] + [-8] * 15 + [1] + [-8] * 15], dtype=torch.int8), 32)[0, 0] == 0x9F


# ----------------------------------------------------------------------------- the CPU paths


def rounded_x(x: torch.Tensor, block: int) -> torch.Tensor:
    """x [M, K] fp32 as the integer paths of qmatmul.c ("vnni", "avx2") multiply it: per block of `block` columns,
    x16 = round-half-even(x * (X16_MAX / max|x|)) in fp32 as the C code computes it, and
    x~ = x16 * (max|x| / X16_MAX)."""
    rows, k = x.shape
    blocks = x.view(rows, k // block, block)
    amax = blocks.abs().amax(-1, keepdim=True)
    top = torch.tensor(float(cpu.X16_MAX))
    inv = torch.where(amax > 0, top / amax, torch.zeros_like(amax))
    return (torch.round(blocks * inv) * (amax / top)).view(rows, k)


def rounded_x_step(x: torch.Tensor, block: int) -> torch.Tensor:
    """[M, K]: the grid step of each column's block in `rounded_x`."""
    rows, k = x.shape
    amax = x.view(rows, k // block, block).abs().amax(-1, keepdim=True)
    return (amax / cpu.X16_MAX).expand(rows, k // block, block).reshape(rows, k)


def x_block(bits: int, group: int) -> int:
    """Columns per 16-bit scale of x on the integer paths ("vnni", "avx2")."""
    return cpu.VNNI_INT8_BLOCK if bits == 8 else group


@pytest.mark.parametrize("spec", [QuantSpec(8), QuantSpec(8, symmetric=False), QuantSpec(4, 32), QuantSpec(4, 64),
                                  QuantSpec(4, 128, symmetric=True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_paths_equal_the_reference(spec, dtype, monkeypatch):
    linear = nn.Linear(256, 40, bias=True)
    layer = QuantizedLinear.from_linear(linear.requires_grad_(False).to(dtype), spec)
    args = (layer.qweight, layer.scales, layer.zeros, layer.bits, layer.group_size)
    # fp32: the reference's own rounding, and on the integer paths x on a 16-bit grid (2^-16 of
    # a block's largest |x|: well within 1e-4 of the largest output; test_c_kernel_paths checks
    # those paths exactly)
    integer = cpu.kernel_path(spec.bits, 1, 256, layer.group_size, dtype) in cpu.INTEGER_PATHS
    tolerance = (1e-4 if integer else 1e-5) if dtype == torch.float32 else 1e-2
    for rows in (1, 3, 8, 9, 40):  # up to 8: the C kernel; beyond: dequantize and matmul
        x = torch.randn(rows, 256).to(dtype)
        expected = quantized_matmul_reference(x, *args, layer.bias)
        with torch.no_grad():
            out = layer(x)
        assert out.dtype == dtype and out.shape == (rows, 40)
        assert (out.float() - expected.float()).abs().max() <= tolerance * expected.float().abs().max()
        assert cpu.kernel_takes(x, spec.bits, layer.group_size) == (rows <= cpu.MAX_ROWS)


def test_c_kernel_odd_widths_and_blocks(monkeypatch):
    """int8 rows whose width is no multiple of 16 (the kernel's scalar tail; the integer paths
    need whole blocks of 128 columns, so the portable path runs); the prefill path's weight
    blocks smaller than the weight."""
    layer = QuantizedLinear.from_linear(nn.Linear(100, 37, bias=False).requires_grad_(False), QuantSpec(8))
    x = torch.randn(2, 100)
    expected = quantized_matmul_reference(x, layer.qweight, layer.scales, None, 8, 100)
    assert cpu.kernel_path(8, 2, 100, 100, torch.float32) == "portable"
    assert (cpu.kernel_matmul(x, layer.qweight, layer.scales, None, 8, 100) - expected).abs().max() < 1e-5
    monkeypatch.setattr(cpu, "DEQUANT_BLOCK_ELEMENTS", 1000)  # 10 rows of 100 at a time
    out = cpu.dequantized_linear(x, layer.qweight, layer.scales, None, 8, 100)
    assert (out - expected).abs().max() < 1e-5


PATH_CASES = [(8, None, True), (8, None, False), (4, 32, False), (4, 64, False), (4, 128, True), (4, 64, True)]


@pytest.mark.parametrize("bits,group,symmetric", PATH_CASES)
@pytest.mark.parametrize("k", [384, 4096, 8320])
def test_c_kernel_paths(bits, group, symmetric, k):
    """Every path this build has, at K = 384 (int4 g128: 3 groups where the kernel takes 16 at a
    time, a partial block), 4096 and 8320 (one row of x: weight rows two at a time, 97 rows: one
    left over), every row count, fp32 and bf16 x, channels of very
    different sizes. "portable" and "bf16" (x split into two bf16 halves: 2^-16 relative) are
    fp32-accurate; "vnni" and "avx2" multiply x~ (x on a 16-bit grid per block: `rounded_x`) and
    must give W x~ to fp32 accuracy, x~ within half a grid step of x."""
    g = torch.Generator().manual_seed(3)
    n = 97
    linear = nn.Linear(k, n, bias=False).requires_grad_(False)
    linear.weight.copy_(torch.randn(n, k, generator=g) * 0.02)
    layer = QuantizedLinear.from_linear(linear, QuantSpec(bits, group, symmetric=symmetric))
    weight = layer.dequantized_weight().double()
    assert cpu.paths()[-1] == "portable"
    assert cpu.kernel_path(bits, 1, k, layer.group_size, torch.float32) == cpu.paths()[0]
    block = x_block(bits, layer.group_size)
    for rows in range(1, cpu.MAX_ROWS + 1):
        x = torch.randn(rows, k, generator=g) * torch.exp(torch.randn(k, generator=g))  # uneven channels
        for dtype in (torch.float32, torch.bfloat16):
            xd = x.to(dtype).float()
            for path in cpu.paths():
                if path == "bf16" and bits == 8:
                    continue
                out = cpu.kernel_matmul(x.to(dtype), layer.qweight, layer.scales, layer.zeros, bits,
                                        layer.group_size, path).double()
                multiplied = rounded_x(xd, block) if path in cpu.INTEGER_PATHS else xd
                # half a step, give or take fp32 rounding of x * (X16_MAX / max) and of the step
                # (each 2^-24 relative, of numbers up to X16_MAX steps)
                assert ((multiplied - xd).abs() <= rounded_x_step(xd, block) * 0.51).all()
                exact = multiplied.double() @ weight.t()
                tolerance = 1e-5 if dtype == torch.float32 else 1e-2  # bf16: the result's own rounding
                error = ((out - exact).abs().max() / exact.abs().max()).item()
                assert error <= tolerance, (path, rows, dtype, error)
    for path in set(cpu.paths()) & set(cpu.INTEGER_PATHS):  # what they trade: against x itself off, by little
        x = torch.randn(1, k, generator=g)
        out = cpu.kernel_matmul(x, layer.qweight, layer.scales, layer.zeros, bits, layer.group_size, path).double()
        exact = x.double() @ weight.t()
        assert 0 < ((out - exact).abs().max() / exact.abs().max()).item() < 1e-4


def test_kernel_path_choice(monkeypatch):
    """IDEFICS2_MINI_QMM_PATH forces a path where it takes the shapes; one that does not (int8
    on "bf16", K = 100 on "vnni") leaves the automatic choice; a path asked for directly that
    cannot take the shapes is an error, not a silent fallback."""
    monkeypatch.setenv(cpu.PATH_ENV, "portable")
    assert cpu.kernel_path(8, 1, 4096, 4096, torch.float32) == "portable"
    x = torch.randn(1, 256) * torch.exp(torch.randn(256))
    layer = QuantizedLinear.from_linear(nn.Linear(256, 16, bias=False).requires_grad_(False), QuantSpec(4, 64))
    expected = quantized_matmul_reference(x, layer.qweight, layer.scales, layer.zeros, 4, 64)
    with torch.no_grad():
        assert (layer(x) - expected).abs().max() <= 1e-5 * expected.abs().max()  # the exact fp32 path ran
    monkeypatch.setenv(cpu.PATH_ENV, "bf16")
    assert cpu.kernel_path(8, 1, 4096, 4096, torch.float32) == cpu.paths()[0]
    for path in set(cpu.paths()) & set(cpu.INTEGER_PATHS):
        monkeypatch.setenv(cpu.PATH_ENV, path)
        assert cpu.kernel_path(8, 1, 100, 100, torch.float32) == "portable"
        with pytest.raises(RuntimeError, match="refused"):
            cpu.kernel_matmul(torch.randn(1, 100), torch.zeros(4, 100, dtype=torch.int8), torch.ones(4, 1), None, 8,
                              100, path)


def test_c_kernel_built_and_switchable(monkeypatch):
    assert cpu.available(), cpu.build_error()  # CI has a C compiler; users without one get the fallback
    monkeypatch.setenv(cpu.CPU_ENV, "reference")
    assert not cpu.kernel_takes(torch.zeros(1, 64), 8, 64)


def test_training_through_a_quantized_layer_reaches_the_input():
    layer = QuantizedLinear.from_linear(nn.Linear(64, 8).requires_grad_(False), QuantSpec(4, 32))
    x = torch.randn(1, 64, requires_grad=True)
    layer(x).sum().backward()
    assert torch.allclose(x.grad[0], layer.dequantized_weight().sum(0), atol=1e-5)


# ----------------------------------------------------------------------------- the model


@pytest.mark.parametrize("spec,bound", [(QuantSpec(8), INT8_LOGIT_BOUND), (QuantSpec(4, 32), INT4_LOGIT_BOUND)])
def test_quantized_logits_within_bound_and_greedy_tokens(spec, bound, checkpoint, float_model, prompts):
    model = quantize(im.Idefics2.from_pretrained(checkpoint), spec)
    assert relative_logit_error(model, float_model, prompts) <= bound
    if spec.bits == 8:
        with torch.no_grad():
            assert torch.equal(model.generate(prompts, max_new_tokens=6, eos_token_id=[]),
                               float_model.generate(prompts, max_new_tokens=6, eos_token_id=[]))


def test_a_wrong_dequantization_breaks_the_bound(checkpoint, float_model, prompts, monkeypatch):
    """The bound above is tight enough to catch a dequantization bug: swapping the nibble
    halves of every byte (a plausible layout mistake) blows far past it."""
    model = quantize(im.Idefics2.from_pretrained(checkpoint), QuantSpec(4, 32))
    for layer in model.modules():
        if isinstance(layer, QuantizedLinear):
            layer.qweight.copy_((layer.qweight << 4) | (layer.qweight >> 4))
    assert relative_logit_error(model, float_model, prompts) > 2 * INT4_LOGIT_BOUND


def test_quantize_swaps_the_chosen_linears_and_composes_with_the_backends(checkpoint):
    model = im.Idefics2.from_pretrained(checkpoint)  # CPU linears and fused projections applied
    groups_before = len(fusion.fused_groups(model))
    quantize(model, "int4", group_size=32)
    kinds = {name: type(m) for name, m in model.named_modules() if isinstance(m, (nn.Linear, QuantizedLinear))}
    assert kinds["lm_head"] is QuantizedLinear and kinds["text.layers.0.mlp.down_proj"] is QuantizedLinear
    assert kinds["connector.modality_projection.up_proj"] is QuantizedLinear
    assert kinds["vision.layers.0.mlp.fc1"] is cpu_backend.CpuLinear  # the vision tower stays float
    remaining = fusion.fused_groups(model)  # only the vision tower's groups still fused
    assert 0 < len(remaining) < groups_before
    assert all(type(group.module).__module__.endswith("vision") for group in remaining)
    assert model.dtype == torch.float32 and model.device.type == "cpu"
    im.apply_backends(model)  # applying the backends again leaves the quantized layers alone
    assert isinstance(model.lm_head, QuantizedLinear)


def test_quantized_projections_fuse_exactly(checkpoint, prompts):
    """q/k/v and gate/up of a quantized model are one kernel call (quantize/fusion.py) whose
    buffers are the members' own; each output row is computed alone, so decode is bit-equal."""
    fused = im.Idefics2.from_pretrained(checkpoint, quantize="int4")  # laid out fused, then filled
    plain = im.Idefics2.from_pretrained(checkpoint, quantize="int4", backends=False)
    groups = fused_quantized_groups(fused)
    assert len(groups) >= 2 * tiny_config().text.num_hidden_layers and fused_quantized_groups(plain) == []
    for group in groups:
        assert group.intact()
        for name in ("qweight", "scales", "zeros"):  # views of the fused buffers, not copies
            storages = {getattr(m, name).untyped_storage().data_ptr() for m in group.members}
            assert storages == {getattr(group.fused, name).untyped_storage().data_ptr()}
    ids = prompts[:1]
    with torch.no_grad():
        assert torch.equal(fused.generate(ids, max_new_tokens=6, eos_token_id=[]),
                           plain.generate(ids, max_new_tokens=6, eos_token_id=[]))
        attention = fused.text.layers[0].self_attn
        x = torch.randn(1, 8, tiny_config().text.hidden_size)  # 8 rows: the kernel
        q, k, v = attention.project_qkv(x)
        assert torch.equal(q, attention.q_proj(x)) and torch.equal(v, attention.v_proj(x))
        assert torch.allclose(fused(prompts), plain(prompts), rtol=1e-5, atol=1e-5)  # prefill: float matmuls


def test_quantize_refuses_the_fused_groups_and_to_keeps_them(checkpoint, prompts):
    model = quantize(im.Idefics2.from_pretrained(checkpoint), "int8")
    reference = quantize(im.Idefics2.from_pretrained(checkpoint, backends=False), "int8")
    groups = fused_quantized_groups(model)
    assert groups and all(group.intact() for group in groups)
    with torch.no_grad():
        assert torch.equal(model.generate(prompts[:1], max_new_tokens=4, eos_token_id=[]),
                           reference.generate(prompts[:1], max_new_tokens=4, eos_token_id=[]))
    scales = model.lm_head.scales.clone()
    model.to(torch.bfloat16)  # the fp32 int8 scales stay exactly as stored, and the views stay views
    assert model.lm_head.scales.dtype == torch.float32 and torch.equal(model.lm_head.scales, scales)
    assert all(group.intact() for group in groups)
    attention = model.text.layers[0].self_attn
    group = attention.__dict__["project_qkv"]
    attention.k_proj = QuantizedLinear.from_linear(nn.Linear(128, 64), QuantSpec(8))  # replaced: the group steps aside
    assert not group.intact()
    x = torch.randn(1, 1, 128, dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(attention.project_qkv(x)[1], attention.k_proj(x))


def test_bf16_model(checkpoint, prompts):
    model = im.Idefics2.from_pretrained(checkpoint, dtype=torch.bfloat16, quantize="int8")
    reference = im.Idefics2.from_pretrained(checkpoint, dtype=torch.bfloat16)
    assert model.lm_head.scales.dtype == torch.float32 and model.dtype == torch.bfloat16
    assert relative_logit_error(model, reference, prompts) <= 0.05
    assert model.generate(prompts, max_new_tokens=3, eos_token_id=[]).shape == (2, 13)


# ----------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("spec", [QuantSpec(8), QuantSpec(4, 32), QuantSpec(4, 64, symmetric=True),
                                  QuantSpec(4, 32, lm_head_bits=4)])
def test_saved_checkpoint_loads_back_and_equals_quantize_on_load(spec, checkpoint, prompts, tmp_path):
    quantized = quantize(im.Idefics2.from_pretrained(checkpoint), spec)
    save_quantized(quantized, tmp_path, max_shard_bytes=2_000_000)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["quantization"] == spec.to_config()
    assert loading.check_checkpoint(tmp_path, im.Idefics2, require_tokenizer=False)[0] == []
    names = set(loading.inspect_checkpoint(tmp_path).files)
    assert "model.text_model.layers.0.self_attn.q_proj.qweight" in names
    assert "model.text_model.layers.0.self_attn.q_proj.weight" not in names
    assert ("lm_head.zeros" in names) != spec.for_layer("lm_head").symmetric
    loaded = im.Idefics2.from_pretrained(tmp_path)
    assert loaded.lm_head.bits == spec.lm_head_bits and loaded.text.layers[0].mlp.down_proj.bits == spec.bits
    on_load = im.Idefics2.from_pretrained(checkpoint, quantize=spec)
    with torch.no_grad():
        expected = quantized(prompts)
        assert torch.equal(loaded(prompts), expected)
        assert torch.equal(on_load(prompts), expected)
    for a, b in zip(loaded.buffers(), quantized.buffers()):
        assert torch.equal(a, b)


def test_int4_lm_head_is_int8_unless_asked(checkpoint, prompts, tmp_path):
    """The lm_head of an int4 model is int8 by default (formats.py); lm_head_bits=4 makes it int4;
    a version 1 checkpoint (no lm_head_bits in its block) has an int4 lm_head and still loads."""
    default = quantize(im.Idefics2.from_pretrained(checkpoint), "int4")
    assert default.lm_head.bits == 8 and default.lm_head.qweight.dtype == torch.int8
    assert default.lm_head.zeros is None and default.lm_head.scales.dtype == torch.float32
    assert default.text.layers[0].self_attn.q_proj.bits == 4
    assert default.quantization.name == "int4, groups of 64, asymmetric, lm_head int8"
    all4 = quantize(im.Idefics2.from_pretrained(checkpoint), QuantSpec(4, lm_head_bits=4))
    assert all4.lm_head.bits == 4 and all4.lm_head.group_size == 64
    assert QuantSpec(4, components=("text",)).name == "int4, groups of 64, asymmetric"
    theirs = dict(all4.named_buffers())
    same = [torch.equal(mine, theirs[name]) for name, mine in default.named_buffers() if not name.startswith("lm_head.")]
    assert same and all(same)  # only the lm_head differs
    with torch.no_grad():
        assert not torch.equal(default(prompts), all4(prompts))
    save_quantized(all4, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["quantization"]["lm_head_bits"] == 4 and config["quantization"]["version"] == 2
    del config["quantization"]["lm_head_bits"]
    config["quantization"]["version"] = 1
    (tmp_path / "config.json").write_text(json.dumps(config))
    old = im.Idefics2.from_pretrained(tmp_path)
    assert old.lm_head.bits == 4
    with torch.no_grad():
        assert torch.equal(old(prompts), all4(prompts))


def test_streaming_load_in_small_blocks(checkpoint, prompts, monkeypatch):
    from idefics2_mini.quantize import checkpoint as module  # noqa: PLC0415

    whole = im.Idefics2.from_pretrained(checkpoint, quantize="int8")
    monkeypatch.setattr(module, "BLOCK_BYTES", 1000)  # a few rows per block
    blocks = list(module._stream_blocks(loading.inspect_checkpoint(checkpoint)))
    assert all(block.numel() * block.element_size() <= 1000 or block.dim() < 2 or block.shape[0] == 1
               for *_, block in blocks)  # at most the block size, or one row (or a vector) bigger than it
    assert len(blocks) > 3 * len(loading.inspect_checkpoint(checkpoint).files)
    streamed = im.Idefics2.from_pretrained(checkpoint, quantize="int8")
    with torch.no_grad():
        assert torch.equal(streamed(prompts), whole(prompts))


def test_tied_lm_head(tmp_path, prompts):
    config = tiny_config()
    config = im.Idefics2Config(vision=config.vision, perceiver=config.perceiver,
                               text=im.TextConfig(**{**config.text.__dict__, "tie_word_embeddings": True}))
    model = im.Idefics2(config)
    randomize_(model, seed=4)
    im.save_checkpoint(model, tmp_path / "float")
    on_load = im.Idefics2.from_pretrained(tmp_path / "float", quantize="int8")
    assert isinstance(on_load.lm_head, QuantizedLinear)
    after = quantize(im.Idefics2.from_pretrained(tmp_path / "float"), "int8")
    with torch.no_grad():
        assert torch.equal(on_load(prompts), after(prompts))
    save_quantized(on_load, tmp_path / "int8")
    with torch.no_grad():
        assert torch.equal(im.Idefics2.from_pretrained(tmp_path / "int8")(prompts), after(prompts))


def test_missing_scales_is_a_clear_error(checkpoint, tmp_path):
    save_quantized(quantize(im.Idefics2.from_pretrained(checkpoint), QuantSpec(4, 32)), tmp_path)
    from safetensors.torch import load_file, save_file  # noqa: PLC0415

    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.text_model.layers.1.mlp.up_proj.scales"]
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(loading.CheckpointError, match=r"lacks 1 quantization tensor.*layers\.1\.mlp\.up_proj\.scales"):
        im.Idefics2.from_pretrained(tmp_path)
    problems, _ = loading.check_checkpoint(tmp_path, im.Idefics2, require_tokenizer=False)
    assert any("up_proj.scales" in p for p in problems)


def test_spec_errors(checkpoint, tmp_path):
    with pytest.raises(QuantizationError, match="bits must be 8 or 4"):
        QuantSpec(3)
    with pytest.raises(QuantizationError, match="int8 or int4"):
        QuantSpec.parse("int5")
    with pytest.raises(QuantizationError, match="group size must be one of"):
        QuantSpec(4, 48)
    with pytest.raises(QuantizationError, match="per output channel"):
        QuantSpec(8, 64)
    with pytest.raises(QuantizationError, match="components"):
        QuantSpec(8, components=("decoder",))
    with pytest.raises(QuantizationError, match="lm_head bits must be 8 or 4"):
        QuantSpec(4, lm_head_bits=2)
    with pytest.raises(QuantizationError, match=r"group size 128 does not divide the input width of \d+ linear"):
        im.Idefics2.from_pretrained(checkpoint, quantize=QuantSpec(4, 128))  # 128-wide rows: the down_proj is 256
    save_quantized(quantize(im.Idefics2.from_pretrained(checkpoint), "int8"), tmp_path)
    with pytest.raises(QuantizationError, match="already quantized"):
        im.Idefics2.from_pretrained(tmp_path, quantize="int4")


# ----------------------------------------------------------------------------- commands


def test_quantize_command_and_quantize_on_load_flag(checkpoint, tmp_path, capsys):
    out = tmp_path / "int4"
    assert cli.main(["quantize", "--weights", str(checkpoint), "--bits", "4", "--group-size", "32",
                     "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().err
    assert (out / "tokenizer.model").is_file() and (out / "config.json").is_file()
    assert cli.main(["check", str(out)]) == 0
    capsys.readouterr()
    args = ["--max-new-tokens", "4", "--quiet", "Hello"]
    assert cli.main(["--weights", str(out), *args]) == 0
    from_file = capsys.readouterr().out
    assert cli.main(["--weights", str(checkpoint), "--quantize", "int4", "--group-size", "32", *args]) == 0
    assert capsys.readouterr().out == from_file


@pytest.mark.parametrize("argv,fragment", [
    (["quantize", "--bits", "3"], "bits must be 8 or 4"),
    (["quantize", "--bits", "4", "--group-size", "100"], "group size must be one of"),
    (["quantize", "--bits", "8", "--group-size", "64"], "per output channel"),
    (["quantize", "--bits", "4", "--lm-head-bits", "16"], "lm_head bits must be 8 or 4"),
])
def test_quantize_command_errors(argv, fragment, checkpoint, tmp_path, capsys):
    argv = [argv[0], "--weights", str(checkpoint), "--out", str(tmp_path / "out"), *argv[1:]]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and fragment in err and "Traceback" not in err


def test_main_command_flag_errors(checkpoint, capsys):
    assert cli.main(["--weights", str(checkpoint), "--group-size", "32", "Hi"]) == 1
    assert "--group-size goes with --quantize int8|int4" in capsys.readouterr().err
    assert cli.main(["--weights", str(checkpoint), "--lm-head-bits", "4", "Hi"]) == 1
    assert "--lm-head-bits goes with --quantize int8|int4" in capsys.readouterr().err
    assert cli.main(["--weights", str(checkpoint), "--quantize", "int4", "--group-size", "128", "Hi"]) == 1
    assert "does not divide" in capsys.readouterr().err

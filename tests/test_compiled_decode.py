"""`compile_decode` (backends/compiled.py): the decode step as one torch.compile graph that is
traced once (no recompiling per token: the cache keeps the step's slot in tensors) and generates
what the eager step generates."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
from reference_models import make_reference_checkpoint
from test_generation import image_batch
from torch._dynamo.testing import CompileCounter

import idefics2_mini as im
import kernels
from idefics2_mini.backends import compile_decode, fuse_projections, is_compiled
from idefics2_mini.quantize.fusion import fused_quantized_groups


@pytest.fixture(scope="module")
def peaked_model(tmp_path_factory):
    """Window 3, so 30 new tokens wrap the rolling cache many times; peaked logits (no near-ties)."""
    path = tmp_path_factory.mktemp("compiled")
    make_reference_checkpoint(path, seed=3, scale=3.0, sliding_window=3)
    return im.Idefics2.from_pretrained(path)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()  # compiled graphs are cached per code object, across tests
    yield
    torch._dynamo.reset()


def step_logits(model, batch, new_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy decode through `decode_step`: -> (tokens [B, new], logits [B, new, vocab])."""
    prompt_len = batch["input_ids"].shape[1]
    cache = model.new_cache(batch["input_ids"].shape[0], prompt_len + new_tokens)
    with torch.no_grad():
        logits = model(**batch, cache=cache, last_token_only=True)[:, -1]
        tokens, all_logits = [], []
        for _ in range(new_tokens):
            all_logits.append(logits)
            tokens.append(logits.argmax(-1))
            logits = model.decode_step(tokens[-1][:, None], cache)
    return torch.stack(tokens, 1), torch.stack(all_logits, 1)


def generate_eager_then_counted(model, batch, new_tokens: int):
    """-> (eager tokens, compiled tokens, the counting backend), the model left compiled with it."""
    eager = model.generate(**batch, max_new_tokens=new_tokens, eos_token_id=[])
    counter = CompileCounter()
    compile_decode(model, backend=counter)
    return eager, model.generate(**batch, max_new_tokens=new_tokens, eos_token_id=[]), counter


def test_decode_step_is_traced_once_and_equals_eager(peaked_model):
    """A counting backend (runs the captured graph as it is): one whole graph for every step
    of a generation, including steps after the rolling cache wraps and left-padded rows."""
    batch = image_batch()
    try:
        eager, compiled, counter = generate_eager_then_counted(peaked_model, batch, 30)
        assert counter.frame_count == 1  # fullgraph: one graph, never retraced step to step
        assert torch.equal(compiled, eager)
        # Other prompt lengths: the rolling cache is the window long whatever the prompt, so the
        # same graph serves them (the step's position lives in tensors, not in the graph).
        for extra in (2, 5):
            words = torch.arange(100, 100 + extra).expand(2, extra)
            longer = dict(batch, input_ids=torch.cat([batch["input_ids"], words], 1),
                          attention_mask=torch.cat([batch["attention_mask"], torch.ones_like(words)], 1))
            peaked_model.generate(**longer, max_new_tokens=8, eos_token_id=[])
        assert counter.frame_count == 1
    finally:
        compile_decode(peaked_model, enable=False)


def test_inductor_decode_matches_eager(peaked_model):
    """The real compiler (Inductor, C++ on the CPU): per-step logits equal eager's up to float
    rounding order, so greedy tokens are the same."""
    batch = image_batch()
    eager_tokens, eager_logits = step_logits(peaked_model, batch, 12)
    compile_decode(peaked_model)
    try:
        tokens, logits = step_logits(peaked_model, batch, 12)
    finally:
        compile_decode(peaked_model, enable=False)
    assert torch.equal(tokens, eager_tokens)
    assert (logits - eager_logits).abs().max() <= 1e-4


def test_moving_the_model_drops_the_compiled_step(peaked_model):
    """The graph took the fused projections as they were when traced: after the parameters
    move (`.to()`), are fused again, or a fused linear is replaced, the next step drops it and
    runs eager, still right."""
    batch = image_batch()
    eager = peaked_model.generate(**batch, max_new_tokens=4, eos_token_id=[])
    def replace_a_linear(model):  # as LoRA does: the fused matrix must not stand in for it any more
        attention = model.text.layers[0].self_attn
        plain = torch.nn.Linear(attention.k_proj.in_features, attention.k_proj.out_features, bias=False)
        plain.weight = attention.k_proj.weight
        attention.k_proj = plain

    for change in (lambda model: model.to(torch.float64).to(torch.float32), fuse_projections, replace_a_linear):
        compile_decode(peaked_model, backend=CompileCounter())
        assert is_compiled(peaked_model)
        assert torch.equal(peaked_model.generate(**batch, max_new_tokens=4, eos_token_id=[]), eager)
        assert is_compiled(peaked_model)
        change(peaked_model)  # new parameter tensors: the traced fusion is stale
        assert torch.equal(peaked_model.generate(**batch, max_new_tokens=4, eos_token_id=[]), eager)
        assert not is_compiled(peaked_model)


def test_traces_through_the_triton_kernels(peaked_model, monkeypatch):
    """The GPU path: with the Triton kernels forced (run by the interpreter on this CPU), the
    compiled step still is one graph, the kernels inside it as custom ops, and generates what
    the eager Triton path does."""
    monkeypatch.setenv(kernels.KERNELS_ENV, "triton")
    try:
        eager, compiled, counter = generate_eager_then_counted(peaked_model, image_batch(), 5)
    finally:
        compile_decode(peaked_model, enable=False)
    assert counter.frame_count == 1
    assert torch.equal(compiled, eager)


def test_importing_the_package_does_not_import_the_compiler():
    """torch._dynamo costs ~1 s to import; only compile_decode should pay it."""
    code = "import sys, idefics2_mini; print('torch._dynamo' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_decode_attention_equals_the_eager_reference(dtype):
    """Under torch.compile, for a small cache, decode attention runs as plain math (which
    Inductor fuses) instead of SDPA: the reference's result, GQA, masked slots and a row that
    sees no key (zeros) included."""
    g = torch.Generator().manual_seed(5)
    batch, q_heads, kv_heads, slots, head_dim = 3, 8, 2, 37, 32
    q = torch.randn(batch, q_heads, head_dim, generator=g).to(dtype)
    k = torch.randn(batch, kv_heads, slots, head_dim, generator=g).to(dtype)
    v = torch.randn(batch, kv_heads, slots, head_dim, generator=g).to(dtype)
    seqlens = torch.tensor([slots, 20, 0], dtype=torch.int32)  # the last row sees nothing
    key_mask = torch.rand(batch, slots, generator=g) > 0.3
    compiled = torch.compile(kernels.attention_decode, backend="aot_eager", fullgraph=True)
    for mask in (None, key_mask):
        eager = kernels.attention_decode_reference(q, k, v, seqlens, key_mask=mask, scale=0.2)
        got = compiled(q, k, v, seqlens, key_mask=mask, scale=0.2)
        assert got.dtype == dtype and torch.equal(got[2], torch.zeros_like(got[2]))
        tolerance = 1e-5 if dtype == torch.float32 else 2e-2
        assert (got.float() - eager.float()).abs().max() <= tolerance


def test_quantized_fused_projections_trace_and_are_rechecked(tmp_path):
    """A quantized model's fused groups (quantize/fusion.py) trace into the one graph like float
    ones, and replacing a member is noticed before the next step (eager from then on)."""
    make_reference_checkpoint(tmp_path, seed=3, scale=3.0, sliding_window=3)
    model = im.Idefics2.from_pretrained(tmp_path, quantize="int8")
    assert fused_quantized_groups(model.text)
    batch = image_batch()
    try:
        eager, compiled, counter = generate_eager_then_counted(model, batch, 6)
        assert counter.frame_count == 1 and torch.equal(compiled, eager) and is_compiled(model)
        attention = model.text.layers[0].self_attn
        attention.k_proj = copy.deepcopy(attention.k_proj)  # same values, its own buffers: the group steps aside
        assert torch.equal(model.generate(**batch, max_new_tokens=6, eos_token_id=[]), eager)
        assert not is_compiled(model)
    finally:
        compile_decode(model, enable=False)

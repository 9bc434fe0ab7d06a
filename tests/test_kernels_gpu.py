"""The Triton kernels compiled on a CUDA GPU at the model's real sizes (skipped without CUDA),
held to the same tolerance rule as the interpreter tests, plus the model with kernels vs
without (logits close, greedy tokens equal) when a small checkpoint is available.
"""

import glob
import importlib
import os

import pytest
import torch

import kernels
from kernels import _triton
from kernel_rules import assert_rule, max_err
from kernels.attention_decode import attention_decode_reference, attention_decode_triton
from kernels.attention_backward import attention_backward_triton, attention_varlen_backward_triton
from kernels.attention_prefill import (
    attention_reference,
    attention_triton,
    attention_varlen_reference,
    attention_varlen_triton,
)

rms_module = importlib.import_module("kernels.rmsnorm")

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or not _triton.available() or _triton.interpreter_active(),
    reason="needs a CUDA GPU and compiled (not interpreted) Triton",
)

DEV = "cuda"
BF16 = torch.bfloat16


@pytest.mark.parametrize("rows,width", [(1, 4096), (8192, 4096), (4900, 1152), (3, 16384)])
def test_rmsnorm_real_sizes(rows, width):
    x = torch.randn(rows, width, device=DEV, dtype=BF16)
    w = torch.randn(width, device=DEV, dtype=BF16)
    y, _ = rms_module._rms_norm_fwd_launch(x, w, 1e-5)
    ref_lo = kernels.rms_norm_reference(x, w, 1e-5)
    assert_rule(y, kernels.rms_norm_reference(x.double(), w.double(), 1e-5), ref_lo, BF16)


def test_rmsnorm_backward_real_size():
    x = torch.randn(512, 4096, device=DEV, dtype=torch.float32, requires_grad=True)
    w = torch.randn(4096, device=DEV, dtype=torch.float32, requires_grad=True)
    y = rms_module.RMSNormFunction.apply(x, w, 1e-5)
    dy = torch.randn_like(y)
    dx, dw = torch.autograd.grad(y, (x, w), dy)
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    dx64, dw64 = torch.autograd.grad(kernels.rms_norm_reference(x64, w64, 1e-5), (x64, w64), dy.double())
    assert max_err(dx, dx64) < 1e-4 and max_err(dw, dw64) < 1e-4 * 512**0.5 * 10


@pytest.mark.parametrize("seq,window", [(1000, None), (4096, 4096), (6000, 4096)])
def test_decoder_prefill(seq, window):
    q = torch.randn(1, 32, seq, 128, device=DEV, dtype=BF16)
    k, v = (torch.randn(1, 8, seq, 128, device=DEV, dtype=BF16) for _ in range(2))
    out = attention_triton(q, k, v, causal=True, window=window)
    ref32 = attention_reference(q.float(), k.float(), v.float(), causal=True, window=window)
    assert_rule(out, ref32, attention_reference(q, k, v, causal=True, window=window), BF16)


def test_vision_packed():
    lengths = [4900, 1200, 2345]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device=DEV, dtype=torch.int32)
    q, k, v = (torch.randn(sum(lengths), 16, 72, device=DEV, dtype=BF16) for _ in range(3))
    out = attention_varlen_triton(q, k, v, cu, cu, max_seqlen_q=max(lengths), max_seqlen_k=max(lengths))
    ref32 = attention_varlen_reference(q.float(), k.float(), v.float(), cu, cu)
    assert_rule(out, ref32, attention_varlen_reference(q, k, v, cu, cu), BF16)


def test_perceiver():
    lk = [1000 + 64, 400 + 64, 64]
    cq = torch.tensor([0, 64, 128, 192], device=DEV, dtype=torch.int32)
    ck = torch.tensor([0, *torch.tensor(lk).cumsum(0).tolist()], device=DEV, dtype=torch.int32)
    q = torch.randn(192, 16, 96, device=DEV, dtype=BF16)
    k, v = (torch.randn(sum(lk), 4, 96, device=DEV, dtype=BF16) for _ in range(2))
    out = attention_varlen_triton(q, k, v, cq, ck, max_seqlen_q=64, max_seqlen_k=max(lk))
    ref32 = attention_varlen_reference(q.float(), k.float(), v.float(), cq, ck)
    assert_rule(out, ref32, attention_varlen_reference(q, k, v, cq, ck), BF16)


def _grads(reference, q, k, v, grad_out, *args, dtype, **kwargs):
    q, k, v = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
    return torch.autograd.grad(reference(q, k, v, *args, **kwargs), (q, k, v), grad_out.to(dtype))


def _assert_backward_rule(grads, reference, q, k, v, grad_out, *args, **kwargs):
    hi = _grads(reference, q, k, v, grad_out, *args, dtype=torch.float32, **kwargs)
    lo = _grads(reference, q, k, v, grad_out, *args, dtype=q.dtype, **kwargs)
    for grad, grad_hi, grad_lo in zip(grads, hi, lo):
        assert_rule(grad, grad_hi, grad_lo, q.dtype)


@pytest.mark.parametrize("seq,window", [(1000, None), (2500, 1024)])
def test_decoder_prefill_backward(seq, window):
    q = torch.randn(1, 32, seq, 128, device=DEV, dtype=BF16)
    k, v = (torch.randn(1, 8, seq, 128, device=DEV, dtype=BF16) for _ in range(2))
    mask = torch.ones(1, seq, device=DEV, dtype=torch.bool)
    mask[0, :37] = False  # left padding
    kwargs = dict(causal=True, window=window, key_padding_mask=mask)
    out, lse = attention_triton(q, k, v, return_lse=True, **kwargs)
    grad_out = torch.randn_like(out)
    grads = attention_backward_triton(grad_out, q, k, v, out, lse, **kwargs)
    _assert_backward_rule(grads, attention_reference, q, k, v, grad_out, **kwargs)


def test_vision_and_perceiver_backward():
    lengths = [1200, 345]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device=DEV, dtype=torch.int32)
    q, k, v = (torch.randn(sum(lengths), 16, 72, device=DEV, dtype=BF16) for _ in range(3))
    out, lse = attention_varlen_triton(q, k, v, cu, cu, return_lse=True)
    grad_out = torch.randn_like(out)
    grads = attention_varlen_backward_triton(grad_out, q, k, v, out, lse, cu, cu)
    _assert_backward_rule(grads, attention_varlen_reference, q, k, v, grad_out, cu, cu)

    lk = [345 + 64, 64]
    cq = torch.tensor([0, 64, 128], device=DEV, dtype=torch.int32)
    ck = torch.tensor([0, *torch.tensor(lk).cumsum(0).tolist()], device=DEV, dtype=torch.int32)
    q = torch.randn(128, 16, 96, device=DEV, dtype=BF16)
    k, v = (torch.randn(sum(lk), 4, 96, device=DEV, dtype=BF16) for _ in range(2))
    out, lse = attention_varlen_triton(q, k, v, cq, ck, return_lse=True)
    grad_out = torch.randn_like(out)
    grads = attention_varlen_backward_triton(grad_out, q, k, v, out, lse, cq, ck)
    _assert_backward_rule(grads, attention_varlen_reference, q, k, v, grad_out, cq, ck)


def test_attention_autograd_on_cuda():
    """kernels.attention in auto mode on CUDA: Triton forward and backward, fp32 grads close."""
    leaves = [torch.randn(2, 300, h, 128, device=DEV, requires_grad=True) for h in (8, 2, 2)]
    out = kernels.attention(*(t.transpose(1, 2) for t in leaves), causal=True, window=100)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, grad_out)
    ref = [t.detach().double().requires_grad_() for t in leaves]
    ref_grads = torch.autograd.grad(attention_reference(*(t.transpose(1, 2) for t in ref), causal=True, window=100),
                                    ref, grad_out.double())
    assert max(max_err(a, b) for a, b in zip(grads, ref_grads)) <= 1e-4


@pytest.mark.parametrize("batch,slots", [(1, 32768), (8, 4096), (64, 1024)])
def test_decode_real_sizes(batch, slots):
    q = torch.randn(batch, 32, 128, device=DEV, dtype=BF16)
    k, v = (torch.randn(batch, 8, slots, 128, device=DEV, dtype=BF16) for _ in range(2))
    seqlens = torch.randint(1, slots + 1, (batch,), device=DEV)
    mask = torch.rand(batch, slots, device=DEV) > 0.05
    out = attention_decode_triton(q, k, v, seqlens, key_mask=mask)
    ref32 = attention_decode_reference(q.float(), k.float(), v.float(), seqlens, key_mask=mask)
    assert_rule(out, ref32, attention_decode_reference(q, k, v, seqlens, key_mask=mask), BF16)


def test_compiled_model_path_with_custom_ops():
    """torch.compile (inductor) around the dispatching functions on CUDA."""
    x = torch.randn(64, 4096, device=DEV, dtype=BF16)
    w = torch.randn(4096, device=DEV, dtype=BF16)
    fn = torch.compile(lambda x, w: kernels.rms_norm(x, w, 1e-5), fullgraph=True)
    assert max_err(fn(x, w), kernels.rms_norm_reference(x, w, 1e-5)) < 0.1


def _small_checkpoint():
    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "weights")
    for config in sorted(glob.glob(os.path.join(root, "**", "config.json"), recursive=True)):
        folder = os.path.dirname(config)
        if glob.glob(os.path.join(folder, "*.safetensors")) and os.path.exists(os.path.join(folder, "tokenizer.model")):
            return folder
    return None


def test_model_with_and_without_kernels(monkeypatch):
    """Logits close and greedy tokens equal with the Triton kernels (auto on CUDA) and with the
    references (IDEFICS2_MINI_KERNELS=torch). Uses the first small checkpoint under weights/."""
    folder = _small_checkpoint()
    if folder is None:
        pytest.skip("no checkpoint with tokenizer.model under weights/")
    im = pytest.importorskip("idefics2_mini")
    model = im.Idefics2.from_pretrained(folder, dtype=BF16, device=DEV)
    processor = im.Idefics2Processor.from_pretrained(folder)
    from PIL import Image

    image = Image.new("RGB", (64, 48), (120, 30, 200))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    batch = {k: v.to(DEV) for k, v in processor(text=prompt, images=[image]).items()}
    runs = {}
    for mode in ("torch", "auto"):
        monkeypatch.setenv(kernels.KERNELS_ENV, mode)
        with torch.no_grad():
            logits = model(**batch).float()
            tokens = model.generate(**batch, max_new_tokens=8, do_sample=False)
        runs[mode] = (logits, tokens)
    assert max_err(runs["auto"][0], runs["torch"][0]) <= 0.05 * runs["torch"][0].abs().max().item()
    assert torch.equal(runs["auto"][1], runs["torch"][1])

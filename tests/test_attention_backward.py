"""Triton prefill attention backward (dq, dk, dv) against autograd through the torch reference,
on CPU in Triton's interpreter, on small shapes chosen to hit every masking branch.

Tolerance rule (kernel_rules.py): per gradient, the kernel's error against the fp64 reference
is at most twice the error of the torch reference differentiated in the same low precision
(plus 1e-6); fp32 inputs: <= 1e-5. Interpreter blocks are 16 x 16, so lengths of 20-40 span
several query and key blocks, partial blocks and (with a window) skipped blocks.
"""

import os

if not os.environ.get("TRITON_INTERPRET"):
    import torch as _torch

    if not _torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kernels
from kernel_rules import assert_rule, max_err, needs_triton
from kernels import attention_prefill as prefill
from kernels.attention_backward import attention_backward_triton, attention_varlen_backward_triton
from kernels.attention_prefill import (
    attention_reference,
    attention_triton,
    attention_varlen_reference,
    attention_varlen_triton,
)

pytestmark = needs_triton

HERE = Path(__file__).resolve().parent


def rand(shape, dtype, g):
    return torch.randn(shape, generator=g).to(dtype)


def cu(lengths):
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)


def reference_grads(reference, q, k, v, grad_out, *args, dtype=None, **kwargs):
    """(dq, dk, dv) of `reference` by autograd, with the inputs cast to `dtype` (default: theirs)."""
    dtype = dtype or q.dtype
    q, k, v = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
    out = reference(q, k, v, *args, **kwargs)
    return torch.autograd.grad(out, (q, k, v), grad_out.to(dtype))


def assert_grads_follow_rule(grads, reference, q, k, v, grad_out, *args, **kwargs):
    """Each of dq, dk, dv against the fp64 reference, judged by the reference's own error in
    the inputs' dtype."""
    hi = reference_grads(reference, q, k, v, grad_out, *args, dtype=torch.float64, **kwargs)
    lo = reference_grads(reference, q, k, v, grad_out, *args, **kwargs)
    for name, grad, grad_hi, grad_lo in zip(("dq", "dk", "dv"), grads, hi, lo):
        try:
            assert_rule(grad, grad_hi, grad_lo, q.dtype)
        except AssertionError as error:
            raise AssertionError(f"{name}: {error}") from None


# (batch, q_heads, kv_heads, q_len, k_len, head_dim, causal, window, key padding, dtype)
PADDED_CASES = [
    # vision tower: non-causal, head dim 72, random key padding
    (2, 2, 2, 21, 21, 72, False, None, "random", torch.bfloat16),
    # decoder: causal + window with a left-padded batch, GQA 4/2, head dim 128
    (2, 4, 2, 30, 30, 128, True, 7, "left", torch.float16),
    # decoder: plain causal over several blocks, GQA 4/2
    (1, 4, 2, 37, 37, 128, True, None, None, torch.bfloat16),
    # perceiver: 3 latents over 5 context + 3 latent keys, GQA 4/2, head dim 96, key padding
    (2, 4, 2, 3, 8, 96, False, None, "random", torch.float32),
    # chunked prefill: fewer queries than keys, window, GQA 4/1
    (2, 4, 1, 9, 33, 96, True, 16, None, torch.float32),
    # more queries than keys: the first rows see no key (zero gradients)
    (1, 2, 1, 40, 23, 72, True, None, None, torch.float32),
]


def padding_mask(kind, batch, k_len, g):
    if kind is None:
        return None
    if kind == "left":  # sequence 1 starts with k_len // 3 padding keys
        mask = torch.ones(batch, k_len, dtype=torch.bool)
        mask[1, : k_len // 3] = False
        return mask
    mask = torch.rand(batch, k_len, generator=g) > 0.3
    mask[:, -1] = True  # every sequence keeps a real key (fully masked rows: own test)
    return mask


@pytest.mark.parametrize("case", PADDED_CASES, ids=lambda c: "b{}h{}/{}q{}k{}d{}c{}w{}p{}-{}".format(*c[:9], str(c[9])[6:]))
def test_padded_backward_matches_reference(case):
    batch, hq, hkv, lq, lk, d, causal, window, padding, dtype = case
    g = torch.Generator().manual_seed(lq * 1000 + lk * 10 + d)
    q, k, v = rand((batch, hq, lq, d), dtype, g), rand((batch, hkv, lk, d), dtype, g), rand((batch, hkv, lk, d), dtype, g)
    kwargs = dict(causal=causal, window=window, key_padding_mask=padding_mask(padding, batch, lk, g))
    out, lse = attention_triton(q, k, v, return_lse=True, **kwargs)
    grad_out = rand(out.shape, dtype, g)
    grads = attention_backward_triton(grad_out, q, k, v, out, lse, **kwargs)
    assert all(grad.shape == t.shape for grad, t in zip(grads, (q, k, v)))
    assert_grads_follow_rule(grads, attention_reference, q, k, v, grad_out, **kwargs)


# (q lengths, k lengths, q_heads, kv_heads, head_dim, causal, window, dtype)
VARLEN_CASES = [
    # vision tower: packed images of uneven sizes (one empty), non-causal
    ([20, 3, 0, 11], [20, 3, 0, 11], 4, 4, 72, False, None, torch.bfloat16),
    # perceiver: 3 latents per image over (context + latents) keys, GQA 4/2
    ([3, 3, 3], [5 + 3, 1 + 3, 3], 4, 2, 96, False, None, torch.bfloat16),
    # decoder packed prefill: causal + window, a zero-length sequence inside the pack
    ([1, 0, 33, 12], [1, 0, 33, 12], 4, 2, 128, True, 9, torch.float16),
    # chunked per sequence, keys without queries, queries without keys (zero gradients)
    ([5, 0, 12, 4], [20, 6, 12, 0], 2, 1, 64, True, None, torch.float32),
]


@pytest.mark.parametrize("case", VARLEN_CASES, ids=lambda c: f"q{c[0]}k{c[1]}h{c[2]}/{c[3]}d{c[4]}c{c[5]}w{c[6]}")
def test_varlen_backward_matches_reference(case):
    lq, lk, hq, hkv, d, causal, window, dtype = case
    g = torch.Generator().manual_seed(sum(lq) * 7 + sum(lk))
    q = rand((sum(lq), hq, d), dtype, g)
    k, v = rand((sum(lk), hkv, d), dtype, g), rand((sum(lk), hkv, d), dtype, g)
    cq, ck = cu(lq), cu(lk)
    kwargs = dict(causal=causal, window=window)
    out, lse = attention_varlen_triton(q, k, v, cq, ck, max_seqlen_q=max(lq), max_seqlen_k=max(lk),
                                       return_lse=True, **kwargs)
    grad_out = rand(out.shape, dtype, g)
    grads = attention_varlen_backward_triton(grad_out, q, k, v, out, lse, cq, ck, **kwargs)
    assert_grads_follow_rule(grads, attention_varlen_reference, q, k, v, grad_out, cq, ck, **kwargs)


@pytest.mark.parametrize("q_len", [35, 34, 21, 20])
def test_window_edges_fp32(q_len):
    """35 keys, 16-row interpreter blocks: the query offsets Lk - Lq = 0, 1, 14, 15 and windows
    around one and two block sizes put the first and last query block that sees a key block,
    and the first and last one visible to every row (no mask built), on every alignment."""
    g = torch.Generator().manual_seed(q_len)
    q, k, v = rand((1, 2, q_len, 16), torch.float32, g), rand((1, 1, 35, 16), torch.float32, g), rand((1, 1, 35, 16), torch.float32, g)
    for window in (1, 2, 3, 16, 17, 30, 31, None):
        kwargs = dict(causal=True, window=window)
        out, lse = attention_triton(q, k, v, return_lse=True, **kwargs)
        grad_out = rand(out.shape, torch.float32, g)
        grads = attention_backward_triton(grad_out, q, k, v, out, lse, **kwargs)
        ref = reference_grads(attention_reference, q, k, v, grad_out, dtype=torch.float64, **kwargs)
        assert max(max_err(a, b) for a, b in zip(grads, ref)) <= 1e-5, f"window {window}"


def test_rows_and_keys_nobody_sees_get_zero_gradients():
    """A fully padded sequence, queries before the first key (causal, Lq > Lk), and a packed
    sequence without keys: zeros in the forward, exactly zero (never NaN) gradients."""
    g = torch.Generator().manual_seed(3)
    q, k, v = rand((2, 2, 24, 32), torch.float32, g), rand((2, 1, 18, 32), torch.float32, g), rand((2, 1, 18, 32), torch.float32, g)
    mask = torch.ones(2, 18, dtype=torch.bool)
    mask[1] = False  # sequence 1: no real key at all
    mask[0, 5:9] = False  # padding keys inside sequence 0
    out, lse = attention_triton(q, k, v, causal=True, key_padding_mask=mask, return_lse=True)
    dq, dk, dv = attention_backward_triton(torch.ones_like(out), q, k, v, out, lse, causal=True, key_padding_mask=mask)
    for grad in (dq, dk, dv):
        assert torch.isfinite(grad).all()
    assert torch.isinf(lse[1]).all() and (dq[1] == 0).all() and (dk[1] == 0).all() and (dv[1] == 0).all()
    assert (dq[0, :, :6] == 0).all()  # rows 0-5 sit before key 0 (Lq - Lk = 6)
    assert (dk[0, :, 5:9] == 0).all() and (dv[0, :, 5:9] == 0).all()
    ref = reference_grads(attention_reference, q, k, v, torch.ones_like(out), causal=True, key_padding_mask=mask)
    assert max(max_err(a, b) for a, b in zip((dq, dk, dv), ref)) <= 1e-5

    qp, kp = rand((7, 2, 16), torch.float32, g), rand((4, 2, 16), torch.float32, g)
    cq, ck = cu([3, 4]), cu([4, 0])
    out, lse = attention_varlen_triton(qp, kp, kp, cq, ck, return_lse=True)
    dq, dk, dv = attention_varlen_backward_triton(torch.ones_like(out), qp, kp, kp, out, lse, cq, ck)
    assert torch.isfinite(dq).all() and (dq[3:] == 0).all() and (out[3:] == 0).all()


def test_block_sizes_do_not_change_the_gradients():
    g = torch.Generator().manual_seed(2)
    q, k, v = (rand((1, 2, 40, 32), torch.float32, g) for _ in range(3))
    grad_out = rand((1, 2, 40, 32), torch.float32, g)
    ref = reference_grads(attention_reference, q, k, v, grad_out, causal=True, window=13)
    out, lse = attention_triton(q, k, v, causal=True, window=13, return_lse=True)
    for block_m, block_n in [(16, 32), (32, 16), (64, 64)]:
        grads = attention_backward_triton(grad_out, q, k, v, out, lse, causal=True, window=13,
                                          block_m=block_m, block_n=block_n)
        assert max(max_err(a, b) for a, b in zip(grads, ref)) <= 1e-5, (block_m, block_n)


def test_inference_forward_and_training_forward_agree():
    """The LSE store is a constexpr branch: the output is bit-identical with or without it."""
    g = torch.Generator().manual_seed(8)
    q, k, v = (rand((1, 2, 19, 32), torch.bfloat16, g) for _ in range(3))
    out, lse = attention_triton(q, k, v, causal=True, window=5, return_lse=True)
    assert torch.equal(out, attention_triton(q, k, v, causal=True, window=5))
    # lse is log2 of the softmax denominator of the scaled scores (scale * log2(e) * q.k).
    scores = (q.float() @ k.float().transpose(-1, -2)) * 32**-0.5
    scores = scores.masked_fill(~kernels.visible_keys_mask(19, 19, causal=True, window=5), float("-inf"))
    expected = torch.logsumexp(scores, -1) / torch.log(torch.tensor(2.0))
    assert max_err(lse, expected) <= 1e-5


@pytest.fixture
def triton_backward_calls(monkeypatch):
    """Force the Triton path and record which backward launcher runs."""
    monkeypatch.setenv(kernels.KERNELS_ENV, "triton")
    calls = []
    real_padded, real_varlen = prefill.attention_backward_triton, prefill.attention_varlen_backward_triton
    monkeypatch.setattr(prefill, "attention_backward_triton", lambda *a, **kw: calls.append("padded") or real_padded(*a, **kw))
    monkeypatch.setattr(prefill, "attention_varlen_backward_triton", lambda *a, **kw: calls.append("varlen") or real_varlen(*a, **kw))
    return calls


def test_autograd_through_dispatching_attention(triton_backward_calls):
    """kernels.attention with a gradient needed runs the Triton forward and backward; q, k, v
    arrive as the model passes them ([B, L, H, D] transposed views) and .grad matches the
    reference's."""
    g = torch.Generator().manual_seed(9)
    leaves = [rand((2, 21, h, 24), torch.float32, g).requires_grad_() for h in (4, 2, 2)]
    mask = torch.ones(2, 21, dtype=torch.bool)
    mask[0, :4] = False
    kwargs = dict(causal=True, window=6, key_padding_mask=mask, scale=0.3)
    out = kernels.attention(*(t.transpose(1, 2) for t in leaves), **kwargs)
    out.sum().backward()  # the gradient of a sum has stride-0 (expanded) layout
    grads = [t.grad for t in leaves]
    ref_leaves = [t.detach().clone().requires_grad_() for t in leaves]
    attention_reference(*(t.transpose(1, 2) for t in ref_leaves), **kwargs).sum().backward()
    assert triton_backward_calls == ["padded"]
    for grad, ref in zip(grads, ref_leaves):
        assert grad.shape == ref.shape and max_err(grad, ref.grad) <= 1e-5


def test_autograd_through_dispatching_attention_varlen(triton_backward_calls):
    g = torch.Generator().manual_seed(10)
    lq, lk = [3, 3], [8, 4]
    q = rand((6, 4, 16), torch.float32, g).requires_grad_()
    kv = rand((12, 2, 16), torch.float32, g).requires_grad_()  # k and v from one leaf, as a fused projection
    out = kernels.attention_varlen(q, kv, kv * 0.5, cu(lq), cu(lk), max_seqlen_q=3, max_seqlen_k=8)
    grad_out = rand(out.shape, torch.float32, g)
    out.backward(grad_out)
    q_ref, kv_ref = q.detach().clone().requires_grad_(), kv.detach().clone().requires_grad_()
    attention_varlen_reference(q_ref, kv_ref, kv_ref * 0.5, cu(lq), cu(lk)).backward(grad_out)
    assert triton_backward_calls == ["varlen"]
    assert max_err(q.grad, q_ref.grad) <= 1e-5 and max_err(kv.grad, kv_ref.grad) <= 1e-5


def test_no_gradient_needed_runs_the_inference_op(monkeypatch):
    monkeypatch.setenv(kernels.KERNELS_ENV, "triton")
    q = torch.randn(1, 2, 8, 16, requires_grad=True)
    with torch.no_grad():
        out = kernels.attention(q, q, q, causal=True)
    assert out.grad_fn is None
    assert max_err(out, attention_reference(q.detach(), q.detach(), q.detach(), causal=True)) <= 1e-5


def test_custom_ops_opcheck():
    g = torch.Generator().manual_seed(5)
    q, k, v = rand((1, 2, 18, 32), torch.float32, g), rand((1, 1, 18, 32), torch.float32, g), rand((1, 1, 18, 32), torch.float32, g)
    mask = torch.ones(1, 18, dtype=torch.bool)
    mask[0, :3] = False
    out, lse = prefill.attention_fwd_lse_op(q, k, v, True, 5, mask, None)
    torch.library.opcheck(prefill.attention_fwd_lse_op, (q, k, v, True, 5, mask, None))
    torch.library.opcheck(prefill.attention_bwd_op, (torch.ones_like(out), q, k, v, out, lse, True, 5, mask, None))
    cq = cu([10, 8])
    qp, kp = q[0].transpose(0, 1).contiguous(), k[0].transpose(0, 1).contiguous()
    out, lse = prefill.attention_varlen_fwd_lse_op(qp, kp, kp, cq, cq, 10, 10, False, None, 0.3)
    torch.library.opcheck(prefill.attention_varlen_fwd_lse_op, (qp, kp, kp, cq, cq, 10, 10, False, None, 0.3))
    torch.library.opcheck(prefill.attention_varlen_bwd_op, (torch.ones_like(out), qp, kp, kp, out, lse, cq, cq, 10, 10, False, None, 0.3))


def test_torch_compile_traces_forward_and_backward(monkeypatch):
    """torch.compile keeps both custom ops opaque and differentiates through the Function."""
    monkeypatch.setenv(kernels.KERNELS_ENV, "triton")
    g = torch.Generator().manual_seed(6)
    leaves = [rand((1, 2, 20, 16), torch.float32, g).requires_grad_() for _ in range(3)]
    fn = torch.compile(lambda q, k, v: kernels.attention(q, k, v, causal=True, window=4).square().sum(),
                       backend="aot_eager", fullgraph=True)
    grads = torch.autograd.grad(fn(*leaves), leaves)
    ref = [t.detach().clone().requires_grad_() for t in leaves]
    ref_grads = torch.autograd.grad(attention_reference(*ref, causal=True, window=4).square().sum(), ref)
    assert max(max_err(a, b) for a, b in zip(grads, ref_grads)) <= 1e-5


def _ptxas_shipped() -> bool:
    spec = importlib.util.find_spec("triton")
    return spec is not None and spec.origin is not None and (
        Path(spec.origin).parent / "backends" / "nvidia" / "bin" / "ptxas").is_file()


# Compiles the training forward (STORE_LSE) and the three backward kernels for an H100 the way
# the launchers run them on a GPU (tests/aot_compile_kernels.py does the same for the rest).
AOT_SCRIPT = r"""
import sys
sys.path.insert(0, sys.argv[1])
import aot_compile_kernels as aot  # sets TRITON_INTERPRET=0 before importing triton
import triton
from triton.compiler import ASTSource
import torch
backward = sys.modules["kernels.attention_backward"]
cuda = torch.device("cuda")
pointers = {"kpm_ptr": "*u8", "cu_q_ptr": "*i32", "cu_k_ptr": "*i32", "lse_ptr": "*fp32", "delta_ptr": "*fp32"}
for element, dtype, layouts in (("bf16", torch.bfloat16, (False, True)), ("fp32", torch.float32, (False,))):
    bm, bn, warps, stages = backward._backward_block_sizes(128, dtype, cuda)
    fwd_m, fwd_n, fwd_warps, fwd_stages = aot.prefill._block_sizes(128, dtype, cuda)
    for varlen in layouts:
        masks = dict(VARLEN=varlen, CAUSAL=not varlen, HAS_WINDOW=not varlen, HAS_KPM=not varlen, BLOCK_D=128,
                     DOT_PRECISION="ieee" if element == "fp32" else "tf32")
        for kernel, blocks, num_warps, num_stages in (
            (aot.prefill._attention_fwd_kernel, dict(BLOCK_M=fwd_m, BLOCK_N=fwd_n, STORE_LSE=True), fwd_warps, fwd_stages),
            (backward._attention_bwd_dkdv_kernel, dict(BLOCK_M=bm, BLOCK_N=bn), warps, stages),
            (backward._attention_bwd_dq_kernel, dict(BLOCK_M=bm, BLOCK_N=bn), warps, stages),
        ):
            types = aot.signature(kernel, pointers, {"qk_scale", "sm_scale"}, element)
            triton.compile(ASTSource(fn=kernel, signature=types, constexprs={**masks, **blocks}), target=aot.H100,
                           options={"num_warps": num_warps, "num_stages": num_stages})
            print("ok", kernel.fn.__name__, element, "varlen" if varlen else "padded", flush=True)
kernel = backward._attention_bwd_preprocess_kernel
triton.compile(ASTSource(fn=kernel, signature=aot.signature(kernel, {"delta_ptr": "*fp32"}, set(), "bf16"),
                         constexprs=dict(BLOCK_M=64, BLOCK_D=128)), target=aot.H100, options={"num_warps": 4})
print("ok", kernel.fn.__name__, flush=True)
"""


@pytest.mark.skipif(not _ptxas_shipped(), reason="needs triton with its bundled ptxas")
def test_backward_kernels_compile_for_sm90(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": str(tmp_path), "TRITON_DEFAULT_FP_FUSION": "1"}
    process = subprocess.run([sys.executable, "-c", AOT_SCRIPT, str(HERE)], env=env, capture_output=True,
                             text=True, timeout=600, cwd=HERE.parent)
    assert process.returncode == 0, process.stdout[-3000:] + process.stderr[-3000:]
    assert process.stdout.count("ok ") == 3 * 3 + 1, process.stdout

"""Triton prefill attention forward (padded and packed layouts) against the torch reference, on
CPU in Triton's interpreter, on small shapes chosen to hit every masking branch (the backward:
test_attention_backward.py).

Tolerance rule (issue 5): the kernel's error against the fp32 reference is at most twice the
error of the torch reference run in the same low precision (plus 1e-6); fp32 inputs: <= 1e-5.
Block sizes under the interpreter are 16 x 16, so lengths of 20-70 already span several query
and key blocks, boundary blocks and (with a window) skipped blocks.
"""

import os

if not os.environ.get("TRITON_INTERPRET"):
    import torch as _torch

    if not _torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

import pytest
import torch

import kernels
from kernel_rules import assert_rule, max_err, needs_triton
from kernels import attention_prefill as prefill
from kernels.attention_prefill import (
    attention,
    attention_reference,
    attention_triton,
    attention_varlen,
    attention_varlen_reference,
    attention_varlen_triton,
)

pytestmark = needs_triton

def rand(shape, dtype, g):
    return torch.randn(shape, generator=g).to(dtype)


# (batch, q_heads, kv_heads, q_len, k_len, head_dim, causal, window, key padding, dtype)
PADDED_CASES = [
    # decoder-like: causal, odd lengths, GQA 4, head dim 128
    (1, 8, 2, 37, 37, 128, True, None, False, torch.bfloat16),
    # window shorter than the length (blocks before the window are skipped), GQA 8
    (1, 8, 1, 53, 53, 128, True, 7, False, torch.float16),
    # window 1: each query sees only itself
    (2, 2, 2, 21, 21, 128, True, 1, False, torch.float32),
    # window >= length: same as plain causal
    (1, 4, 2, 19, 19, 96, True, 64, False, torch.bfloat16),
    # chunked prefill: fewer queries than keys (queries aligned to the end), window
    (2, 4, 1, 9, 45, 128, True, 16, False, torch.bfloat16),
    # more queries than keys: the first queries see nothing -> zeros
    (1, 2, 1, 40, 23, 72, True, None, False, torch.float32),
    # vision tower: non-causal, head dim 72, key padding (one sequence fully padded)
    (2, 4, 4, 33, 33, 72, False, None, True, torch.bfloat16),
    # perceiver-like: 16 latents over 50 keys, 8/2 heads x 96, key padding, fp32
    (2, 8, 2, 16, 50, 96, False, None, True, torch.float32),
    # causal with key padding (left-padded batch)
    (2, 4, 2, 30, 30, 128, True, 12, True, torch.float16),
    # single query row, GQA 1, fp32
    (1, 2, 2, 1, 17, 128, True, None, False, torch.float32),
]


@pytest.mark.parametrize("case", PADDED_CASES, ids=lambda c: "b{}h{}/{}q{}k{}d{}c{}w{}p{}-{}".format(*c[:9], str(c[9])[6:]))
def test_padded_matches_reference(case):
    batch, hq, hkv, lq, lk, d, causal, window, padded, dtype = case
    g = torch.Generator().manual_seed(hash(case[:9]) % 2**31)
    q, k, v = rand((batch, hq, lq, d), dtype, g), rand((batch, hkv, lk, d), dtype, g), rand((batch, hkv, lk, d), dtype, g)
    mask = None
    if padded:
        mask = torch.rand(batch, lk, generator=g) > 0.3
        if causal:  # left padding: the first keys of sequence 1 are padding
            mask = torch.ones(batch, lk, dtype=torch.bool)
            mask[1, : lk // 3] = False
        else:
            mask[-1] = False  # a sequence with no real key at all -> zeros
    kwargs = dict(causal=causal, window=window, key_padding_mask=mask)
    out = attention_triton(q, k, v, **kwargs)
    ref32 = attention_reference(q.float(), k.float(), v.float(), **kwargs)
    assert_rule(out, ref32, attention_reference(q, k, v, **kwargs), dtype)


def test_padded_accepts_transposed_views_and_scale():
    """The model passes q/k/v as [B, L, H, D] views transposed to [B, H, L, D]."""
    g = torch.Generator().manual_seed(1)
    q = rand((2, 25, 4, 72), torch.float32, g).transpose(1, 2)
    k = rand((2, 25, 2, 72), torch.float32, g).transpose(1, 2)
    v = rand((2, 25, 2, 72), torch.float32, g).transpose(1, 2)
    out = attention_triton(q, k, v, causal=True, scale=0.05)
    assert max_err(out, attention_reference(q, k, v, causal=True, scale=0.05)) <= 1e-5


def test_block_sizes_do_not_change_the_result():
    g = torch.Generator().manual_seed(2)
    q, k, v = (rand((1, 2, 70, 64), torch.float32, g) for _ in range(3))
    ref = attention_reference(q, k, v, causal=True, window=20)
    for block_m, block_n in [(16, 32), (32, 16), (64, 64)]:
        out = attention_triton(q, k, v, causal=True, window=20, block_m=block_m, block_n=block_n)
        assert max_err(out, ref) <= 1e-5


def test_invalid_masking_raises_like_reference():
    q = torch.randn(1, 2, 4, 16)
    with pytest.raises(ValueError, match="causal"):
        attention_triton(q, q, q, window=3)
    with pytest.raises(ValueError, match="window"):
        attention_triton(q, q, q, causal=True, window=0)


def cu(lengths):
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)


# (q lengths, k lengths, q_heads, kv_heads, head_dim, causal, window, dtype)
VARLEN_CASES = [
    # vision tower: packed images of very uneven sizes, non-causal, 72
    ([40, 3, 0, 17], [40, 3, 0, 17], 4, 4, 72, False, None, torch.bfloat16),
    # perceiver: 16 latents over (context + latents) keys, 16/4 heads x 96, one empty context
    ([16, 16, 16], [16 + 50, 16 + 1, 16], 16, 4, 96, False, None, torch.bfloat16),
    # decoder packed prefill: causal + window, zero-length sequence inside the pack
    ([1, 0, 45, 20], [1, 0, 45, 20], 8, 2, 128, True, 9, torch.float16),
    # chunked prefill per sequence (fewer queries than keys), a sequence with keys but no query
    # and one with queries but no key (-> zeros)
    ([5, 0, 12, 4], [30, 6, 12, 0], 4, 1, 128, True, None, torch.float32),
]


@pytest.mark.parametrize("case", VARLEN_CASES, ids=lambda c: f"q{c[0]}k{c[1]}h{c[2]}/{c[3]}d{c[4]}c{c[5]}w{c[6]}")
def test_varlen_matches_reference(case):
    lq, lk, hq, hkv, d, causal, window, dtype = case
    g = torch.Generator().manual_seed(sum(lq) * 7 + sum(lk))
    q = rand((sum(lq), hq, d), dtype, g)
    k, v = rand((sum(lk), hkv, d), dtype, g), rand((sum(lk), hkv, d), dtype, g)
    cq, ck = cu(lq), cu(lk)
    kwargs = dict(causal=causal, window=window)
    out = attention_varlen_triton(q, k, v, cq, ck, max_seqlen_q=max(lq), max_seqlen_k=max(lk), **kwargs)
    ref32 = attention_varlen_reference(q.float(), k.float(), v.float(), cq, ck, **kwargs)
    assert_rule(out, ref32, attention_varlen_reference(q, k, v, cq, ck, **kwargs), dtype)


def test_varlen_without_max_seqlen_hint():
    g = torch.Generator().manual_seed(4)
    lq = [3, 33]
    q, k, v = (rand((sum(lq), 2, 32), torch.float32, g) for _ in range(3))
    out = attention_varlen_triton(q, k, v, cu(lq), cu(lq), causal=True)
    assert max_err(out, attention_varlen_reference(q, k, v, cu(lq), cu(lq), causal=True)) <= 1e-5


def test_custom_ops_opcheck():
    g = torch.Generator().manual_seed(5)
    q, k, v = rand((1, 2, 18, 32), torch.float32, g), rand((1, 1, 18, 32), torch.float32, g), rand((1, 1, 18, 32), torch.float32, g)
    mask = torch.ones(1, 18, dtype=torch.bool)
    torch.library.opcheck(prefill.attention_fwd_op, (q, k, v, True, 5, mask, None))
    cq = cu([10, 8])
    qp, kp = q[0].transpose(0, 1).contiguous(), k[0].transpose(0, 1).contiguous()
    torch.library.opcheck(prefill.attention_varlen_fwd_op, (qp, kp, kp, cq, cq, 10, 10, False, None, 0.3))


def test_torch_compile_traces_custom_ops(monkeypatch):
    monkeypatch.setenv(kernels.KERNELS_ENV, "triton")
    g = torch.Generator().manual_seed(6)
    q, k, v = (rand((1, 2, 20, 32), torch.float32, g) for _ in range(3))
    fn = torch.compile(lambda q, k, v: attention(q, k, v, causal=True, window=4), backend="aot_eager", fullgraph=True)
    assert max_err(fn(q, k, v), attention_reference(q, k, v, causal=True, window=4)) <= 1e-5


@pytest.mark.parametrize("mode,expect_kernel", [("torch", False), ("triton", True), ("", False)])
def test_dispatch_env_on_cpu(monkeypatch, mode, expect_kernel):
    monkeypatch.setenv(kernels.KERNELS_ENV, mode)
    calls = []
    real_padded, real_varlen = prefill.attention_triton, prefill.attention_varlen_triton
    monkeypatch.setattr(prefill, "attention_triton", lambda *a, **kw: calls.append("p") or real_padded(*a, **kw))
    monkeypatch.setattr(prefill, "attention_varlen_triton", lambda *a, **kw: calls.append("v") or real_varlen(*a, **kw))
    g = torch.Generator().manual_seed(7)
    q, k, v = (rand((1, 2, 17, 32), torch.float32, g) for _ in range(3))
    out = attention(q, k, v, causal=True)
    assert max_err(out, attention_reference(q, k, v, causal=True)) <= 1e-5
    qp = q[0].transpose(0, 1).contiguous()
    out = attention_varlen(qp, qp, qp, cu([17]), cu([17]))
    assert max_err(out, attention_varlen_reference(qp, qp, qp, cu([17]), cu([17]))) <= 1e-5
    assert calls == (["p", "v"] if expect_kernel else [])

"""Triton flash-decoding against the torch reference, on CPU in Triton's interpreter.

Tolerance rule as in test_attention_prefill.py. Under the interpreter keys are processed in
blocks of 16 and split over up to 4 programs by default; `num_splits` forces other splits so
the merge of partial softmaxes (including empty splits) is exercised.
"""

import os

if not os.environ.get("TRITON_INTERPRET"):
    import torch as _torch

    if not _torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

import importlib

import pytest
import torch

import kernels
from kernel_rules import assert_rule, max_err, needs_triton
from kernels.attention_decode import attention_decode, attention_decode_reference, attention_decode_triton
from kernels.attention_prefill import attention_reference

# `kernels.attention_decode` the attribute is the function; the module is imported by name.
decode = importlib.import_module("kernels.attention_decode")

pytestmark = needs_triton

# (batch, q_heads, kv_heads, slots, head_dim, num_splits, with key_mask, dtype)
CASES = [
    (1, 4, 4, 1, 128, None, False, torch.float32),  # one query, one cached key, GQA 1
    (1, 8, 4, 37, 128, None, False, torch.bfloat16),  # GQA 2, odd length, default splits
    (3, 8, 2, 50, 96, 3, True, torch.float16),  # GQA 4, head dim 96, key mask
    (2, 8, 1, 70, 72, 7, True, torch.bfloat16),  # GQA 8, head dim 72, more splits than blocks need
    (2, 32, 8, 64, 128, 1, False, torch.float32),  # the decoder's 32/8 heads, a single split
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "b{}h{}/{}s{}d{}n{}m{}-{}".format(*c[:7], str(c[7])[6:]))
def test_decode_matches_reference(case):
    batch, hq, hkv, slots, d, splits, masked, dtype = case
    g = torch.Generator().manual_seed(slots * 31 + hq)
    q = torch.randn(batch, hq, d, generator=g).to(dtype)
    k = torch.randn(batch, hkv, slots, d, generator=g).to(dtype)
    v = torch.randn(batch, hkv, slots, d, generator=g).to(dtype)
    seqlens = torch.randint(1, slots + 1, (batch,), generator=g)
    seqlens[0] = slots
    key_mask = (torch.rand(batch, slots, generator=g) > 0.3) if masked else None
    out = attention_decode_triton(q, k, v, seqlens, key_mask=key_mask, num_splits=splits)
    ref32 = attention_decode_reference(q.float(), k.float(), v.float(), seqlens, key_mask=key_mask)
    assert_rule(out, ref32, attention_decode_reference(q, k, v, seqlens, key_mask=key_mask), dtype)


def test_rolling_buffer_equals_attention_over_the_ordered_window():
    """A rolling cache holds the last S keys in rotated slot order, with the slots of a
    left-padded prompt masked out; decode must equal attention of the newest query over the
    ordered, unpadded keys."""
    g = torch.Generator().manual_seed(11)
    hq, hkv, d, slots = 4, 2, 128, 24
    keys = torch.randn(2, hkv, slots, d, generator=g)
    values = torch.randn(2, hkv, slots, d, generator=g)
    q = torch.randn(2, hq, d, generator=g)
    padding = [0, 5]  # sequence 1: its 5 oldest cached positions are left padding
    shift = [7, 19]  # where the ring's write pointer stands
    k_cache = torch.stack([keys[b].roll(shift[b], dims=1) for b in range(2)])
    v_cache = torch.stack([values[b].roll(shift[b], dims=1) for b in range(2)])
    key_mask = torch.ones(2, slots, dtype=torch.bool)
    key_mask[1] = torch.arange(slots).roll(shift[1]) >= padding[1]
    out = attention_decode_triton(q, k_cache, v_cache, torch.tensor([slots, slots]), key_mask=key_mask, num_splits=3)
    for b in range(2):
        ordered = attention_reference(
            q[b, :, None][None], keys[b, :, padding[b]:][None], values[b, :, padding[b]:][None]
        )[0, :, 0]
        assert max_err(out[b], ordered) <= 1e-5


def test_empty_cache_rows_give_zeros():
    g = torch.Generator().manual_seed(12)
    q = torch.randn(3, 4, 64, generator=g)
    k = torch.randn(3, 2, 40, 64, generator=g)
    key_mask = torch.ones(3, 40, dtype=torch.bool)
    key_mask[2] = False
    out = attention_decode_triton(q, k, k, torch.tensor([0, 40, 40]), key_mask=key_mask, num_splits=2)
    assert torch.equal(out[0], torch.zeros_like(out[0])) and torch.equal(out[2], torch.zeros_like(out[2]))
    assert max_err(out, attention_decode_reference(q, k, k, torch.tensor([0, 40, 40]), key_mask=key_mask)) <= 1e-5


def test_custom_op_opcheck():
    g = torch.Generator().manual_seed(13)
    q = torch.randn(2, 4, 32, generator=g)
    k = torch.randn(2, 2, 20, 32, generator=g)
    mask = torch.rand(2, 20, generator=g) > 0.2
    torch.library.opcheck(decode.attention_decode_fwd_op, (q, k, k, torch.tensor([20, 11]), mask, None))


@pytest.mark.parametrize("mode,expect_kernel", [("torch", False), ("triton", True), ("", False)])
def test_dispatch_env_on_cpu(monkeypatch, mode, expect_kernel):
    monkeypatch.setenv(kernels.KERNELS_ENV, mode)
    calls = []
    real = decode.attention_decode_triton
    monkeypatch.setattr(decode, "attention_decode_triton", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    g = torch.Generator().manual_seed(14)
    q = torch.randn(1, 4, 32, generator=g)
    k = torch.randn(1, 2, 19, 32, generator=g)
    out = attention_decode(q, k, k, torch.tensor([19]))
    assert max_err(out, attention_decode_reference(q, k, k, torch.tensor([19]))) <= 1e-5
    assert bool(calls) == expect_kernel

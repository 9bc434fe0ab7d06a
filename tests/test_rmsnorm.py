"""Triton RMSNorm against its torch reference, on CPU in Triton's interpreter.

Tolerance rule (issue 5): the kernel's error against a high-precision reference is at most
twice the error of the torch reference run in the same low precision (plus a tiny epsilon);
fp32 inputs: at most 1e-5.
"""

import os

# Interpreter mode must be chosen before triton is first imported (kernels/_triton.py does the
# same when no CUDA device is present; this covers a test process that imports triton first).
if not os.environ.get("TRITON_INTERPRET"):
    try:
        import torch as _torch

        if not _torch.cuda.is_available():
            os.environ["TRITON_INTERPRET"] = "1"
    except ImportError:  # pragma: no cover
        pass

import pytest
import torch

import kernels
from kernel_rules import assert_rule, max_err, needs_triton
from kernels import rmsnorm as rms_module
from kernels.rmsnorm import RMSNormFunction, rms_norm, rms_norm_reference

pytestmark = needs_triton

EPS = 1e-5


def make(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * 2).to(dtype)
    w = (1 + 0.5 * torch.randn(shape[-1], generator=g)).to(dtype)
    return x, w


def forward(x, w, **launch):
    """The Triton forward (via the launcher, so block sizes can be forced)."""
    return rms_module._rms_norm_fwd_launch(x, w, EPS, **launch)[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 1152), (3, 5, 100), (4, 4096)])
def test_forward_matches_reference(dtype, shape):
    x, w = make(shape, dtype)
    out = forward(x, w)
    ref_hi = rms_norm_reference(x.double(), w.double(), EPS)
    assert_rule(out, ref_hi, rms_norm_reference(x, w, EPS), dtype)
    assert out.dtype == dtype and out.shape == x.shape


@pytest.mark.parametrize("n_cols,max_one_block", [(1000, 256), (16385, 16384)])
def test_wide_rows_loop_path(n_cols, max_one_block):
    """Rows wider than one block take the two-pass loop (sum of squares, then normalise)."""
    x, w = make((2, n_cols), torch.bfloat16, seed=1)
    y = forward(x, w, max_one_block=max_one_block)
    y1 = forward(x, w)  # same code path for 16385; one block for 1000
    ref_lo = rms_norm_reference(x, w, EPS)
    ref_hi = rms_norm_reference(x.double(), w.double(), EPS)
    assert_rule(y, ref_hi, ref_lo, torch.bfloat16)
    assert_rule(y1, ref_hi, ref_lo, torch.bfloat16)


def test_mixed_weight_dtype_promotes_like_reference():
    x, _ = make((3, 64), torch.bfloat16)
    w = torch.randn(64, dtype=torch.float32)
    y = forward(x, w)
    ref = rms_norm_reference(x, w, EPS)
    assert y.dtype == ref.dtype == torch.float32
    assert max_err(y, ref) <= 1e-5 * ref.abs().max().item() + 1e-6


def test_backward_gradcheck_fp64(monkeypatch):
    """The Triton backward computes in fp64 for fp64 inputs, so gradcheck runs through it."""
    monkeypatch.setenv(kernels.KERNELS_ENV, "triton")
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 8, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(8, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: rms_norm(x, w, EPS), (x, w), fast_mode=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("max_one_block", [16384, 128])
def test_backward_matches_fp64_autograd(dtype, max_one_block):
    """dx, dweight vs autograd through the reference in fp64 (the rule again; the loop path
    for wide rows is forced with max_one_block=128)."""
    n = 300
    x, w = make((5, n), dtype, seed=4)
    g = torch.Generator().manual_seed(5)
    dy = torch.randn(5, n, generator=g).to(dtype)

    def grads(x, w, impl):
        x, w = (t.detach().clone().requires_grad_() for t in (x, w))
        y = impl(x, w)
        y.backward(dy.to(y.dtype))
        return x.grad, w.grad

    hi = grads(x.double(), w.double(), lambda a, b: rms_norm_reference(a, b, EPS))
    lo = grads(x, w, lambda a, b: rms_norm_reference(a, b, EPS))
    # Triton: forward op, then the backward launcher with the forced block limit.
    y, rstd = rms_module._rms_norm_fwd_launch(x, w, EPS)
    dx, dw = rms_module._rms_norm_bwd_launch(dy, x, w, rstd, max_one_block=max_one_block)
    assert_rule(dx, hi[0], lo[0], dtype, fp32_tol=1e-4)
    assert_rule(dw, hi[1], lo[1], dtype, fp32_tol=1e-4)


def test_autograd_function_grads(monkeypatch):
    x, w = make((2, 48), torch.float32, seed=6)
    x, w = (t.requires_grad_() for t in (x, w))
    y = RMSNormFunction.apply(x, w, EPS)
    (y * y).sum().backward()
    x2, w2 = (t.detach().clone().requires_grad_() for t in (x, w))
    y2 = rms_norm_reference(x2, w2, EPS)
    (y2 * y2).sum().backward()
    assert max_err(x.grad, x2.grad) < 1e-4 and max_err(w.grad, w2.grad) < 1e-4


def test_one_row_and_empty():
    x, w = make((1, 1, 4096), torch.bfloat16, seed=7)
    assert_rule(forward(x, w), rms_norm_reference(x.double(), w.double(), EPS),
                rms_norm_reference(x, w, EPS), torch.bfloat16)
    empty = torch.empty(0, 16)
    assert forward(empty, torch.ones(16)).shape == (0, 16)


def test_custom_ops_opcheck():
    x, w = make((3, 40), torch.float32, seed=8)
    torch.library.opcheck(rms_module.rms_norm_fwd_op, (x, w, EPS))
    y, rstd = rms_module.rms_norm_fwd_op(x, w, EPS)
    torch.library.opcheck(rms_module.rms_norm_bwd_op, (torch.randn_like(x), x, w, rstd))


def test_torch_compile_traces_custom_op(monkeypatch):
    """torch.compile (aot_eager: no C++ toolchain needed) sees the op through its fake impl."""
    monkeypatch.setenv(kernels.KERNELS_ENV, "triton")
    x, w = make((2, 64), torch.float32, seed=9)
    compiled = torch.compile(lambda x, w: rms_norm(x, w, EPS), backend="aot_eager", fullgraph=True)
    assert max_err(compiled(x, w), rms_norm_reference(x, w, EPS)) < 1e-5


# ------------------------------------------------------------------------------ dispatch rules


def spy(monkeypatch):
    calls = []
    real = rms_module._rms_norm_fwd_launch

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(rms_module, "_rms_norm_fwd_launch", counting)
    return calls


@pytest.mark.parametrize("mode,expect_kernel", [("torch", False), ("triton", True), ("", False), ("auto", False)])
def test_dispatch_env_on_cpu(monkeypatch, mode, expect_kernel):
    monkeypatch.setenv(kernels.KERNELS_ENV, mode)
    calls = spy(monkeypatch)
    x, w = make((2, 32), torch.float32)
    y = rms_norm(x, w, EPS)
    assert bool(calls) == expect_kernel
    assert kernels.use_triton(x) == expect_kernel
    assert max_err(y, rms_norm_reference(x, w, EPS)) < 1e-5


def test_dispatch_rejects_unknown_mode(monkeypatch):
    monkeypatch.setenv(kernels.KERNELS_ENV, "cuda")
    with pytest.raises(ValueError, match="IDEFICS2_MINI_KERNELS"):
        kernels.use_triton(torch.zeros(1))


def test_package_imports_and_runs_without_triton(tmp_path):
    """With triton unimportable, `import kernels` works and every public function runs its
    reference (auto mode); forcing triton then raises a clear error."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, kernels\n"
        "assert not kernels._triton.available()\n"
        "x = torch.randn(2, 8); w = torch.ones(8)\n"
        "kernels.rms_norm(x, w, 1e-5)\n"
        "q = torch.randn(1, 2, 3, 16)\n"
        "kernels.attention(q, q, q, causal=True)\n"
        "kernels.attention_decode(q[:, :, 0], q, q, torch.tensor([3]))\n"
        "import os; os.environ['IDEFICS2_MINI_KERNELS'] = 'triton'\n"
        "try:\n    kernels.rms_norm(x, w, 1e-5)\nexcept RuntimeError as e:\n    print('raised', e)\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop(kernels.KERNELS_ENV, None)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=root)
    assert result.returncode == 0, result.stderr
    assert "raised" in result.stdout

"""One decision per call: run the Triton kernel or the torch reference.

- default: Triton when the tensor is on CUDA and Triton imports, else the reference;
- IDEFICS2_MINI_KERNELS=torch forces the references everywhere;
- IDEFICS2_MINI_KERNELS=triton forces the Triton kernels, on CPU tensors too (they then run
  in Triton's interpreter, TRITON_INTERPRET=1), so the whole model can be checked through
  the kernels on any machine.

The environment variable is read on every call (no cached global), so a test or a user can
flip it between calls.

Interpreter mode: Triton picks "compile or interpret" when it decorates a kernel (including its
own `tl.*` library functions, at `import triton`), from TRITON_INTERPRET. `kernels/_triton.py`
therefore sets TRITON_INTERPRET=1 *before* importing triton when no CUDA device is present (and
the variable is unset), so forced-Triton CPU runs use the interpreter. On a machine with a GPU
the kernels are compiled; running them on CPU tensors there needs TRITON_INTERPRET=1 set before
the process imports triton (the wrappers raise an error saying so).

Prefill attention and RMSNorm have Triton backwards (autograd runs the kernels both ways);
decode attention is inference-only.
"""

from __future__ import annotations

import importlib.util
import os

import torch

KERNELS_ENV = "IDEFICS2_MINI_KERNELS"


def triton_available() -> bool:
    """True when triton is installed (found by the import system)."""
    return importlib.util.find_spec("triton") is not None


def kernel_mode() -> str:
    """'auto', 'torch' or 'triton' (from IDEFICS2_MINI_KERNELS)."""
    mode = os.environ.get(KERNELS_ENV, "auto").strip().lower() or "auto"
    if mode not in ("auto", "torch", "triton"):
        raise ValueError(f"{KERNELS_ENV}={mode!r}: expected 'torch', 'triton' or unset (auto)")
    return mode


def use_triton(tensor: torch.Tensor) -> bool:
    """Should a kernel whose main input is `tensor` run in Triton?"""
    mode = kernel_mode()
    if mode == "torch":
        return False
    if mode == "triton":
        if not triton_available():
            raise RuntimeError(f"{KERNELS_ENV}=triton but triton is not installed")
        return True
    return tensor.is_cuda and triton_available()

"""Compile every Triton kernel of `kernels/` ahead of time for an H100 (sm_90) — no GPU needed.

    TRITON_INTERPRET=0 python tests/aot_compile_kernels.py

Triton lowers a kernel to PTX and ptxas (shipped inside the triton wheel) assembles it, all on
the CPU; only launching needs a GPU. The interpreter tests check what the kernels compute; this
checks that the compiler accepts them as the model launches them (block sizes, dtypes, the
constexpr branches), which the interpreter never does. Prints one line per variant; exits
non-zero on the first failure. Run by tests/test_kernels_compile.py in its own process, since
the kernels must be decorated with the interpreter off.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "0"
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import kernels  # noqa: E402,F401  (loads the kernel modules)

prefill = sys.modules["kernels.attention_prefill"]
decode = sys.modules["kernels.attention_decode"]
rmsnorm = sys.modules["kernels.rmsnorm"]

H100 = GPUTarget("cuda", 90, 32)


def signature(kernel, pointers: dict[str, str], floats: set[str], element: str) -> dict[str, str]:
    """Argument types: `*_ptr` -> pointer (to `element` unless `pointers` says otherwise),
    names in `floats` -> fp32, constexprs as such, every other argument an i32."""
    types = {}
    for param in kernel.params:
        if param.is_constexpr:
            types[param.name] = "constexpr"
        elif param.name.endswith("_ptr"):
            types[param.name] = pointers.get(param.name, f"*{element}")
        else:
            types[param.name] = "fp32" if param.name in floats else "i32"
    return types


def variants():
    """(label, kernel, signature, constexprs, options), as the wrappers launch them on a GPU."""
    for element, dot, (block_m, block_n, warps, stages) in (("bf16", "tf32", (128, 64, 8, 3)),
                                                              ("fp32", "ieee", (64, 32, 4, 2))):
        for varlen, causal, window, kpm in ((False, True, True, True), (True, False, False, False)):
            constexprs = dict(VARLEN=varlen, CAUSAL=causal, HAS_WINDOW=window, HAS_KPM=kpm, BLOCK_M=block_m,
                              BLOCK_N=block_n, BLOCK_D=128, DOT_PRECISION=dot)
            kernel = prefill._attention_fwd_kernel
            pointers = {"kpm_ptr": "*u8", "cu_q_ptr": "*i32", "cu_k_ptr": "*i32"}
            yield (f"prefill {element} {'varlen' if varlen else 'padded'} causal={causal} window={window}", kernel,
                   signature(kernel, pointers, {"qk_scale"}, element), constexprs,
                   {"num_warps": warps, "num_stages": stages})
        kernel = decode._decode_split_kernel
        pointers = {"seqlens_ptr": "*i32", "key_mask_ptr": "*u8", "part_out_ptr": "*fp32", "part_lse_ptr": "*fp32"}
        yield (f"decode split {element}", kernel, signature(kernel, pointers, {"qk_scale"}, element),
               dict(HAS_KEY_MASK=True, BLOCK_G=16, BLOCK_N=64, BLOCK_D=128, DOT_PRECISION=dot),
               {"num_warps": 4, "num_stages": 3})
        kernel = decode._decode_reduce_kernel
        yield (f"decode reduce {element}", kernel,
               signature(kernel, {"part_out_ptr": "*fp32", "part_lse_ptr": "*fp32"}, set(), element),
               dict(BLOCK_S=8, BLOCK_D=128), {"num_warps": 4})
        for one_block in (True, False):
            kernel = rmsnorm._rms_norm_fwd_kernel
            yield (f"rmsnorm forward {element} one_block={one_block}", kernel,
                   signature(kernel, {"rstd_ptr": "*fp32"}, {"eps"}, element),
                   dict(BLOCK=4096 if one_block else 1024, ONE_BLOCK=one_block,
                        ACC=triton.language.float32), {"num_warps": 8})
            kernel = rmsnorm._rms_norm_bwd_kernel
            yield (f"rmsnorm backward {element} one_block={one_block}", kernel,
                   signature(kernel, {"rstd_ptr": "*fp32", "dw_partial_ptr": "*fp32"}, set(), element),
                   dict(BLOCK=4096 if one_block else 1024, ONE_BLOCK=one_block,
                        ACC=triton.language.float32), {"num_warps": 8})


def main() -> None:
    for label, kernel, types, constexprs, options in variants():
        start = time.perf_counter()
        compiled = triton.compile(ASTSource(fn=kernel, signature=types, constexprs=constexprs), target=H100,
                                  options=options)
        print(f"ok  {label}: {len(compiled.asm['cubin']):,} bytes of sm_90 code in {time.perf_counter() - start:.1f} s",
              flush=True)


if __name__ == "__main__":
    main()

"""Speed for inference, applied to a model from outside; the model files hold only the math
(the way gpt-fast applies quantization: functions that swap or wrap modules).

`Idefics2(config)` is the plain model: nn.Linear layers, every projection its own matmul, eager
decode; it trains with autograd like any nn.Module. `Idefics2.from_pretrained` applies
`apply_backends`'s first three items (pass `backends=False` for the plain model); the rest is
opt-in:

    cpu.use_cpu_linears(model)        each nn.Linear picks oneDNN or MKL by CPU vendor and rows (cpu.py)
    cpu.use_cpu_norms(model)          RMSNorm over many rows in cache-sized pieces (cpu.py)
    fusion.fuse_projections(model)    q/k/v and gate/up each served by one matmul (fusion.py)
    compiled.compile_decode(model)    the decode step as one torch.compile graph (compiled.py)

Each engages only where it gives the plain model's result (no gradient wanted, parameters
unchanged since fusing, ...), and falls back to the plain path otherwise. Faster greedy
decoding on the CPU (`cpu.greedy_argmax`) is what `generate` uses for argmax.
"""

from __future__ import annotations

from torch import nn

from .compiled import compile_decode, is_compiled
from .cpu import greedy_argmax, use_cpu_linears, use_cpu_norms
from .fusion import fuse_projections, unfuse_projections


def apply_backends(model: nn.Module, fuse: str = "copy") -> nn.Module:
    """What `from_pretrained` applies, for a model built another way: CPU linears and norms, and
    fused projections (`fuse`: a `fusion.fuse_projections` mode, or None for none)."""
    use_cpu_linears(model)
    use_cpu_norms(model)
    if fuse is not None:
        fuse_projections(model, fuse)
    return model


__all__ = [
    "apply_backends",
    "compile_decode",
    "fuse_projections",
    "greedy_argmax",
    "is_compiled",
    "unfuse_projections",
    "use_cpu_linears",
    "use_cpu_norms",
]

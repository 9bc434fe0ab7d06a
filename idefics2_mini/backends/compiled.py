"""Compiled decode: each generated token's tensor work as one `torch.compile` graph.

    compile_decode(model)                  # like gpt-fast's --compile; CLI: --compile
    compile_decode(model, enable=False)    # back to eager

Per token, one compiled graph replaces ~30 eager ops per layer, which is what decode costs when
the model is small (the tiny benchmark model: 1.9-2.2x its eager tokens/s at batch 1); where
the weights' bytes dominate (8B widths) it stays within +-10% of eager. Opt-in, because the
first step of each new (batch size, cache length, dtype, device) compiles, ~10-30 s on a CPU
(a C++ compiler is needed there); results equal eager decode's up to float rounding order.

What it compiles is `Idefics2.decode_logits`, the decode step between the cache's begin_step and
end_step: it reads no host-side counter (the KV cache keeps the step's slot in tensors), so one
graph serves every step. The compiled step replaces that method on the instance. Inside the
graph the CPU backends choose forms Inductor can fuse (backends/cpu.py: oneDNN linears as an
opaque op, one-row small linears as multiply-and-sum; kernels/attention_decode.py: plain-math
decode attention for a small cache).
"""

from __future__ import annotations

import torch
from torch import nn

from . import cpu, fusion, gemv


def compile_decode(model: nn.Module, enable: bool = True, **compile_options) -> nn.Module:
    """Compile `model.decode_logits` (see the module docstring); `compile_options` go to
    torch.compile (default fullgraph=True; e.g. mode="max-autotune-no-cudagraphs", backend=...).

    The graph is traced against the parameters as they are: when they are moved or converted
    (`.to()`) or re-fused, the next step notices, drops the compiled step and runs eager; call
    `compile_decode` again afterwards."""
    model.__dict__.pop("decode_logits", None)
    if enable:
        fusion.prepare_for_compile()
        settle_one_row_linears(model)
        compile_options.setdefault("fullgraph", True)
        model.decode_logits = CompiledDecodeStep(model, torch.compile(model.decode_logits, **compile_options))
    return model


def settle_one_row_linears(model: nn.Module) -> None:
    """Measure, before tracing, how each bf16 / fp16 decoder weight runs one input row
    (cpu.settle_one_row): the compiled step cannot time anything, and would otherwise keep the
    plain one-row form for every shape. bf16 rows go to gemv.c when it is built: nothing to settle."""
    weights = [module.weight for module in (*model.text.modules(), model.lm_head) if isinstance(module, cpu.CpuLinear)]
    weights += [group.weight for group in fusion.fused_groups(model.text)]
    for weight in weights:
        if (weight.device.type == "cpu" and weight.dtype in cpu.HALF_DTYPES and weight.dim() == 2
                and weight.numel() >= cpu.ONEDNN_MIN_WEIGHT_ELEMENTS and weight.stride(1) == 1
                and not gemv.takes(weight[:1], weight)):
            cpu.settle_one_row(weight)


def is_compiled(model: nn.Module) -> bool:
    """Whether `model`'s decode step currently runs compiled."""
    return isinstance(model.__dict__.get("decode_logits"), CompiledDecodeStep)


class CompiledDecodeStep:
    """model.decode_logits, compiled, as long as the fused projections it was traced with are
    unchanged: the trace took each group's `fusion.intact` (same linears, weights still views of
    the fused matrix) as a constant, since Dynamo cannot trace data_ptr(), so that check runs
    here, in Python, before each step (about 0.3 us per fusible module). Everything else the
    trace depends on (parameters, dtypes, gradient mode) Dynamo guards itself."""

    def __init__(self, model: nn.Module, compiled):
        self.model, self.compiled = model, compiled
        self.fusible = [(module, method, module.__dict__.get(method))
                        for module, method in fusion.fusible_modules(model.text)]
        self.intact = [group is not None and fusion.intact(group) for _, _, group in self.fusible]

    def still_valid(self) -> bool:
        for (module, method, group), intact in zip(self.fusible, self.intact):
            if module.__dict__.get(method) is not group or (group is not None and fusion.intact(group) != intact):
                return False
        return True

    def __call__(self, token_ids: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache) -> torch.Tensor:
        if not self.still_valid():
            compile_decode(self.model, enable=False)
            return self.model.decode_logits(token_ids, cos, sin, cache)
        return self.compiled(token_ids, cos, sin, cache)

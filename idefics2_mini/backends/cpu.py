"""CPU speed for inference: which matmul library runs each linear, and a faster greedy argmax.

Nothing here changes a result beyond float rounding order; everything engages only when no
gradient is needed, so a model with these backends still trains like the plain one.

Linears. torch's `F.linear` hands fp32 to MKL's sgemm, and MKL picks its code paths by CPU
vendor. Measured per weight shape and row count (benchmarks/results/<machine>/linear_backends.md):

- AMD EPYC: MKL reads a decode-sized weight (1-8 rows) at 30-70% of the memory bandwidth and is
  2-12x slower than oneDNN's inner product at one row; oneDNN is faster at prefill sizes too
  (0.5-0.95x the time). oneDNN takes every row count.
- Intel Xeon: MKL leads at one row (its sgemv streams at the full bandwidth: the 8B-wide decode
  step is 4-5% faster than on oneDNN) and from ~512 rows (0-17% per linear, the 8B-wide image
  prefill 8-11%); oneDNN leads in between (2x at 8 rows). oneDNN takes 2-511 rows.

oneDNN is `torch.ops.mkldnn._linear_pointwise`, the op torch's own CPU compiler (Inductor)
emits, on the plain [out, in] weight. Below ~0.5M weight elements its fixed cost per call
(~15 us) loses to MKL, so small weights stay on `F.linear`. Only fp32 (bf16 `F.linear` already
goes to oneDNN inside torch) and only without autograd (the op has no derivative).

    use_cpu_linears(model)   every nn.Linear becomes a CpuLinear (same parameters and names)
    linear(x, weight, bias)  F.linear's contract, routed by the rules above
    greedy_argmax(logits)    exactly logits.argmax(-1), vectorised on the CPU
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ONEDNN_MIN_WEIGHT_ELEMENTS = 2**19


def _onednn_linear_available() -> bool:
    try:
        return torch.backends.mkldnn.is_available() and callable(torch.ops.mkldnn._linear_pointwise)
    except (AttributeError, RuntimeError):  # a torch built without oneDNN, or without the op
        return False


ONEDNN_LINEAR = _onednn_linear_available()  # set False to run every linear through F.linear
_onednn_linear_op = torch.ops.mkldnn._linear_pointwise if ONEDNN_LINEAR else None


def cpu_vendor() -> str:
    """The CPU's vendor id ("GenuineIntel", "AuthenticAMD", ...) from /proc/cpuinfo; "" where
    there is none (not Linux, or not x86)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


# The input row counts (rows = x.numel() // in_features) that oneDNN runs for a big weight; the
# others go to F.linear (MKL). See the module docstring for the measurements behind each range.
ONEDNN_ROWS: tuple[int, int | None] = (2, 511) if cpu_vendor() == "GenuineIntel" else (1, None)


def onednn_takes(rows: int) -> bool:
    """Does `linear` hand a big fp32 weight with `rows` input rows to oneDNN (else F.linear)?"""
    low, high = ONEDNN_ROWS
    return low <= rows and (high is None or rows <= high)


@torch.library.custom_op("idefics2_mini::onednn_linear", mutates_args=())
def _onednn_linear_opaque(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The oneDNN call as an op torch.compile keeps whole: Inductor lowers
    `mkldnn._linear_pointwise` only for weights it prepacked itself (a second copy of every
    weight), not for the plain [out, in] weight used here."""
    return _onednn_linear_op(x, weight, bias, "none", [], "")


@_onednn_linear_opaque.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., in] @ weight[out, in].T + bias [out] -> [..., out]: F.linear's contract, run by
    oneDNN for big fp32 weights at inference on the CPU (ONEDNN_MIN_WEIGHT_ELEMENTS), for the
    row counts where it is the faster library (ONEDNN_ROWS)."""
    if x.device.type == "cpu" and weight.dim() == 2 and not _needs_grad(x, weight, bias):
        if weight.numel() >= ONEDNN_MIN_WEIGHT_ELEMENTS:
            if (ONEDNN_LINEAR and x.dtype == torch.float32 and weight.dtype == torch.float32
                    and weight.stride(1) == 1 and onednn_takes(x.numel() // weight.shape[1])):
                if torch.compiler.is_compiling():
                    return _onednn_linear_opaque(x, weight, bias)
                return _onednn_linear_op(x, weight, bias, "none", [], "")
        elif torch.compiler.is_compiling() and x.numel() == x.shape[-1]:
            # One row through a small weight (a batch-1 decode step, compiled): written as a
            # multiply-and-sum, Inductor makes it one loop fused with its neighbours, where an
            # extern BLAS call costs ~20 us for ~1 us of work (Inductor's own CPU rule for
            # memory-bound matmuls, `decompose_mem_bound_mm`, applied here without a global flag).
            out = (x.unsqueeze(-2) * weight).sum(-1)
            return out if bias is None else out + bias
    return F.linear(x, weight, bias)


def _needs_grad(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and (
        x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    )


class CpuLinear(nn.Linear):
    """nn.Linear (same parameters, names and init) whose forward is `linear` above."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def use_cpu_linears(model: nn.Module, enable: bool = True) -> nn.Module:
    """Make every plain nn.Linear of `model` a CpuLinear (enable=False: back to nn.Linear).

    The class of each module is swapped in place: the same object, parameters and name, so
    anything that holds or wraps a linear (fused projections, LoRA) keeps working. Subclasses
    of nn.Linear with their own forward (a LoRA linear) are left as they are."""
    old, new = (nn.Linear, CpuLinear) if enable else (CpuLinear, nn.Linear)
    for module in model.modules():
        if type(module) is old:
            module.__class__ = new
    return model


# ----------------------------------------------------------------------------- greedy argmax

ARGMAX_CHUNK = 128


def greedy_argmax(logits: torch.Tensor) -> torch.Tensor:
    """logits [B, vocab] -> [B] long: exactly `logits.argmax(-1)` (the first maximum; a NaN
    counts as the maximum), found in two levels because on the CPU torch's argmax over a long
    row is a scalar loop while amax is vectorised: the row, padded with -inf to whole chunks, is
    viewed as [B, chunks, 128]; the first chunk holding the row's maximum is the argmax of the
    chunk maxima, and the answer is the first maximum inside that chunk. For a 32k vocabulary
    on the Intel Xeon: 78 -> 61 us for one row, 315 -> 149 us for eight
    (benchmarks/results/intel-r-xeon-r-processor/decode_ops.md)."""
    if logits.device.type != "cpu" or logits.dim() != 2 or logits.shape[-1] <= ARGMAX_CHUNK:
        return logits.argmax(dim=-1)
    batch, vocab = logits.shape
    num_chunks = -(-vocab // ARGMAX_CHUNK)
    # -inf padding never wins against a real entry (argmax keeps the first of equal maxima, and
    # padding comes last), so an all -inf row still gives 0, as argmax does.
    chunks = F.pad(logits, (0, num_chunks * ARGMAX_CHUNK - vocab), value=float("-inf"))
    chunks = chunks.view(batch, num_chunks, ARGMAX_CHUNK)
    best_chunk = chunks.amax(dim=-1).argmax(dim=-1)  # [B]; amax propagates NaN, argmax takes it
    within = chunks[torch.arange(batch, device=logits.device), best_chunk].argmax(dim=-1)
    return best_chunk * ARGMAX_CHUNK + within

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

bf16 / fp16 linears (`half_linear`, below): the input as one [rows, in] matrix, and one row run
as two for the weight shapes where oneDNN's one-row kernel was measured slower (settled by
timing both, once per shape).

    use_cpu_linears(model)   every nn.Linear becomes a CpuLinear (same parameters and names)
    use_cpu_norms(model)     every RMSNorm becomes a CpuRMSNorm: many rows normalised in cached pieces
    linear(x, weight, bias)  F.linear's contract, routed by the rules above
    greedy_argmax(logits)    exactly logits.argmax(-1), vectorised on the CPU
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn

import kernels
import kernels.dispatch

from ..layers import RMSNorm
from . import gemv

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
    row counts where it is the faster library (ONEDNN_ROWS); bf16 / fp16 by `half_linear`."""
    if x.device.type == "cpu" and weight.dim() == 2 and not _needs_grad(x, weight, bias):
        if x.dtype in HALF_DTYPES and weight.dtype == x.dtype:
            return half_linear(x, weight, bias)
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


# ----------------------------------------------------------------------------- bf16 / fp16 linears
#
# torch hands a bf16 (fp16) CPU matmul to oneDNN itself (on AMX / AVX-512-BF16 CPUs its brgemm
# kernels), so there is no library to choose; two shapes of call lose all the same, measured on
# the Intel Xeon (AMX; benchmarks/bf16_ops.py, results/<machine>/bf16_ops.md):
#
# - an input whose rows are not one strided matrix, such as the [B, 1, C] slice of the last
#   token that generation sends through the lm_head: matmul cannot fold it into one matrix
#   product, expands the weight to [B, in, out] and, in bf16, copies it (262 MB for the 8B
#   lm_head: 1.5 s instead of 25 ms). `half_linear` reshapes the input to [rows, in] first
#   (a copy of B x C values at most).
# - one input row through some weight shapes: oneDNN's one-row kernel for the 8B [4096, 14336]
#   down projection reads it at 11 GB/s, the same call with two rows at 28 GB/s, while the
#   other shapes of the model run either way at the same speed (+-10%). Which shapes lose is
#   the kernel library's business and differs by CPU, so it is measured, not listed: the first
#   one-row call of each (dtype, out, in) times both forms on that weight (`settle_one_row`,
#   ~6 calls, once per shape and process) and keeps the two-row form only where it is clearly
#   faster (ONE_ROW_AS_TWO_MIN_GAIN). `compiled.compile_decode` settles every shape before
#   tracing, since a compiled step cannot time anything.

HALF_DTYPES = (torch.bfloat16, torch.float16)
ONE_ROW_AS_TWO_MIN_GAIN = 1.25  # the two-row form must be this many times faster to be kept
# (dtype, out_features, in_features) -> run one input row as two (True) or as it is (False).
# Filled by settle_one_row; set an entry by hand to pin a choice.
ONE_ROW_AS_TWO: dict[tuple[torch.dtype, int, int], bool] = {}


def half_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`linear` for bf16 / fp16 inference on the CPU (see above): x as one [rows, in] matrix, and
    a single row run as two rows for the weight shapes where that was measured faster; bf16
    decode-sized inputs through gemv.c."""
    if gemv.takes(x, weight, bias):
        return gemv.bf16_linear(x, weight)
    in_features, out_features = weight.shape[1], weight.shape[0]
    rows = x.numel() // in_features
    flat = x.reshape(rows, in_features)
    if rows == 1 and weight.numel() >= ONEDNN_MIN_WEIGHT_ELEMENTS and weight.stride(1) == 1:
        key = (weight.dtype, out_features, in_features)
        as_two = ONE_ROW_AS_TWO.get(key)
        if as_two is None and not torch.compiler.is_compiling():
            as_two = settle_one_row(weight)
        if as_two:
            out = F.linear(flat.expand(2, in_features).contiguous(), weight, bias)[:1]
            return out.view(*x.shape[:-1], out_features)
    return F.linear(flat, weight, bias).view(*x.shape[:-1], out_features)


def settle_one_row(weight: torch.Tensor, rounds: int = 3) -> bool:
    """Time one input row through `weight` (bf16 / fp16, [out, in]) as it is and as two rows,
    alternating, `rounds` times each; record in ONE_ROW_AS_TWO (and return) whether the two-row
    form's best time beats the one-row form's best by ONE_ROW_AS_TWO_MIN_GAIN. Both forms read
    the whole weight, so this costs ~2 x rounds weight reads, once per shape."""
    key = (weight.dtype, weight.shape[0], weight.shape[1])
    if key in ONE_ROW_AS_TWO:
        return ONE_ROW_AS_TWO[key]
    one = torch.zeros(1, weight.shape[1], dtype=weight.dtype)
    two = torch.zeros(2, weight.shape[1], dtype=weight.dtype)
    best = {1: float("inf"), 2: float("inf")}
    with torch.no_grad():
        for _ in range(rounds):
            for rows, x in ((1, one), (2, two)):
                start = time.perf_counter()
                F.linear(x, weight)
                best[rows] = min(best[rows], time.perf_counter() - start)
    ONE_ROW_AS_TWO[key] = best[1] > ONE_ROW_AS_TWO_MIN_GAIN * best[2]
    return ONE_ROW_AS_TWO[key]


def _needs_grad(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and (
        x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    )


# ----------------------------------------------------------------------------- RMSNorm of many rows
#
# torch's RMSNorm on the CPU is several whole passes over its input (fp32 copies, square, mean,
# scale, cast back), each through memory once the input outgrows the cache: the perceiver's
# context norm over one image's 3220 projected patches (3220 x 4096) took ~40 ms a layer in
# bf16. The same op over pieces of NORM_PIECE_ROWS rows keeps each piece's temporaries in the
# core's cache (2 MB at width 4096 in fp32): ~2.5x faster, the same bits (a norm is per row).

NORM_PIECE_ROWS = 128


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """kernels.rms_norm(x, weight, eps), x [..., N], run over pieces of NORM_PIECE_ROWS rows at
    inference on the CPU when x has more than two pieces' rows."""
    rows = x.numel() // x.shape[-1] if x.dim() else 0
    if (x.device.type != "cpu" or rows <= 2 * NORM_PIECE_ROWS or torch.compiler.is_compiling()
            or _needs_grad(x, weight, None) or kernels.dispatch.use_triton(x)):
        return kernels.rms_norm(x, weight, eps)
    flat = x.reshape(rows, x.shape[-1])
    first = kernels.rms_norm(flat[:NORM_PIECE_ROWS], weight, eps)
    out = first.new_empty(rows, first.shape[-1])
    out[:NORM_PIECE_ROWS] = first
    for start in range(NORM_PIECE_ROWS, rows, NORM_PIECE_ROWS):
        out[start : start + NORM_PIECE_ROWS] = kernels.rms_norm(flat[start : start + NORM_PIECE_ROWS], weight, eps)
    return out.view(*x.shape[:-1], out.shape[-1])


class CpuRMSNorm(RMSNorm):
    """RMSNorm (same parameter, name and math) whose forward is `rms_norm` above."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def use_cpu_norms(model: nn.Module, enable: bool = True) -> nn.Module:
    """Make every RMSNorm of `model` a CpuRMSNorm (enable=False: back), swapping the class in
    place as `use_cpu_linears` does."""
    old, new = (RMSNorm, CpuRMSNorm) if enable else (CpuRMSNorm, RMSNorm)
    for module in model.modules():
        if type(module) is old:
            module.__class__ = new
    return model


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

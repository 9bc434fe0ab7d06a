"""Building blocks shared by the tower, connector and decoder: RMSNorm, the SwiGLU MLP, and
fused projections (several linears of one input served by one matrix multiply)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import kernels


def embedding(num_embeddings: int, width: int, padding_idx: int | None = None) -> nn.Embedding:
    """nn.Embedding with N(0, 1) rows (its own init) — except on the meta device, where the
    loader builds the model before filling it from the checkpoint: drawing random numbers for a
    meta tensor imports torch._dynamo, over a second of load time for nothing."""
    weight = torch.empty(num_embeddings, width)
    if weight.device.type != "meta":
        with torch.no_grad():
            weight.normal_()
            if padding_idx is not None:
                weight[padding_idx] = 0
    return nn.Embedding(num_embeddings, width, padding_idx=padding_idx, _weight=weight)


class RMSNorm(nn.Module):
    """y = weight * x / sqrt(mean(x²) + eps); statistics in fp32, cast back, then × weight.

    Runs `kernels.rms_norm` (Triton on CUDA, the torch reference elsewhere).
    """

    def __init__(self, width: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., width] -> [..., width]."""
        return kernels.rms_norm(x, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


# ----------------------------------------------------------------------------- linear layers
#
# Which CPU matmul runs a linear. torch's F.linear hands fp32 to MKL's sgemm, which on the AMD
# EPYC this project was first benchmarked on reads a big weight at 30-70% of the memory
# bandwidth for decode-sized inputs (1-8 rows) and is up to 4x slower than oneDNN's inner
# product at 8 rows. oneDNN (the library torch's own CPU compiler, Inductor, emits
# `mkldnn._linear_pointwise` for) reads the plain [out, in] weight at ~100% of the bandwidth at
# one row, and is faster at prefill sizes too (0.5-0.95x the time). On an Intel Xeon MKL
# leads at one row and at many rows, oneDNN in between (see ONEDNN_ROWS). Per shape:
# benchmarks/results/<machine>/linear_backends.md.
# Below ~0.5M weight elements its fixed cost per call (~15 us) loses to MKL, so small weights
# stay on F.linear. Only for inference (oneDNN's op has no autograd formula) and fp32 (bf16
# F.linear already goes to oneDNN inside torch).
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


# Which input row counts (rows = x.numel() // in_features) oneDNN runs for a big weight; the
# others go to F.linear (MKL). MKL picks its code paths by CPU vendor, and on an Intel CPU it
# leads at both ends: at one row (a batch-1 decode step, a matrix-vector product that only
# streams the weight) its sgemv streams at the full memory bandwidth, 4-5% ahead of oneDNN in
# the 8B-wide decode step; from ~512 rows (prefill of an image: 3220 patches unsplit) its sgemm
# is 0-17% faster per linear and the 8B-wide image prefill 8-11% faster. oneDNN leads in
# between (2x at 8 rows). On AMD, MKL is 2-12x slower than oneDNN at one row and slower at
# every size measured. Measured on an Intel Xeon (Emerald Rapids) and an AMD EPYC:
# benchmarks/results/<machine>/linear_backends.md and e2e.md.
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
    oneDNN for big fp32 weights at inference on the CPU (see ONEDNN_MIN_WEIGHT_ELEMENTS), for
    the row counts where it is the faster library (see ONEDNN_ROWS)."""
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


class Linear(nn.Linear):
    """nn.Linear (same parameters, names and init) whose forward is `linear` above."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class FusedProjections:
    """Linears that read the same input (q/k/v, gate/up), stored as ONE weight matrix whose row
    blocks *are* the linears' parameters (views, no copy): one matmul instead of several, which
    reads the weights in one pass and, for small (decode) inputs, pays one call's overhead.

    The checkpoint names stay the linears' own (q_proj.weight, ...). Fusion lasts while the
    parameters still live in the fused storage: moving or converting the model (`.to()`) makes
    new, separate tensors, and `current()` then says so and the caller falls back to the
    separate linears (call `Idefics2.fuse_projections()` again to re-fuse).
    """

    def __init__(self, linears: list[nn.Linear], weight: torch.Tensor, bias: torch.Tensor | None):
        """weight [sum out_i, in] (bias [sum out_i]) must already hold the linears' parameters
        as its row blocks; use `fuse_linears` to make one."""
        self.linears = linears
        self.sizes = [linear.out_features for linear in linears]
        self.weight, self.bias = weight, bias

    def current(self) -> bool:
        """True while the linears' parameters are still views of the fused matrix. Fusion is
        for inference: when autograd wants their gradients, the separate linears run."""
        needs_grad = torch.is_grad_enabled() and self.linears[0].weight.requires_grad
        return _still_views(self) and not needs_grad

    def output(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] -> [..., sum out_i]: the linears' outputs side by side."""
        return linear(x, self.weight, self.bias)

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """x [..., in] -> one output per linear, [..., out_i] each (views of one result)."""
        return self.output(x).split(self.sizes, dim=-1)


def _still_views(fused: FusedProjections) -> bool:
    return fused.linears[0].weight.data_ptr() == fused.weight.data_ptr()


def prepare_for_compile() -> None:
    """Called before torch.compile traces the model (Idefics2.compile_decode): Dynamo cannot
    trace data_ptr(), so the fusion check is marked to be taken at trace time as a constant (the
    model drops its compiled step when the parameters move). Done here, not at import, because
    marking imports torch._dynamo: a second of import time nobody else should pay."""
    global _still_views  # noqa: PLW0603
    _still_views = torch.compiler.assume_constant_result(_still_views)


FUSE_MODES = ("copy", "empty", "mapped")


def fuse_linears(linears: list[nn.Linear], mode: str = "copy") -> FusedProjections | None:
    """Fuse linears that read the same input. mode:

    - "copy": a new matrix holding their values; their parameters become its row blocks;
    - "empty": the same layout, values left uninitialised (the loader fills them afterwards);
    - "mapped" (parameters that are views of a memory-mapped checkpoint): a view spanning
      their weights (and biases) when those already lie back to back, in order, in one storage
      (no new memory); otherwise a copy when they are small (together below
      ONEDNN_MIN_WEIGHT_ELEMENTS: there the per-call cost of three small matmuls instead of
      one is what decode pays, and the copy is cheap); otherwise None: they run one by one
      (a big matmul gains next to nothing from fusion, and copying it would cost load time
      and memory).
    """
    if mode not in FUSE_MODES:
        raise ValueError(f"fusion mode must be one of {FUSE_MODES}, got {mode!r}")
    has_bias = [linear.bias is not None for linear in linears]
    if any(has_bias) and not all(has_bias):
        raise ValueError("cannot fuse linears where only some have a bias")
    weights = [linear.weight for linear in linears]
    biases = [linear.bias for linear in linears] if all(has_bias) else None
    if mode == "mapped":
        weight = _span(weights)
        bias = None if biases is None else _span(biases)
        if weight is not None and (biases is None or bias is not None):
            return FusedProjections(linears, weight, bias)
        if sum(w.numel() for w in weights) >= ONEDNN_MIN_WEIGHT_ELEMENTS:
            return None
        mode = "copy"
    with torch.no_grad():
        weight = _stack_rows(weights, mode == "copy")
        bias = None if biases is None else _stack_rows(biases, mode == "copy")
    start = 0
    for linear in linears:
        size = linear.out_features
        linear.weight = nn.Parameter(weight[start : start + size], requires_grad=linear.weight.requires_grad)
        if bias is not None:
            linear.bias = nn.Parameter(bias[start : start + size], requires_grad=linear.bias.requires_grad)
        start += size
    return FusedProjections(linears, weight, bias)


def _stack_rows(tensors: list[torch.Tensor], copy_values: bool) -> torch.Tensor:
    """Concatenate along dim 0 into new storage (uninitialised unless copy_values)."""
    if copy_values:
        return torch.cat(tensors)
    first = tensors[0]
    rows = sum(t.shape[0] for t in tensors)
    return torch.empty(rows, *first.shape[1:], dtype=first.dtype, device=first.device)


def _span(tensors: list[torch.Tensor]) -> torch.Tensor | None:
    """One tensor viewing `tensors` stacked along dim 0, when they are contiguous and lie back
    to back in one storage; else None."""
    first = tensors[0]
    if first.device.type == "meta":
        return None
    offset = first.storage_offset()
    for tensor in tensors:
        if (
            not tensor.is_contiguous()
            or tensor.dtype != first.dtype
            or tensor.shape[1:] != first.shape[1:]
            or tensor.untyped_storage().data_ptr() != first.untyped_storage().data_ptr()
            or tensor.storage_offset() != offset
        ):
            return None
        offset += tensor.numel()
    rows = sum(tensor.shape[0] for tensor in tensors)
    return first.as_strided((rows, *first.shape[1:]), first.stride(), first.storage_offset())


def project(fused: FusedProjections | None, linears: list[nn.Linear], x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The linears applied to x: through the fused matrix when it is current, else one by one."""
    if fused is not None and fused.current():
        return fused(x)
    return tuple(linear(x) for linear in linears)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)), no biases (Mistral MLP, Idefics2 projector and perceiver MLP)."""

    def __init__(self, in_width: int, hidden_width: int, out_width: int):
        super().__init__()
        self.gate_proj = Linear(in_width, hidden_width, bias=False)
        self.up_proj = Linear(in_width, hidden_width, bias=False)
        self.down_proj = Linear(hidden_width, out_width, bias=False)
        self.fused_gate_up: FusedProjections | None = None

    def fuse(self, mode: str = "copy") -> None:
        self.fused_gate_up = fuse_linears([self.gate_proj, self.up_proj], mode)

    # Above this many input rows the two halves of a fused gate/up output are big strided
    # views, and silu and the product over them cost more than the fused matmul saves
    # (profiled on a 3220-patch image: +0.45 s at the projector).
    FUSED_MAX_ROWS = 512

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in_width] -> [..., out_width]."""
        fused = self.fused_gate_up if x.numel() <= self.FUSED_MAX_ROWS * x.shape[-1] else None
        gate, up = project(fused, [self.gate_proj, self.up_proj], x)
        if torch.is_grad_enabled():
            return self.down_proj(F.silu(gate) * up)
        # Inference: reuse gate's memory (for a 3220-patch image that is 185 MB not allocated).
        return self.down_proj(F.silu(gate, inplace=True).mul_(up))

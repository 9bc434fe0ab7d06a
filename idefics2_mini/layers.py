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


class FusedProjections:
    """Linears that read the same input (q/k/v, gate/up), stored as ONE weight matrix whose row
    blocks *are* the linears' parameters (views, no copy): one matmul instead of several, which
    reads the weights in one pass and keeps all cores busy on small (decode) inputs.

    The checkpoint names stay the linears' own (q_proj.weight, ...). Fusion lasts while the
    parameters still live in the fused storage: moving or converting the model (`.to()`) makes
    new, separate tensors, and `current()` then says so and the caller falls back to the
    separate linears (call `Idefics2.fuse_projections()` again to re-fuse).

    `input_major=True` stores the matrix as [in, out] in memory (the weight is its transposed
    view, still [out, in] to every caller): CPU BLAS runs x @ W for a few rows of x markedly
    faster in that layout than with the [out, in] one (see `store_input_major`).
    """

    def __init__(self, linears: list[nn.Linear], input_major: bool = False, copy_values: bool = True):
        """copy_values=False only lays the storage out (the loader fills it afterwards).
        input_major applies only when the fused matrix widens its input (out > in)."""
        input_major = input_major and sum(linear.out_features for linear in linears) > linears[0].in_features
        has_bias = [linear.bias is not None for linear in linears]
        if any(has_bias) and not all(has_bias):
            raise ValueError("cannot fuse linears where only some have a bias")
        with torch.no_grad():
            self.weight = _stack_rows([linear.weight for linear in linears], input_major, copy_values)
            self.bias = _stack_rows([linear.bias for linear in linears], False, copy_values) if all(has_bias) else None
        self.sizes = [linear.out_features for linear in linears]
        self.linears = linears
        start = 0
        for linear, size in zip(linears, self.sizes):
            linear.weight = nn.Parameter(self.weight[start : start + size], requires_grad=linear.weight.requires_grad)
            if self.bias is not None:
                linear.bias = nn.Parameter(self.bias[start : start + size], requires_grad=linear.bias.requires_grad)
            start += size

    def current(self) -> bool:
        """True while the linears' parameters are still views of the fused matrix. Fusion is
        for inference: when autograd wants their gradients, the separate linears run."""
        weight = self.linears[0].weight
        needs_grad = torch.is_grad_enabled() and weight.requires_grad
        return weight.data_ptr() == self.weight.data_ptr() and not needs_grad

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """x [..., in] -> one output per linear, [..., out_i] each (views of one result)."""
        return F.linear(x, self.weight, self.bias).split(self.sizes, dim=-1)


def _stack_rows(tensors: list[torch.Tensor], input_major: bool, copy_values: bool) -> torch.Tensor:
    """Concatenate along dim 0 into new storage ([in, sum_out] in memory when input_major)."""
    if copy_values:
        if input_major:
            return torch.cat([t.t() for t in tensors], dim=1).t()
        return torch.cat(tensors)
    first = tensors[0]
    rows = sum(t.shape[0] for t in tensors)
    if input_major:
        return torch.empty(first.shape[1], rows, dtype=first.dtype, device=first.device).t()
    return torch.empty(rows, *first.shape[1:], dtype=first.dtype, device=first.device)


def store_input_major(linear: nn.Linear, copy_values: bool = True) -> None:
    """Keep `linear.weight` ([out, in]) as the transposed view of an [in, out] contiguous
    tensor. Same values, same shape and name; F.linear then hands BLAS x @ W_t with W_t
    contiguous, which on CPU is the faster GEMV/skinny-GEMM layout (decode, small batches)."""
    weight = linear.weight
    with torch.no_grad():
        if copy_values:
            stored = weight.t().contiguous().t()
        else:
            stored = torch.empty(weight.shape[1], weight.shape[0], dtype=weight.dtype, device=weight.device).t()
        linear.weight = nn.Parameter(stored, requires_grad=weight.requires_grad)


def project(fused: FusedProjections | None, linears: list[nn.Linear], x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The linears applied to x: through the fused matrix when it is current, else one by one."""
    if fused is not None and fused.current():
        return fused(x)
    return tuple(linear(x) for linear in linears)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)), no biases (Mistral MLP, Idefics2 projector and perceiver MLP)."""

    def __init__(self, in_width: int, hidden_width: int, out_width: int):
        super().__init__()
        self.gate_proj = nn.Linear(in_width, hidden_width, bias=False)
        self.up_proj = nn.Linear(in_width, hidden_width, bias=False)
        self.down_proj = nn.Linear(hidden_width, out_width, bias=False)
        self.fused_gate_up: FusedProjections | None = None

    def fuse(self, input_major: bool = False, copy_values: bool = True) -> None:
        self.fused_gate_up = FusedProjections([self.gate_proj, self.up_proj], input_major, copy_values)

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
